"""The train stage: DPO-family preference optimisation of the policy on a pairs table, through TRL.

The stage owns data plumbing and checkpoints; the loss maths lives in TRL (and, for the paper methods, in
``losses.py``). Resumable: intermediate checkpoints go to a work directory named by the stage key, so a re-run
after a crash continues from the last one; the final model is written atomically as a model artifact.

One training core, ``fit``, runs either in this process (``train.num_processes: 1``) or in each of the data-parallel
processes that ``train_worker.launch`` starts with torchrun (``num_processes > 1`` or ``train.deepspeed``); there,
rank 0 writes the artifact and this process reads it back.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from pipeline_lib.artifacts import ArtifactRef, read_manifest, read_table, ref_from_dir, sha256_file, write_model
from pipeline_lib.config import TrainConfig
from pipeline_lib.methods import LOSSES, MethodConfig
from pipeline_lib.models import ResolvedModel
from pipeline_lib.stage import done, output_dir
from pipeline_lib.train_worker import launch


def pairs_dataset(pairs_df, method: MethodConfig):
    """TRL's standard (non-conversational) preference format; the prompt is already chat-rendered, and TRL appends
    the EOS token (the template's end-of-turn) to each completion. Plus the per-pair columns the loss needs:
    SPPO's win-probabilities (per response, and P(chosen > rejected) for sppo_single), SAIL's on-policy flag (both
    responses sampled by the policy being trained)."""
    from datasets import Dataset

    data = {
        "prompt": pairs_df["prompt_text"].tolist(),
        "chosen": pairs_df["chosen"].tolist(),
        "rejected": pairs_df["rejected"].tolist(),
    }
    extra = {
        "chosen_winprob": lambda: pairs_df["chosen_winprob"].astype(float).tolist(),
        "rejected_winprob": lambda: pairs_df["rejected_winprob"].astype(float).tolist(),
        "pair_winprob": lambda: pairs_df["pair_winprob"].astype(float).tolist(),
        "on_policy": lambda: ((pairs_df["chosen_response_source"] == "on_policy")
                              & (pairs_df["rejected_response_source"] == "on_policy")).tolist(),
    }
    for col in LOSSES[method.loss].columns:
        data[col] = extra[col]()
    return Dataset.from_dict(data)


def _last_checkpoint(work: Path) -> str | None:
    """The newest complete checkpoint: the Trainer writes trainer_state.json last, so a kill during a save leaves a
    directory without it, which must not be resumed from."""
    ckpts = sorted((p for p in work.glob("checkpoint-*") if (p / "trainer_state.json").is_file()),
                   key=lambda p: int(p.name.split("-")[-1]))
    return str(ckpts[-1]) if ckpts else None


def dpo_args(cfg: TrainConfig, work: Path, n_pairs: int):
    import torch
    from trl import DPOConfig

    return DPOConfig(
        output_dir=str(work),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        warmup_steps=math.ceil(cfg.warmup_ratio * _total_steps(cfg, n_pairs)),
        beta=cfg.beta,
        max_length=cfg.max_length,
        bf16=cfg.bf16,
        use_cpu=not torch.cuda.is_available(),
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=1,
        # the Trainer's default replaces a NaN/inf step loss in its logs by the running mean: a diverged run logged
        # "loss 0.0" (issue 22); log what the loss was, and refuse the run below
        logging_nan_inf_filter=False,
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        # resume needs only the last complete checkpoint; two, in case a kill cut the newest one short (the Trainer
        # deletes older ones only after a save completes). Without a limit, save_steps=1 kept one per step.
        save_total_limit=2,
        save_only_model=False,
        report_to=[],
        precompute_ref_log_probs=True,  # one no-grad reference pass up front: no live reference model in the loop
        gradient_checkpointing=cfg.gradient_checkpointing,
        dataloader_num_workers=0,
        disable_tqdm=True,
        # several CPU processes (torchrun without GPUs) talk over gloo; NCCL, the GPU default, needs CUDA
        ddp_backend="gloo" if world_size(cfg) > 1 and not torch.cuda.is_available() else None,
        deepspeed=cfg.deepspeed,
    )


def world_size(cfg: TrainConfig) -> int:
    return cfg.num_processes * cfg.nnodes


def _total_steps(cfg: TrainConfig, n_pairs: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    batches = math.ceil(n_pairs / (cfg.batch_size * world_size(cfg)))  # per process: the data is split N ways
    return max(1, math.ceil(batches / cfg.grad_accum * cfg.epochs))


def train(policy: ResolvedModel, pairs: ArtifactRef, cfg: TrainConfig, method: MethodConfig,
          work_dir: str | Path, reference: ResolvedModel | None = None, callbacks: list | None = None,
          on_log: Callable[[dict], None] | None = None, quiet: bool = False) -> ArtifactRef:
    """Train ``policy`` on ``pairs``. The reference log-probs come from ``reference`` (default: the policy itself,
    which in a round is also the behavior policy that sampled the pairs) in one no-grad pass before training.
    With ``cfg.ensemble = N > 1`` (BPO), N LoRA members are trained and averaged (see ``_train_ensemble``). With
    ``cfg.num_processes > 1`` or ``cfg.deepspeed``, ``fit`` runs in a torchrun process group (``train_worker``), whose
    rank 0's log rows reach ``on_log``; ``callbacks`` then cannot be used."""
    reference = reference or policy
    config = {**cfg.model_dump(), "method": method.model_dump()}
    inputs = {"policy": policy.sha256, "pairs": pairs.sha256, "reference": reference.sha256}
    if cfg.deepspeed:  # the file's content (ZeRO stage, clipping, precision) shapes the result: key it, not the path
        inputs["deepspeed"] = _check_deepspeed(cfg.deepspeed)
    out = output_dir(work_dir, "train", inputs, config)
    if done(out):
        return ref_from_dir(out)
    if cfg.ensemble > 1:
        return _train_ensemble(policy, pairs, cfg, method, work_dir, reference, callbacks, on_log, quiet, out,
                               inputs, config)
    if world_size(cfg) == 1 and not cfg.deepspeed:
        try:
            return fit(policy, pairs, cfg, method, reference, out, inputs, config, callbacks, on_log, quiet)
        finally:
            release_memory()
    if callbacks:
        raise ValueError(f"train.num_processes={cfg.num_processes}: trainer callbacks run inside the trainer's "
                         "processes and cannot be sent there; use on_log (rank 0's log rows are relayed)")
    spec = {"policy": vars(policy), "reference": vars(reference), "pairs": pairs.model_dump(),
            "train": cfg.model_dump(),
            # exclude_unset: MethodConfig rejects option sections set explicitly for a loss that ignores them
            "method": method.model_dump(exclude_unset=True),
            "out": str(out), "inputs": inputs, "config": config, "quiet": quiet}
    launch(spec, cfg.num_processes, _work_dir(out), on_log, quiet, nnodes=cfg.nnodes, rdzv_endpoint=cfg.rdzv_endpoint,
           work_dir=work_dir)
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


def _work_dir(out: Path) -> Path:
    return out.parent / f"{out.name}.work"  # stable across re-runs: holds resumable checkpoints


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
                         "weights on rank 0); use stage 1 or 2")
    if not torch.cuda.is_available():
        raise ValueError(f"train.deepspeed={path}: DeepSpeed needs a GPU and none is visible; unset train.deepspeed "
                         "(train.num_processes > 1 alone trains with gloo processes on CPU)")
    return sha256_file(p)


def fit(policy: ResolvedModel, pairs: ArtifactRef, cfg: TrainConfig, method: MethodConfig, reference: ResolvedModel,
        out: Path, inputs: dict, config: dict, callbacks: list | None = None,
        on_log: Callable[[dict], None] | None = None, quiet: bool = False) -> ArtifactRef | None:
    """The training core: one TRL run writing the model artifact ``out``. In a torchrun process group every rank
    calls it; rank 0 writes the artifact and relays its log rows to ``on_log``, the others return None."""
    work = _work_dir(out)
    work.mkdir(parents=True, exist_ok=True)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers import set_seed as transformers_set_seed
    from pipeline_lib.trainer import AlignTrainer

    if quiet:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.logging.set_verbosity_error()
    pairs_df = read_table(pairs)
    tok = AutoTokenizer.from_pretrained(policy.path)
    transformers_set_seed(cfg.seed)  # before PEFT wraps the model: the LoRA initialisation follows train.seed
    model = AutoModelForCausalLM.from_pretrained(policy.path, dtype=getattr(torch, cfg.dtype))
    args = dpo_args(cfg, work, len(pairs_df))

    class _Relay(TrainerCallback):
        def on_log(self, a, state, control, logs=None, **kw):
            if on_log and logs and state.is_world_process_zero:  # every rank logs the same (gathered) rows
                on_log({"step": state.global_step, "max_steps": state.max_steps, **logs})

    ref_model = None
    if reference.sha256 != policy.sha256:  # e.g. the campaign's initial model while training round k's policy
        ref_model = AutoModelForCausalLM.from_pretrained(reference.path, dtype=getattr(torch, cfg.dtype))
    peft_config = None
    if cfg.lora_r:
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    t_setup = time.perf_counter()  # tokenisation and the one reference pass happen while the trainer is built
    trainer = AlignTrainer(model=model, ref_model=ref_model, args=args, train_dataset=pairs_dataset(pairs_df, method),
                           processing_class=tok, method=method, callbacks=[_Relay(), *(callbacks or [])],
                           peft_config=peft_config)
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # progress goes through on_log (quiet in CI), not raw log dicts
    t0 = time.perf_counter()
    setup_s = t0 - t_setup
    result = trainer.train(resume_from_checkpoint=_last_checkpoint(work))
    train_s = time.perf_counter() - t0
    if not trainer.is_world_process_zero():
        return None
    log = [dict(r) for r in trainer.state.log_history]
    check_finite(trainer.model, log, cfg)
    n_tokens = _count_tokens(trainer.train_dataset) * args.num_train_epochs if cfg.max_steps <= 0 else None

    def build(tmp: Path) -> None:
        final = trainer.model
        if cfg.lora_r:  # a full checkpoint, so the next round's vLLM and trainer load it like any model
            final = final.merge_and_unload()
        final.generation_config.pad_token_id = tok.pad_token_id
        final.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    metrics: dict[str, Any] = {
        "train_loss": float(result.training_loss),
        "train_s": train_s,
        "setup_s": setup_s,
        "steps": int(trainer.state.global_step),
        "n_pairs": len(pairs_df),
    }
    if n_tokens:
        metrics["tokens_per_s"] = n_tokens / (setup_s + train_s)
    for key in ("rewards/margins", "rewards/accuracies", "loss", "wpo/weight"):
        vals = [r[key] for r in log if key in r]
        if vals:
            metrics[f"last_{key.replace('/', '_')}"] = float(vals[-1])
    ref = write_model(build, out, name="checkpoint", producer="train", inputs=inputs, config=config,
                      extra={"metrics": metrics, "log_history": log,
                             "base_model": {"ref": policy.ref, "sha256": policy.sha256},
                             "reference_model": {"ref": reference.ref, "sha256": reference.sha256}})
    shutil.rmtree(work, ignore_errors=True)
    return ref


class TrainingDivergedError(ValueError):
    """Training produced non-finite weights or losses: nothing is saved or registered, and retrying the same config
    cannot help (a ValueError, so the task does not retry it)."""


def check_finite(model, log: list[dict], cfg: TrainConfig) -> None:
    """Refuse a run whose logged losses or trained weights are not all finite, before anything is written.
    (lr = 1e30 passes every config bound and turned all 426,624 weights of the tiny model into NaN in 2 steps.)"""
    import torch

    bad_rows = [r for r in log if any(isinstance(r.get(k), float) and not math.isfinite(r[k])
                                      for k in ("loss", "grad_norm", "train_loss"))]
    n_bad = n_all = 0
    first = ""
    with torch.no_grad():
        for name, p in model.named_parameters():
            k = int((~torch.isfinite(p)).sum())
            n_bad, n_all = n_bad + k, n_all + p.numel()
            first = first or (name if k else "")
    if not n_bad and not bad_rows:
        return
    where = (f"{n_bad:,} of {n_all:,} weights are not finite (first: {first})" if n_bad
             else "the weights are finite")
    loss = (f"loss {bad_rows[0].get('loss')} at step {bad_rows[0].get('step', '?')}" if bad_rows
            else "every logged loss finite")
    raise TrainingDivergedError(
        f"train: training diverged: {where}; {loss}; nothing saved or registered. Lower train.learning_rate "
        f"({cfg.learning_rate:g}) or train.beta ({cfg.beta:g})")


def _train_ensemble(policy, pairs, cfg, method, work_dir, reference, callbacks, on_log, quiet, out, inputs,
                    config) -> ArtifactRef:
    """BPO's ensemble (Xu et al. 2024, "BPO", §4): N LoRA adapters trained on the same pairs from different seeds
    (initialisation and data order), merged into the base and averaged uniformly. Each member is merged before
    averaging, so the result is W0 + mean_i(B_i A_i · alpha/r): the mean of the adapters' weight deltas (averaging
    the A and B factors separately would not be). Members are ordinary train artifacts, each cached, so a crash
    during member k re-runs only from member k."""
    import torch
    from safetensors.torch import load_file, save_file

    members = []
    for i in range(cfg.ensemble):
        member_cfg = cfg.model_copy(update={"ensemble": 1, "seed": cfg.seed + i})
        members.append(train(policy, pairs, member_cfg, method, work_dir, reference, callbacks,
                             (lambda row, i=i: on_log({**row, "ensemble_member": i})) if on_log else None, quiet))
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
    return write_model(build, out, name="checkpoint", producer="train", inputs=inputs, config=config,
                       extra={"metrics": metrics, "log_history": manifests[0].get("log_history", []),
                              "ensemble_members": [{"sha256": m.sha256, "path": str(m.path), "seed": cfg.seed + i,
                                                    "metrics": mf["metrics"]}
                                                   for i, (m, mf) in enumerate(zip(members, manifests))],
                              "base_model": {"ref": policy.ref, "sha256": policy.sha256},
                              "reference_model": {"ref": reference.ref, "sha256": reference.sha256}})


def _count_tokens(ds) -> int:
    cols = ds.column_names
    if not {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(cols):
        return 0
    return int(sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"],
                                                                      ds["rejected_ids"])))
