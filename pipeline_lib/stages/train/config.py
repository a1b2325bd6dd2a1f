"""The train stage's config section (``train:``). The method switches in it (loss, weighting, reference, optimizer,
and their option sections) are checked together with ``pairs.strategy`` by the method table (``methods.py``) when a
round config loads."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline_lib.methods import SailOptions, WpoOptions
from pipeline_lib.sections import Section


class TrainConfig(Section):
    # The method switches (ARCHITECTURE: orthogonal options); validated together with pairs.strategy.
    loss: Literal["dpo", "ipo", "hinge", "sppo", "sppo_single", "sppo_hard", "sail"] = "dpo"
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="dpo only: conservative DPO epsilon")
    weighting: Literal["none", "wpo"] = "none"
    wpo: WpoOptions = WpoOptions()
    reference: Literal["initial", "behavior"] = Field(
        "initial", description="initial: the campaign's first policy (fixed); behavior (BPO): the policy that "
                               "collected this round's data")
    optimizer: Literal["adamw", "rmsprop"] = "adamw"
    sail: SailOptions = SailOptions()
    beta: float = Field(0.1, gt=0)
    learning_rate: float = Field(5e-6, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="-1: use epochs")
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(512, ge=8)
    bf16: bool = Field(True, description="bf16 autocast (fast on CPUs with AVX512-BF16/AMX, and on GPUs)")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="weights dtype (bfloat16 halves memory "
                                                                         "for 7B+ policies on one GPU)")
    gradient_checkpointing: bool = Field(False, description="trade compute for activation memory (large models)")
    lora_r: int = Field(0, ge=0, description="LoRA rank; 0 = full fine-tuning")
    lora_alpha: int = Field(16, ge=1)
    ensemble: int = Field(1, ge=1, description="BPO: train N LoRA adapters (seeds seed..seed+N-1) on the same pairs "
                                               "and average their merged weights into the next policy")
    seed: int = 0
    num_processes: int = Field(1, ge=1, description="data-parallel training processes, one per GPU (on CPU: gloo "
                                                    "processes); >1 launches the trainer with torchrun; the batch "
                                                    "per step is batch_size x grad_accum x num_processes")
    deepspeed: str | None = Field(None, description="path to a DeepSpeed JSON config (ZeRO-1/2, e.g. "
                                                    "configs/deepspeed/zero2.json) for the trainer; needs a GPU")
    fsdp: bool = Field(False, description="FSDP2 (torch fully_shard): shard parameters, gradients and optimizer "
                                          "state over the training processes, one decoder layer at a time, for "
                                          "policies that do not fit one GPU; rank 0 gathers the full weights to "
                                          "save them. Needs num_processes x nnodes > 1")
    nnodes: int = Field(1, ge=1, description="hosts training together, num_processes each (torchrun --nnodes): "
                                             "the stage's host and nnodes-1 hosts running `python -m "
                                             "pipeline_lib.train_worker join` (docs/operations.md)")
    rdzv_endpoint: str = Field("", description="HOST:PORT of the c10d rendezvous (torchrun --rdzv-endpoint) "
                                               "when nnodes > 1; HOST is reachable from every training host")

    @model_validator(mode="after")
    def _ensemble_needs_lora(self) -> "TrainConfig":
        if self.ensemble > 1 and not self.lora_r:
            raise ValueError(f"train.ensemble={self.ensemble} averages LoRA adapters: set train.lora_r > 0 "
                             "(e.g. 8)")
        if (self.nnodes > 1) != bool(self.rdzv_endpoint):
            raise ValueError(f"train.nnodes={self.nnodes} and train.rdzv_endpoint={self.rdzv_endpoint!r}: several "
                             "hosts need a rendezvous endpoint (HOST:PORT) and an endpoint needs nnodes > 1")
        if self.fsdp:
            _check_fsdp(self)
        return self
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    save_steps: int = Field(0, ge=0, description="checkpoint every N steps for resume (0: only at the end)")

    def content_fingerprint(self) -> str | None:
        """For task cache keys: ``deepspeed`` says where the DeepSpeed config is, this says what it is."""
        from pipeline_lib.prompts.validate import content_fingerprint

        return content_fingerprint(self.deepspeed)


def _check_fsdp(cfg: TrainConfig) -> None:
    """What a sharded-parameter run cannot combine with, refused when the config loads rather than inside torchrun."""
    if cfg.num_processes * cfg.nnodes < 2:
        raise ValueError("train.fsdp=true shards the model over the training processes, and there is one: set "
                         "train.num_processes (per host) or train.nnodes so that there are at least 2")
    if cfg.deepspeed:
        raise ValueError(f"train.fsdp=true and train.deepspeed={cfg.deepspeed}: two sharding engines; choose one")
    if cfg.lora_r:
        raise ValueError(f"train.fsdp=true with train.lora_r={cfg.lora_r}: LoRA trains a small adapter that fits "
                         "every GPU; shard full fine-tuning only (set train.lora_r: 0, or train.fsdp: false)")
