"""The train stage's core: one TRL run of ``AlignTrainer`` on a pairs table, writing the model artifact.

``fit`` runs either in the stage's process (``train.num_processes: 1``) or in each of the data-parallel processes
that ``worker.launch`` starts with torchrun (``num_processes > 1`` or ``train.deepspeed``); there, rank 0 writes the
artifact and the stage reads it back. The stage around it (cache key, ensemble, dispatch): ``stages/train/__init__.py``.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipeline_lib.artifacts import ArtifactRef, read_table, write_model
from pipeline_lib.methods import LOSSES, MethodConfig
from pipeline_lib.models import ResolvedModel
from pipeline_lib.stages.train.config import TrainConfig


@dataclass(frozen=True)
class TrainJob:
    """One training as the stage resolved it: what every process that trains needs (the stage's own, or each
    torchrun rank: ``worker.py`` reads it back from ``to_spec``'s JSON). ``inputs`` and ``config`` are the stage's
    cache key, computed once by the stage, and go into the artifact ``out``'s manifest."""

    policy: ResolvedModel
    pairs: ArtifactRef
    cfg: TrainConfig
    method: MethodConfig
    reference: ResolvedModel
    out: Path
    inputs: dict
    config: dict
    quiet: bool = False

    def to_spec(self) -> dict:
        """The job as JSON-ready data, for the torchrun workers (``from_spec`` reads it back)."""
        return {"policy": vars(self.policy), "reference": vars(self.reference), "pairs": self.pairs.model_dump(),
                "train": self.cfg.model_dump(),
                # exclude_unset: MethodConfig rejects option sections set explicitly for a loss that ignores them
                "method": self.method.model_dump(exclude_unset=True),
                "out": str(self.out), "inputs": self.inputs, "config": self.config, "quiet": self.quiet}

    @classmethod
    def from_spec(cls, spec: dict) -> "TrainJob":
        return cls(ResolvedModel(**spec["policy"]), ArtifactRef(**spec["pairs"]), TrainConfig(**spec["train"]),
                   MethodConfig(**spec["method"]), ResolvedModel(**spec["reference"]), Path(spec["out"]),
                   spec["inputs"], spec["config"], spec["quiet"])


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
        **fsdp_args(cfg),
    )


def fsdp_args(cfg: TrainConfig) -> dict:
    """The Trainer's FSDP2 settings for ``train.fsdp``: every decoder layer (the model's ``_no_split_modules``) its
    own shard group, parameters resharded after each forward (ZeRO-3's memory profile), and a full state dict for
    the final save, gathered to rank 0 by ``gathered_state_dict``."""
    if not cfg.fsdp:
        return {}
    return {"fsdp": True, "fsdp_config": {"version": 2, "reshard_after_forward": True,
                                          "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                          "state_dict_type": "FULL_STATE_DICT"}}


def world_size(cfg: TrainConfig) -> int:
    return cfg.num_processes * cfg.nnodes


def _total_steps(cfg: TrainConfig, n_pairs: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    batches = math.ceil(n_pairs / (cfg.batch_size * world_size(cfg)))  # per process: the data is split N ways
    return max(1, math.ceil(batches / cfg.grad_accum * cfg.epochs))


def work_dir_of(out: Path) -> Path:
    return out.parent / f"{out.name}.work"  # stable across re-runs: holds resumable checkpoints


def fit(job: TrainJob, callbacks: list | None = None,
        on_log: Callable[[dict], None] | None = None) -> ArtifactRef | None:
    """The training core: one TRL run writing the model artifact ``job.out``. In a torchrun process group every rank
    calls it; rank 0 writes the artifact and relays its log rows to ``on_log``, the others return None."""
    policy, pairs, cfg, method, reference, out = job.policy, job.pairs, job.cfg, job.method, job.reference, job.out
    work = work_dir_of(out)
    work.mkdir(parents=True, exist_ok=True)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers import set_seed as transformers_set_seed
    from pipeline_lib.trainer import AlignTrainer

    if job.quiet:
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
    # FSDP leaves each rank a shard of every parameter: all ranks take part in gathering the full weights to rank 0
    full_state = gathered_state_dict(trainer) if cfg.fsdp else None
    held = local_parameter_share(trainer.model)
    if not trainer.is_world_process_zero():
        return None
    log = [dict(r) for r in trainer.state.log_history]
    check_finite(full_state.items() if full_state is not None else trainer.model.named_parameters(), log, cfg)
    n_tokens = _count_tokens(trainer.train_dataset) * args.num_train_epochs if cfg.max_steps <= 0 else None

    def build(tmp: Path) -> None:
        final = trainer.accelerator.unwrap_model(trainer.model) if full_state is not None else trainer.model
        if cfg.lora_r:  # a full checkpoint, so the next round's vLLM and trainer load it like any model
            final = final.merge_and_unload()
        final.generation_config.pad_token_id = tok.pad_token_id
        final.save_pretrained(tmp, safe_serialization=True, state_dict=full_state)
        tok.save_pretrained(tmp)

    metrics: dict[str, Any] = {
        "train_loss": float(result.training_loss),
        "train_s": train_s,
        "setup_s": setup_s,
        "steps": int(trainer.state.global_step),
        "n_pairs": len(pairs_df),
        "local_parameter_share": held,  # of the model's parameters, the share rank 0 held: 1/world under FSDP
    }
    if n_tokens:
        metrics["tokens_per_s"] = n_tokens / (setup_s + train_s)
    for key in ("rewards/margins", "rewards/accuracies", "loss", "wpo/weight"):
        vals = [r[key] for r in log if key in r]
        if vals:
            metrics[f"last_{key.replace('/', '_')}"] = float(vals[-1])
    ref = write_model(build, out, name="checkpoint", producer="train", inputs=job.inputs, config=job.config,
                      extra={"metrics": metrics, "log_history": log,
                             "base_model": {"ref": policy.ref, "sha256": policy.sha256},
                             "reference_model": {"ref": reference.ref, "sha256": reference.sha256}})
    shutil.rmtree(work, ignore_errors=True)
    return ref


class TrainingDivergedError(ValueError):
    """Training produced non-finite weights or losses: nothing is saved or registered, and retrying the same config
    cannot help (a ValueError, so the task does not retry it)."""


def gathered_state_dict(trainer) -> dict:
    """The full weights of an FSDP-sharded model, on CPU in rank 0 (empty on the other ranks); a collective: every
    rank must call it. A tied parameter (e.g. the LM head sharing the embedding) is kept under its first name only,
    as ``save_pretrained`` does for an unsharded model: the gathered copies are separate tensors, so it could not
    tell they are one."""
    state = trainer.accelerator.get_state_dict(trainer.model)
    seen: set[int] = set()
    for name, param in trainer.model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            state.pop(name, None)
        seen.add(id(param))
    return state


def local_parameter_share(model) -> float:
    """The share of the model's parameter elements this process holds: 1.0 for a whole copy (DDP, one process),
    about 1/N for FSDP over N processes (shards of a DTensor; padding aside)."""
    local = full = 0
    for p in model.parameters():
        local += p.to_local().numel() if hasattr(p, "to_local") else p.numel()
        full += p.numel()  # a DTensor's numel is the full tensor's
    return local / full if full else 1.0


def check_finite(named_params, log: list[dict], cfg: TrainConfig) -> None:
    """Refuse a run whose logged losses or trained weights are not all finite, before anything is written.
    (lr = 1e30 passes every config bound and turned all 426,624 weights of the tiny model into NaN in 2 steps.)"""
    import torch

    bad_rows = [r for r in log if any(isinstance(r.get(k), float) and not math.isfinite(r[k])
                                      for k in ("loss", "grad_norm", "train_loss"))]
    n_bad = n_all = 0
    first = ""
    with torch.no_grad():
        for name, p in named_params:
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


def _count_tokens(ds) -> int:
    cols = ds.column_names
    if not {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(cols):
        return 0
    return int(sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"],
                                                                      ds["rejected_ids"])))
