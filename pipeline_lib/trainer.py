"""``AlignTrainer``: TRL's DPOTrainer with its loss maths replaced by ``losses.py`` and log-probs by ``logprobs.py``.

TRL keeps what it does well: tokenising the pairs, the collator, PEFT handling, the training loop, checkpoints. This
subclass overrides the per-batch loss (``_compute_loss``), the reference pre-computation (run in the first epoch's
batches, see ``_precompute_in_train_order``) and its log-prob producer (``compute_ref_log_probs``), the LM head
(``fused_head.py``: TRL's arithmetic, faster on CPU), the optimiser choice, the columns that survive to the
collator, and evaluation (loss only). In bf16 it trains bit for bit as stock DPOTrainer does with the same seed
(tests/unit/test_trainer.py), only faster.

Reference log-probs. The trainer is agnostic about *which* model is the reference; the stage decides and hands
over either columns or a model:
- a dataset that already carries ``ref_chosen_logps`` / ``ref_rejected_logps`` (sums over the completion tokens as
  this trainer tokenises them, EOS included) is used as is; no reference model is loaded or kept;
- else ``DPOConfig(precompute_ref_log_probs=True)`` computes those columns once, in a no-grad pass at start-up, from
  ``ref_model`` if given, else from the policy as it is before the first step (our pass, in the training batches);
- else ``ref_model`` runs live every step (the invariance tests show all three give the same loss and gradient).
In a round whose pairs were sampled by the policy being trained, the model at start-up *is* the behavior policy, so
``reference: behavior`` (BPO) is the default pre-computation with no ``ref_model``, and ``reference: initial`` means
passing the campaign's fixed starting model as ``ref_model`` (or its columns). Pairs sampled by another model (older
rounds, mixtures) need that model, or its columns, for ``behavior``.

Use (the train stage)::

    trainer = AlignTrainer(model=model, ref_model=None, args=DPOConfig(..., precompute_ref_log_probs=True),
                           train_dataset=ds, processing_class=tok, method=MethodConfig(loss="dpo", weighting="wpo"),
                           callbacks=[...])
    trainer.train()

``ds`` has TRL's columns (``prompt``, ``chosen``, ``rejected``) plus what ``LOSSES[method.loss].columns`` names
(``sppo``: ``chosen_winprob``/``rejected_winprob``; ``sppo_single``: ``pair_winprob``; ``sail``: ``on_policy``, True
where both responses were sampled by the policy being trained) and, optionally, ``ref_chosen_logps``/``ref_rejected_logps``.

Config keys that TRL would read for its own loss (``loss_type``, ``use_weighting``, ``label_smoothing``, ``ld_alpha``,
``f_divergence_type``) must stay at their defaults: the method lives in ``MethodConfig``, and a second setting would
be silently ignored otherwise. ``DPOConfig.beta`` is the β of every loss.

Logged (through Trainer.log, averaged per logging step): loss, rewards/{chosen,rejected,margins,accuracies} —
β·(summed log-ratio) for every loss, as TRL logs them, also for ipo whose loss uses length-averaged ratios —,
logps/{chosen,rejected}, wpo/weight (mean pair weight) and the loss's own extras (sail/*).

Not supported (clear errors): vision datasets, MoE router auxiliary losses, prompt-learning PEFT.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import is_peft_model
from transformers import Trainer
from transformers.training_args import OptimizerNames
from trl import DPOConfig, DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.dpo_trainer import DataCollatorForPreference

from pipeline_lib.fused_head import add_fast_fused_head, fused_outputs
from pipeline_lib.logprobs import SeqLogps, completion_logps, sequence_sums
from pipeline_lib.losses import reward_metrics, wpo_pair_weight
from pipeline_lib.methods import LOSSES, MethodConfig

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
_ROW = "_alignflow_row"  # dataset row index carried through the collator by the reference pass
_OPTIMIZERS = {"adamw": OptimizerNames.ADAMW_TORCH, "rmsprop": OptimizerNames.RMSPROP}
# TRL DPOConfig fields that select TRL's own loss maths; they must keep these defaults under AlignTrainer
_TRL_LOSS_DEFAULTS = {"loss_type": ["sigmoid"], "use_weighting": False, "label_smoothing": 0.0, "ld_alpha": None,
                      "f_divergence_type": "reverse_kl", "loss_weights": None}


@dataclass
class PreferenceCollator(DataCollatorForPreference):
    """TRL's preference collator, plus per-example scalar columns the loss needs (e.g. win-probabilities)."""

    extra_columns: tuple[str, ...] = ()

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        out = super().torch_call(examples)
        for col in self.extra_columns:
            values = [ex[col] for ex in examples]
            dtype = torch.bool if isinstance(values[0], bool) else torch.float32
            out[col] = torch.tensor(values, dtype=dtype)
        return out


class _RowCollator:
    """Wraps a collator: collates the examples without ``_ROW`` and returns their row indices under ``_ROW``."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        out = self.collator([{k: v for k, v in ex.items() if k != _ROW} for ex in examples])
        out[_ROW] = torch.tensor([ex[_ROW] for ex in examples], dtype=torch.long)
        return out


def _check_dataset(ds, name: str, method: MethodConfig) -> bool:
    """Validate the columns a method needs; return whether reference log-probs are present."""
    cols = set(getattr(ds, "column_names", None) or [])
    if not cols:
        return False
    for col in LOSSES[method.loss].columns:
        if col not in cols:
            raise ValueError(f"{name}: loss {method.loss!r} needs the column {col!r}, which the dataset lacks")
    present = [c for c in REF_COLUMNS if c in cols]
    if len(present) == 1:
        raise ValueError(f"{name}: has {present[0]!r} but not its pair; give both {REF_COLUMNS} or neither")
    return len(present) == 2


class AlignTrainer(DPOTrainer):
    """DPO-family trainer whose loss is ``LOSSES[method.loss]`` (see module docstring for the reference modes)."""

    _tag_names = ["trl", "dpo", "alignflow"]

    def __init__(self, model, ref_model=None, args: DPOConfig | None = None, train_dataset=None,
                 processing_class=None, *, method: MethodConfig | None = None, eval_dataset=None,
                 data_collator=None, callbacks=None, optimizers=(None, None), peft_config=None):
        if args is None:
            raise ValueError("args: a trl.DPOConfig is required")
        for key, default in _TRL_LOSS_DEFAULTS.items():
            if getattr(args, key) != default:
                raise ValueError(f"DPOConfig.{key}={getattr(args, key)!r}: AlignTrainer takes the method from "
                                 f"MethodConfig (loss, weighting, label_smoothing); leave {key} at {default!r}")
        self.method = method = method or MethodConfig()
        self.loss_spec = LOSSES[method.loss]
        if train_dataset is None:
            raise ValueError("train_dataset is required")
        has_ref = _check_dataset(train_dataset, "train_dataset", method)
        evals = eval_dataset if isinstance(eval_dataset, dict) else {"eval_dataset": eval_dataset}
        for name, ds in evals.items():
            if ds is not None and _check_dataset(ds, name, method) != has_ref:
                raise ValueError(f"{name}: reference columns {REF_COLUMNS} must be present in all datasets or none")
        if has_ref and not args.precompute_ref_log_probs:
            args = copy.copy(args)  # the columns are the precomputed reference: no reference model to load
            args.precompute_ref_log_probs = True
        if data_collator is None:
            tok = getattr(processing_class, "tokenizer", processing_class)
            if tok is None:
                raise ValueError("processing_class: a tokenizer is required")
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            data_collator = PreferenceCollator(pad_token_id=tok.pad_token_id, max_length=args.max_length,
                                               truncation_mode=args.truncation_mode,
                                               pad_to_multiple_of=args.pad_to_multiple_of,
                                               extra_columns=self.loss_spec.columns)
        super().__init__(model=model, ref_model=ref_model, args=args, data_collator=data_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
                         callbacks=callbacks, optimizers=optimizers, peft_config=peft_config)
        self._install_fused_heads()
        if self._is_vision_dataset:
            raise ValueError("train_dataset: vision datasets are not supported by AlignTrainer")
        if self.aux_loss_enabled:
            raise ValueError("MoE router auxiliary loss is not supported by AlignTrainer; set router_aux_loss_coef=0")
        # method.optimizer is authoritative; an explicit `optimizers=` tuple still wins, as in Trainer
        if optimizers[0] is None and not str(getattr(self.args.optim, "value", self.args.optim)).startswith(
                method.optimizer):
            opt_args = copy.copy(self.args)
            opt_args.optim = _OPTIMIZERS[method.optimizer]
            self.optimizer_cls_and_kwargs = Trainer.get_optimizer_cls_and_kwargs(opt_args, self.model)

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if self.args.fsdp and not self.is_fsdp_enabled:
            _enable_fsdp_on_cpu(self)

    # -- data plumbing ----------------------------------------------------------------------------------------------
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *self.loss_spec.columns]))

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        self._install_fused_heads()  # DPOTrainer.__init__ runs this pass before our __init__ resumes
        if set(REF_COLUMNS) <= set(dataset.column_names):  # supplied by the stage (e.g. the behavior policy)
            for col in REF_COLUMNS:
                values = torch.tensor([float("nan") if v is None else v for v in dataset[col]], dtype=torch.float64)
                bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
                if bad:
                    raise ValueError(f"{name} dataset: column {col!r} is missing or not finite at rows {bad[:5]}")
            return dataset
        if name == "train" and self.args.precompute_ref_batch_size in (None, self.args.per_device_train_batch_size):
            return self._precompute_in_train_order(dataset)
        if self.accelerator.num_processes > 1 and not dataset.cache_files:
            # TRL's pass gathers the columns on every rank, but only rank 0 writes them, to a cache file beside the
            # dataset's own, which all ranks then read. An in-memory dataset (ours) has no such home: its cache file
            # would land in a per-process temp directory, unreadable by the other ranks. Give it one they share.
            from datasets import load_from_disk

            home = Path(self.args.output_dir) / f"ref-logps-{name}"
            if self.accelerator.is_main_process:
                shutil.rmtree(home, ignore_errors=True)
                dataset.save_to_disk(str(home))
            self.accelerator.wait_for_everyone()
            dataset = load_from_disk(str(home))
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def _precompute_in_train_order(self, dataset):
        """Reference log-probs for the training rows, computed batch by batch in the order and batch shapes of the
        first training epoch (the trainer's own dataloader: same sampler, seed, batch size and sharding).

        Why not TRL's sequential pass: a live reference (stock DPOTrainer) runs the same forward as the policy on the
        same padded batch, so at step 1 its log-ratios are exactly 0. A pass over other batches pads to other lengths,
        and in bf16 matmuls of other shapes round differently (~1e-3 nats per sequence here); those log-ratios are
        then noise that the loss amplifies step after step (measured: 0.0165 loss drift after 12 bf16 steps on
        SmolLM2, vs 3e-6 in fp32). In the training batches' shapes, epoch 1 sees exactly the reference a live model
        would give (step-1 loss = ln 2 bit for bit); later epochs reshuffle, as any precomputed reference must.
        Every rank computes its own batches and all ranks gather every row, so no shared cache file is needed."""
        rows = dataset.add_column(_ROW, list(range(len(dataset))))
        saved = self.data_collator, self.args.remove_unused_columns
        self.data_collator = _RowCollator(self.data_collator)
        self.args.remove_unused_columns = False  # keep the row index; the collator reads only the columns it knows
        try:
            loader = self._get_dataloader(dataset=rows, description="Reference", batch_size=self._train_batch_size,
                                          sampler_fn=self._get_train_sampler, is_training=True)
        finally:
            self.data_collator, self.args.remove_unused_columns = saved
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(0)  # what the training loop does before epoch 1
        model = self._precompute_model()
        n = len(dataset)
        values = torch.full((n, 2), float("nan"), dtype=torch.float64)
        got_rows, got_values = [], []
        for batch in loader:
            row = batch.pop(_ROW)
            chosen, rejected = self.compute_ref_log_probs(model, batch)
            got_rows.append(row.to(self.accelerator.device))
            got_values.append(torch.stack([chosen, rejected], dim=1).float())
        if got_rows:
            # plain gather (not gather_for_metrics, which would drop the tail): a row that even_batches repeats to
            # fill the last batch on another rank appears twice; either value is a valid reference for it
            row_all = self.accelerator.gather(torch.cat(got_rows)).cpu()
            values[row_all] = self.accelerator.gather(torch.cat(got_values)).cpu().double()
        missing = (~torch.isfinite(values[:, 0])).nonzero().flatten()
        if len(missing):  # rows the first epoch never shows (dataloader_drop_last): every rank scores them alike
            collator = self.data_collator
            for start in range(0, len(missing), self._train_batch_size):
                idx = missing[start:start + self._train_batch_size].tolist()
                batch = collator([dataset[i] for i in idx])
                batch = {k: v.to(self.accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                values[idx] = torch.stack(self.compute_ref_log_probs(model, batch), dim=1).cpu().double()
        return dataset.add_column(REF_COLUMNS[0], values[:, 0].tolist()) \
            .add_column(REF_COLUMNS[1], values[:, 1].tolist())

    def _precompute_model(self):
        """The model TRL's pre-computation would run: ``ref_model``, else the policy (under DeepSpeed, the policy in
        an inference engine built once, since training has not yet placed or gathered its parameters)."""
        if self.ref_model is None and self.is_deepspeed_enabled:
            from trl.models import prepare_deepspeed

            if self._precompute_engine is None:
                self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
            return self._precompute_engine
        return self.ref_model or self.model

    # -- log-probs --------------------------------------------------------------------------------------------------
    def _install_fused_heads(self) -> None:
        """Give the policy and the reference the fused LM head (``fused_head.py``: TRL's arithmetic, faster on CPU)
        with only the per-token fields our losses read.

        DPOTrainer.__init__ already patches them with TRL's head, asking for entropy, mean logit and top-1 flags (its
        own metrics, not ours): each costs a pass over the vocabulary per token. Patching again on top (the new
        forward calls the backbone itself) drops those; ``log_sum_sq_probs`` is asked for only where WPO's sampled
        alignment uses it.
        WPO's greedy alignment needs the max logit, which the head does not return: then no model gets the mark and
        policy and reference are both scored from logits (one arithmetic for both). Runs before the reference
        pre-computation, so the reference and the policy use the same head."""
        if getattr(self, "_fused_installed", False):
            return
        self._fused_installed = True
        method = self.method
        alignment = method.wpo.alignment if method.weighting == "wpo" else None
        if alignment == "greedy":
            return
        policy = self.model.get_base_model() if is_peft_model(self.model) else self.model
        add_fast_fused_head(policy, ("log_probs", "log_sum_sq_probs") if alignment == "sampled" else ("log_probs",))
        if self.ref_model is not None:
            add_fast_fused_head(self.ref_model, ("log_probs",))

    def _sequence_logps(self, model, inputs: dict, wpo_alignment: str | None = None) -> SeqLogps:
        """Per-sequence completion log-probs of ``model`` on a padded batch.

        Through the fused LM head when ``model`` has one (the trainer's own models): no B×T×V logits are built,
        and the arithmetic is exactly stock DPOTrainer's, so in bf16 our training follows TRL's trajectory bit for
        bit instead of drifting apart by rounding noise that Adam's sign-like first steps amplify. Else (any other
        model, or WPO's greedy alignment: see ``_install_fused_heads``) from the logits, via ``completion_logps``;
        the two agree to float precision."""
        kwargs = {k: inputs[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in inputs}
        completion_mask = inputs["completion_mask"]
        fields = fused_outputs(self.accelerator.unwrap_model(model))
        if "log_probs" in fields and (wpo_alignment is None or "log_sum_sq_probs" in fields):
            labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
            out = model(**kwargs, labels=labels, fused_lm_head=True)
            align_bt = None
            if wpo_alignment == "sampled":  # log π(y_t) − log Σ_v π(v)²  (WPO Eq. 2, sampled alignment)
                align_bt = out.log_probs.detach() - out.log_sum_sq_probs
            # position t scores token t+1 (T−1 positions), zero where the label is masked
            return sequence_sums(out.log_probs, completion_mask[:, 1:], align_bt)
        logits_btv = model(**kwargs, use_cache=False).logits
        return completion_logps(logits_btv, inputs["input_ids"], completion_mask, wpo_alignment=wpo_alignment)

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-prob sums (chosen, rejected) for one padded batch; TRL's pre-computation calls this."""
        adapter = contextlib.nullcontext()
        if self.ref_model is None and hasattr(self.accelerator.unwrap_model(self.model), "peft_config"):
            from trl.trainer.utils import use_adapter

            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        with (torch.no_grad(), adapter, self.accelerator.autocast(),
              disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs)):
            sum_seq = self._sequence_logps(model, inputs).sum_seq
        return sum_seq.chunk(2, dim=0)

    # -- loss -------------------------------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        method, spec = self.method, self.loss_spec
        alignment = method.wpo.alignment if method.weighting == "wpo" else None
        seq = self._sequence_logps(model, inputs, wpo_alignment=alignment)
        if REF_COLUMNS[0] in inputs:
            ref_sum_seq = torch.cat([inputs[REF_COLUMNS[0]], inputs[REF_COLUMNS[1]]]).to(seq.sum_seq)
        else:
            ref_sum_seq = torch.cat(self.compute_ref_log_probs(
                self.ref_model if self.ref_model is not None else self.model, inputs)).float()
        if spec.aggregation == "mean":
            policy_seq, ref_seq = seq.mean_seq, ref_sum_seq / seq.n_tokens_seq.clamp(min=1)
        else:
            policy_seq, ref_seq = seq.sum_seq, ref_sum_seq
        policy_chosen_seq, policy_rejected_seq = policy_seq.chunk(2)
        ref_chosen_seq, ref_rejected_seq = ref_seq.chunk(2)
        extras = {col: inputs[col].to(policy_seq.device) for col in spec.columns}
        loss_b, metrics = spec.fn(policy_chosen_seq, policy_rejected_seq, ref_chosen_seq, ref_rejected_seq,
                                  beta=self.beta, **method.loss_kwargs(), **extras)
        if alignment is not None:
            log_w_chosen_seq, log_w_rejected_seq = seq.wpo_log_weight_seq.chunk(2)
            weight_b = wpo_pair_weight(log_w_chosen_seq, log_w_rejected_seq, clamp=method.wpo.clamp)
            loss_b = loss_b * weight_b
            metrics["wpo/weight"] = weight_b
        loss = loss_b.mean()
        # rewards/* from summed log-ratios for every loss (as TRL logs them), so runs compare across methods
        sum_chosen_seq, sum_rejected_seq = seq.sum_seq.detach().chunk(2)
        ref_sum_chosen_seq, ref_sum_rejected_seq = ref_sum_seq.chunk(2)
        metrics.update(reward_metrics(self.beta, sum_chosen_seq - ref_sum_chosen_seq,
                                      sum_rejected_seq - ref_sum_rejected_seq))
        metrics["logps/chosen"], metrics["logps/rejected"] = sum_chosen_seq, sum_rejected_seq
        for key, value_b in metrics.items():
            self._metrics[mode][key].append(self.accelerator.gather_for_metrics(value_b.float()).mean().item())
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation reports the loss and the logged metrics; no logits are returned (none are needed)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


def _enable_fsdp_on_cpu(trainer) -> None:
    """FSDP2 over gloo on CPU processes (``train.fsdp`` without a GPU, e.g. CI's test of the sharded mode).

    accelerate turns FSDP on only for accelerator devices and otherwise falls back silently to DDP: the run would
    train with whole copies while its config says sharded. torch's ``fully_shard`` itself runs on CPU tensors over
    gloo, so set the accelerator state that accelerate would have set on a GPU (distributed type FSDP, the plugin
    built from the same arguments, its mixed-precision policy); from there the Trainer, TRL and accelerate take the
    GPU code path unchanged."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise ValueError(f"train.fsdp: accelerate did not enable FSDP on a {state.distributed_type} run; FSDP needs "
                         "GPU processes or several CPU processes (train.num_processes > 1)")
    plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as AcceleratorState.__init__ mirrors it
    state.fsdp_plugin = plugin
    trainer.is_fsdp_enabled = True
