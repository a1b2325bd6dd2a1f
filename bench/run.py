"""``make bench``: run the benchmarks in turn and print their tables (results in bench/results/*.json).

Run: python -m bench.run [generation training round methods]   (default: generation training round)
"""

from __future__ import annotations

import importlib
import sys

DEFAULT = ["generation", "training", "round"]
# what `make bench` passes: the generation table with the engine's settings side by side (as shipped: eager with the
# C++ RMSNorm kernels, KV blocks of 32 and inverse-CDF draws; eager with vLLM's native norm; vLLM's CPU block of 128;
# vLLM's Gumbel-max sampler; compiled)
ARGS = {"generation": ["--variant", 'native-norm={"cpu_kernels": "native"}', "--variant",
                       'block-128={"kv_block_size": 128}', "--variant", 'native-sampler={"cpu_sampler": "native"}',
                       "--variant", 'compiled={"compile": "on"}']}


def main(argv: list[str] | None = None) -> None:
    names = (argv if argv is not None else sys.argv[1:]) or DEFAULT
    for name in names:
        print(f"\n## {name}\n", flush=True)
        importlib.import_module(f"bench.{name}").main(ARGS.get(name, []))


if __name__ == "__main__":
    main()
