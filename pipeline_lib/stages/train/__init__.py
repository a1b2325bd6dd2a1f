"""The train stage: DPO-family preference optimisation of the policy on a pairs table, through TRL.

The stage owns data plumbing and checkpoints; the loss maths lives in TRL (and, for the paper methods, in
``losses.py``). Resumable: intermediate checkpoints go to a work directory named by the stage key, so a re-run
after a crash continues from the last one; the final model is written atomically as a model artifact.

One training core, ``fit`` (``fit.py``), runs either in this process (``train.num_processes: 1``) or in each of the
data-parallel processes that ``worker.launch`` starts with torchrun (``num_processes > 1`` or ``train.deepspeed``);
there, rank 0 writes the artifact and this process reads it back. ``train.fsdp`` shards the parameters, gradients
and optimizer state over those processes (FSDP2, ZeRO-3's memory profile) for policies too large for one GPU; rank 0
gathers the whole model to save it (``fit.gathered_state_dict``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from pipeline_lib.artifacts import ArtifactRef, read_manifest, ref_from_dir, sha256_file, write_model
from pipeline_lib.methods import MethodConfig
from pipeline_lib.models import ResolvedModel
from pipeline_lib.stage import done, output_dir
from pipeline_lib.stages.train.config import TrainConfig
from pipeline_lib.stages.train.fit import TrainingDivergedError, TrainJob, fit, work_dir_of, world_size  # noqa: F401
from pipeline_lib.stages.train.worker import launch


def run(policy: ResolvedModel, pairs: ArtifactRef, cfg: TrainConfig, method: MethodConfig,
        work_dir: str | Path, reference: ResolvedModel | None = None, callbacks: list | None = None,
        on_log: Callable[[dict], None] | None = None, quiet: bool = False) -> ArtifactRef:
    """Train ``policy`` on ``pairs``. The reference log-probs come from ``reference`` (default: the policy itself,
    which in a round is also the behavior policy that sampled the pairs) in one no-grad pass before training.
    With ``cfg.ensemble = N > 1`` (BPO), N LoRA members are trained and averaged (see ``_train_ensemble``). With
    ``cfg.num_processes > 1`` or ``cfg.deepspeed``, ``fit`` runs in a torchrun process group (``worker.py``), whose
    rank 0's log rows reach ``on_log``; ``callbacks`` then cannot be used."""
    reference = reference or policy
    config = {**cfg.model_dump(), "method": method.model_dump()}
    inputs = {"policy": policy.sha256, "pairs": pairs.sha256, "reference": reference.sha256}
    if cfg.deepspeed:  # the file's content (ZeRO stage, clipping, precision) shapes the result: key it, not the path
        inputs["deepspeed"] = _check_deepspeed(cfg.deepspeed)
    out = output_dir(work_dir, "train", inputs, config)
    if done(out):
        return ref_from_dir(out)
    job = TrainJob(policy, pairs, cfg, method, reference, out, inputs, config, quiet)
    if cfg.ensemble > 1:
        return _train_ensemble(job, work_dir, callbacks, on_log)
    if world_size(cfg) == 1 and not cfg.deepspeed:
        try:
            return fit(job, callbacks, on_log)
        finally:
            release_memory()
    if callbacks:
        raise ValueError(f"train.num_processes={cfg.num_processes}: trainer callbacks run inside the trainer's "
                         "processes and cannot be sent there; use on_log (rank 0's log rows are relayed)")
    launch(job.to_spec(), cfg.num_processes, work_dir_of(out), on_log, quiet, nnodes=cfg.nnodes,
           rdzv_endpoint=cfg.rdzv_endpoint, work_dir=work_dir)
    return ref_from_dir(out)  # written by rank 0


def release_memory() -> None:
    """Give the memory of an in-process training back to the system. The trainer's tensors are freed when it goes
    out of scope, but glibc keeps the freed heap in the process: a 3-round campaign's flow process held 8.6 GiB
    during round 3's collect (whose vLLM worker needs ~6 GiB more), and was killed by the kernel on a 24 GiB machine.
    ``malloc_trim`` returns the free heap pages; a no-op where there is no glibc."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _check_deepspeed(path: str) -> str:
    """Fail before any process starts on what DeepSpeed would reject later or get wrong; returns the file's sha256."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"train.deepspeed={path}: no such file (a DeepSpeed JSON config, e.g. "
                                "configs/deepspeed/zero2.json)")
    try:
        stage = (json.loads(p.read_text()).get("zero_optimization") or {}).get("stage", 0)
    except (ValueError, AttributeError) as e:
        raise ValueError(f"train.deepspeed={path}: not a JSON object: {e}") from None
    if stage == 3:  # rank 0 saves the final weights from its own copy; ZeRO-3 leaves each rank only a shard
        raise ValueError(f"train.deepspeed={path}: ZeRO stage 3 is not supported (the final save needs the full "
                         "weights on rank 0); use stage 1 or 2, or train.fsdp: true to shard the parameters")
    if not torch.cuda.is_available():
        raise ValueError(f"train.deepspeed={path}: DeepSpeed needs a GPU and none is visible; unset train.deepspeed "
                         "(train.num_processes > 1 alone trains with gloo processes on CPU)")
    return sha256_file(p)


def _train_ensemble(job: TrainJob, work_dir: str | Path, callbacks: list | None,
                    on_log: Callable[[dict], None] | None) -> ArtifactRef:
    """BPO's ensemble (Xu et al. 2024, "BPO", §4): N LoRA adapters trained on the same pairs from different seeds
    (initialisation and data order), merged into the base and averaged uniformly. Each member is merged before
    averaging, so the result is W0 + mean_i(B_i A_i · alpha/r): the mean of the adapters' weight deltas (averaging
    the A and B factors separately would not be). Members are ordinary train artifacts, each cached, so a crash
    during member k re-runs only from member k."""
    import torch
    from safetensors.torch import load_file, save_file

    policy, pairs, cfg, method, reference = job.policy, job.pairs, job.cfg, job.method, job.reference
    members = []
    for i in range(cfg.ensemble):
        member_cfg = cfg.model_copy(update={"ensemble": 1, "seed": cfg.seed + i})
        members.append(run(policy, pairs, member_cfg, method, work_dir, reference, callbacks,
                             (lambda row, i=i: on_log({**row, "ensemble_member": i})) if on_log else None, job.quiet))
    first = Path(members[0].path)
    shards = sorted(p.name for p in first.glob("*.safetensors"))

    def build(tmp: Path) -> None:
        for item in first.iterdir():  # config, tokenizer, shard index: identical across members
            if item.is_file() and item.suffix != ".safetensors" and item.name != "manifest.json":
                shutil.copy(item, tmp / item.name)
        for shard in shards:
            total: dict[str, torch.Tensor] = {}
            dtypes: dict[str, torch.dtype] = {}
            for m in members:  # a running fp32 sum: one member's shard in memory at a time
                for k, v in load_file(str(Path(m.path) / shard)).items():
                    dtypes.setdefault(k, v.dtype)
                    total[k] = total[k].add_(v.float()) if k in total else v.float()
            save_file({k: (v / len(members)).to(dtypes[k]).contiguous() for k, v in total.items()},
                      str(tmp / shard), metadata={"format": "pt"})

    manifests = [read_manifest(m.path) for m in members]
    keys = set.intersection(*(set(mf["metrics"]) for mf in manifests))
    metrics = {k: sum(float(mf["metrics"][k]) for mf in manifests) / len(manifests) for k in sorted(keys)
               if all(isinstance(mf["metrics"][k], (int, float)) for mf in manifests)}
    metrics.update(ensemble=len(members), train_s=sum(mf["metrics"].get("train_s", 0.0) for mf in manifests),
                   setup_s=sum(mf["metrics"].get("setup_s", 0.0) for mf in manifests))
    if all("tokens_per_s" in mf["metrics"] for mf in manifests):  # a rate: tokens over the summed wall time
        metrics["tokens_per_s"] = len(manifests) / sum(1 / mf["metrics"]["tokens_per_s"] for mf in manifests)
    return write_model(build, job.out, name="checkpoint", producer="train", inputs=job.inputs, config=job.config,
                       extra={"metrics": metrics, "log_history": manifests[0].get("log_history", []),
                              "ensemble_members": [{"sha256": m.sha256, "path": str(m.path), "seed": cfg.seed + i,
                                                    "metrics": mf["metrics"]}
                                                   for i, (m, mf) in enumerate(zip(members, manifests))],
                              "base_model": {"ref": policy.ref, "sha256": policy.sha256},
                              "reference_model": {"ref": reference.ref, "sha256": reference.sha256}})
