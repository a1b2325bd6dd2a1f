"""The train stage: DPO-family preference optimisation of the policy on a pairs table, through TRL.

The stage owns data plumbing and checkpoints; the loss maths lives in TRL (and, for the paper methods, in
``losses.py``). Resumable: intermediate checkpoints go to a work directory named by the stage key, so a re-run
after a crash continues from the last one; the final model is written atomically as a model artifact.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from pipeline_lib.artifacts import ArtifactRef, read_manifest, read_table, ref_from_dir, write_model
from pipeline_lib.config import TrainConfig
from pipeline_lib.losses import LOSSES, MethodConfig
from pipeline_lib.models import ResolvedModel
from pipeline_lib.stage import done, output_dir


def pairs_dataset(pairs_df, method: MethodConfig):
    """TRL's standard (non-conversational) preference format; the prompt is already chat-rendered, and TRL appends
    the EOS token (the template's end-of-turn) to each completion. Plus the per-pair columns the loss needs:
    SPPO's win-probabilities, SAIL's on-policy flag (both responses sampled by the policy being trained)."""
    from datasets import Dataset

    data = {
        "prompt": pairs_df["prompt_text"].tolist(),
        "chosen": pairs_df["chosen"].tolist(),
        "rejected": pairs_df["rejected"].tolist(),
    }
    extra = {
        "chosen_winprob": lambda: pairs_df["chosen_winprob"].astype(float).tolist(),
        "rejected_winprob": lambda: pairs_df["rejected_winprob"].astype(float).tolist(),
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
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        save_only_model=False,
        report_to=[],
        precompute_ref_log_probs=True,  # one no-grad reference pass up front: no live reference model in the loop
        gradient_checkpointing=cfg.gradient_checkpointing,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def _total_steps(cfg: TrainConfig, n_pairs: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    per_step = cfg.batch_size * cfg.grad_accum
    return max(1, math.ceil(math.ceil(n_pairs / cfg.batch_size) / cfg.grad_accum * cfg.epochs)) if per_step else 1


def train(policy: ResolvedModel, pairs: ArtifactRef, cfg: TrainConfig, method: MethodConfig,
          work_dir: str | Path, reference: ResolvedModel | None = None, callbacks: list | None = None,
          on_log: Callable[[dict], None] | None = None, quiet: bool = False) -> ArtifactRef:
    """Train ``policy`` on ``pairs``. The reference log-probs come from ``reference`` (default: the policy itself,
    which in a round is also the behavior policy that sampled the pairs) in one no-grad pass before training.
    With ``cfg.ensemble = N > 1`` (BPO), N LoRA members are trained and averaged (see ``_train_ensemble``)."""
    reference = reference or policy
    config = {**cfg.model_dump(), "method": method.model_dump()}
    inputs = {"policy": policy.sha256, "pairs": pairs.sha256, "reference": reference.sha256}
    out = output_dir(work_dir, "train", inputs, config)
    if done(out):
        return ref_from_dir(out)
    if cfg.ensemble > 1:
        return _train_ensemble(policy, pairs, cfg, method, work_dir, reference, callbacks, on_log, quiet, out,
                               inputs, config)
    work = out.parent / f"{out.name}.work"  # stable across re-runs: holds resumable checkpoints
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
            if on_log and logs:
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
    log = [dict(r) for r in trainer.state.log_history]
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
