"""Reference log-probs in AlignTrainer: precomputed (by TRL's pass or supplied as columns) equals live, the default
stage setup and LoRA use the policy before training, and bad reference inputs are named."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
from _tiny import WORDS, align_trainer, dpo_args, one_torch_thread, preference_rows, tiny_model, tiny_tokenizer
from datasets import Dataset

from pipeline_lib.methods import MethodConfig
from pipeline_lib.trainer import AlignTrainer

TOK = tiny_tokenizer()
POLICY, REF = tiny_model(0), tiny_model(1)
ROWS = preference_rows(8, seed=0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_torch_thread():
        yield


def _align(tmp_path, method: MethodConfig, rows=ROWS, ref_model="copy", **args) -> AlignTrainer:
    return align_trainer(tmp_path, method, TOK, POLICY, REF, rows, ref_model, **args)


def _loss_and_grad(trainer, n=8):
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = [p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None]
    return loss.detach(), torch.cat(grads)


def test_precomputed_reference_equals_live_reference(tmp_path):
    method = MethodConfig(weighting="wpo")
    live = _align(tmp_path, method)
    pre = _align(tmp_path, method, precompute_ref_log_probs=True)
    cols = {c: pre.train_dataset[c] for c in ("ref_chosen_logps", "ref_rejected_logps")}
    supplied_ds = Dataset.from_list(ROWS).add_column("ref_chosen_logps", cols["ref_chosen_logps"]) \
        .add_column("ref_rejected_logps", cols["ref_rejected_logps"])
    supplied = _align(tmp_path, method.model_copy(update={"reference": "behavior"}), rows=supplied_ds,
                      ref_model=None)
    assert supplied.ref_model is None and pre.ref_model is not None
    loss_live, grad_live = _loss_and_grad(live)
    for other in (pre, supplied):
        loss, grad = _loss_and_grad(other)
        torch.testing.assert_close(loss, loss_live, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, grad_live, rtol=1e-5, atol=1e-8)


def test_default_stage_setup_uses_the_policy_before_training_as_reference(tmp_path):
    """precompute_ref_log_probs=True, no ref_model: reference = the policy before the first step (the behavior policy
    when it sampled the pairs), so every log-ratio is 0 and the DPO loss is −log σ(0) = ln 2 = 0.6931472."""
    trainer = _align(tmp_path, MethodConfig(), ref_model=None, precompute_ref_log_probs=True)
    loss, _ = _loss_and_grad(trainer)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)


def test_bf16_precomputed_reference_matches_the_training_batches_bit_for_bit(tmp_path):
    """In bf16 a reference scored in other batch shapes (other padding, other neighbours) rounds differently from
    the policy's own forward. The pass runs in the first epoch's batches (same sampler, seed, batch size), so with
    learning rate 0 (policy = reference throughout) every step of epoch 1 logs −log σ(0) = ln 2 exactly, as a live
    reference would; rows are shuffled, so a sequential pass's batches differ (its losses are checked to differ too,
    or this test would prove nothing on a machine whose bf16 rounding ignored batch shapes)."""
    rng = random.Random(0)
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    # lengths grow with i: sequential and shuffled batches of 4 pad to different lengths
    rows = [{"prompt": f"user : {words(2)} . assistant :", "chosen": " " + words(2 + 3 * i),
             "rejected": " " + words(1 + 2 * i)} for i in range(16)]
    kw = dict(ref_model=None, precompute_ref_log_probs=True, bf16=True, learning_rate=0.0, max_steps=4)
    trainer = _align(tmp_path, MethodConfig(), rows=rows, **kw)
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 4 and all(loss == pytest.approx(math.log(2), abs=1e-7) for loss in losses), losses

    # the same rows with TRL's sequential pass (precompute batch size 3 selects it): not ln 2 at every step
    sequential = _align(tmp_path / "seq", MethodConfig(), rows=rows, precompute_ref_batch_size=3, **kw)
    sequential.train()
    seq_losses = [r["loss"] for r in sequential.state.log_history if "loss" in r]
    assert max(abs(loss - math.log(2)) for loss in seq_losses) > 1e-5, seq_losses


def test_rows_the_first_epoch_skips_still_get_their_reference(tmp_path):
    """dataloader_drop_last with 10 rows in batches of 4: epoch 1 shows 8 rows; the other 2 are scored separately.
    All 10 columns equal TRL's own sequential pass (fp32, where batch shapes do not matter) to float precision."""
    rows = preference_rows(10, seed=1)
    ours = _align(tmp_path, MethodConfig(), rows=rows, ref_model=None, precompute_ref_log_probs=True,
                  dataloader_drop_last=True)
    trl = _align(tmp_path / "trl", MethodConfig(), rows=rows, ref_model=None, precompute_ref_log_probs=True,
                 precompute_ref_batch_size=3)  # not the training batch size: TRL's sequential pass
    for col in ("ref_chosen_logps", "ref_rejected_logps"):
        torch.testing.assert_close(torch.tensor(ours.train_dataset[col]), torch.tensor(trl.train_dataset[col]),
                                   rtol=1e-6, atol=1e-5)


def test_lora_reference_is_the_base_model_with_adapters_disabled(tmp_path):
    """A fresh LoRA adapter starts at B = 0, so policy = base = reference: DPO loss −log σ(0) = ln 2 = 0.6931472;
    after training the adapter, the (adapter-disabled) reference must still be the untouched base model."""
    from peft import LoraConfig

    trainer = AlignTrainer(model=copy.deepcopy(POLICY), args=dpo_args(tmp_path, max_steps=3, learning_rate=1e-2),
                           train_dataset=Dataset.from_list(ROWS), processing_class=TOK, method=MethodConfig(),
                           peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert trainer.ref_model is None
    loss, _ = _loss_and_grad(trainer)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    trainer.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    ref_chosen, _ = trainer.compute_ref_log_probs(trainer.model, batch)
    base = copy.deepcopy(POLICY)
    with torch.no_grad():
        ref_base_chosen, _ = trainer.compute_ref_log_probs(base, batch)
    torch.testing.assert_close(ref_chosen, ref_base_chosen, rtol=1e-6, atol=1e-5)


def test_bad_reference_inputs_are_named(tmp_path):
    half = Dataset.from_list(ROWS).add_column("ref_chosen_logps", [0.0] * len(ROWS))
    with pytest.raises(ValueError, match="'ref_chosen_logps' but not its pair"):
        _align(tmp_path, MethodConfig(), rows=half, ref_model=None)
    nan = half.add_column("ref_rejected_logps", [0.0] * 7 + [float("nan")])
    with pytest.raises(ValueError, match=r"'ref_rejected_logps' is missing or not finite at rows \[7\]"):
        _align(tmp_path, MethodConfig(), rows=nan, ref_model=None)
