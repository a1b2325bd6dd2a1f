"""Build a randomly initialised causal LM from a config, with a tokenizer copied from a local directory.

For benchmarking where the real weights cannot travel (a GPU machine without hub access): throughput and memory
depend on the architecture, not on the weights, so a random model with SmolLM2's config measures the same work.
``--preset`` scales the architecture up to sizes where a GPU is busy.
Run: python -m bench.random_model --tokenizer DIR --out DIR [--preset smollm2-135m|llama-1b] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

# Overrides applied on top of the tokenizer directory's config.json (a SmolLM2/Llama config).
PRESETS: dict[str, dict] = {
    "smollm2-135m": {},
    # Llama-3.2-1B-like shape on SmolLM2's 49k vocabulary: about 1.1 B parameters
    "llama-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64},
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "generation_config.json")


def build(tokenizer_dir: str, out: str, preset: str = "smollm2-135m", seed: int = 0) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    src, dst = Path(tokenizer_dir), Path(out)
    cfg_dict = {**json.loads((src / "config.json").read_text()), **PRESETS[preset]}
    cfg_dict.pop("quantization_config", None)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(cfg_dict))
    config = AutoConfig.from_pretrained(dst)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(dst)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    n = sum(p.numel() for p in model.parameters())
    print(f"built {preset} ({n / 1e6:.0f} M parameters) at {dst}")
    return dst


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True, help="directory with config.json and the tokenizer files")
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="smollm2-135m")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    build(a.tokenizer, a.out, a.preset, a.seed)


if __name__ == "__main__":
    main()
