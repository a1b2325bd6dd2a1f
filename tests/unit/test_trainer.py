"""AlignTrainer on a tiny random Llama (CPU): equivalence with TRL's DPOTrainer (fp32, and bf16 bit for bit) and the
original WPO formula, gradient-accumulation invariance, each loss's training direction, and config errors. The
reference log-probs (precomputed vs live, LoRA, bad inputs): test_trainer_reference.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _tiny import align_trainer, dpo_args, one_torch_thread, preference_rows, tiny_model, tiny_tokenizer
from datasets import Dataset
from transformers import TrainerCallback
from trl import DPOTrainer

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


def _batch(trainer, n=8):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


def _loss_and_grad(trainer, batch):
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach(), trainer.model.lm_head.weight.grad.clone()


@pytest.mark.parametrize("trl_loss,ours", [("sigmoid", "dpo"), ("ipo", "ipo"), ("hinge", "hinge"),
                                           ("sppo_hard", "sppo_hard")])
def test_loss_gradient_and_margins_equal_trl(tmp_path, trl_loss, ours):
    trl = DPOTrainer(model=copy.deepcopy(POLICY), ref_model=copy.deepcopy(REF),
                     args=dpo_args(tmp_path / "trl", loss_type=[trl_loss]), train_dataset=Dataset.from_list(ROWS),
                     processing_class=TOK)
    mine = _align(tmp_path, MethodConfig(loss=ours))
    loss_trl, grad_trl = _loss_and_grad(trl, _batch(trl))
    loss_mine, grad_mine = _loss_and_grad(mine, _batch(mine))
    assert abs(loss_trl.item() - 0.6931472) > 1e-3 or ours != "dpo"  # the reference differs: not a trivial ln 2
    torch.testing.assert_close(loss_mine, loss_trl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_mine, grad_trl, rtol=1e-4, atol=1e-6)
    for key in ("rewards/margins", "rewards/accuracies"):
        assert mine._metrics["train"][key][-1] == pytest.approx(trl._metrics["train"][key][-1], rel=1e-5, abs=1e-6)


def test_bf16_training_follows_stock_trl_bit_for_bit(tmp_path):
    """The train stage's setup (reference pre-computed in the first epoch's batches, no reference model) against
    stock DPOTrainer (a live reference copy every step), both bf16 with the same seed: every logged loss and the
    final weights are the same. The product scores through the same fused LM head as TRL, and pre-computes the
    reference in the training batches' shapes; either difference alone makes bf16 rounding diverge (Adam's
    first steps are nearly sign(gradient), so rounding-level gradient differences move every weight)."""
    import math

    rows = preference_rows(16, seed=5)
    kw = dict(bf16=True, max_steps=4, learning_rate=1e-3)
    # stock builds its reference as a fresh copy of the policy's checkpoint; the tiny model has none: copy it here
    stock = DPOTrainer(model=copy.deepcopy(POLICY), ref_model=copy.deepcopy(POLICY),
                       args=dpo_args(tmp_path / "trl", **kw), train_dataset=Dataset.from_list(rows),
                       processing_class=TOK)
    ours = _align(tmp_path, MethodConfig(), rows=rows, ref_model=None, precompute_ref_log_probs=True, **kw)
    assert ours.ref_model is None
    stock.train()
    ours.train()
    losses = {name: [r["loss"] for r in t.state.log_history if "loss" in r] for name, t in
              (("stock", stock), ("ours", ours))}
    assert losses["stock"][0] == pytest.approx(math.log(2), abs=1e-7)
    assert losses["stock"][-1] < losses["stock"][0] - 0.01, losses  # the weights moved: the comparison is not trivial
    assert losses["ours"] == losses["stock"]
    for (name, p_stock), p_ours in zip(stock.model.named_parameters(), ours.model.parameters()):
        assert torch.equal(p_stock, p_ours), name


def test_wpo_unclamped_equals_trl_use_weighting(tmp_path):
    trl = DPOTrainer(model=copy.deepcopy(POLICY), ref_model=copy.deepcopy(REF),
                     args=dpo_args(tmp_path / "trl", use_weighting=True), train_dataset=Dataset.from_list(ROWS),
                     processing_class=TOK)
    mine = _align(tmp_path, MethodConfig(weighting="wpo", wpo={"clamp": False}))
    loss_trl, grad_trl = _loss_and_grad(trl, _batch(trl))
    loss_mine, grad_mine = _loss_and_grad(mine, _batch(mine))
    torch.testing.assert_close(loss_mine, loss_trl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_mine, grad_trl, rtol=1e-4, atol=1e-7)


def _greedy_rows(n: int) -> list[dict]:
    """Completions decoded greedily from the policy: their tokens are likely, so WPO weights exceed 1."""
    specials = [TOK.convert_tokens_to_ids(s) for s in TOK.all_special_tokens]
    rows = []
    for row in preference_rows(n, seed=7):
        ids = TOK(row["prompt"], return_tensors="pt").input_ids
        out = POLICY.generate(ids, max_new_tokens=4, do_sample=False, suppress_tokens=specials,
                              pad_token_id=TOK.pad_token_id)
        rows.append({**row, "chosen": " " + TOK.decode(out[0, ids.shape[1]:])})
    return rows


def test_wpo_clamped_equals_original_wpo_formula(tmp_path):
    """The WPO code: log_softmax gather, log Σ softmax², mean over completion tokens, weight =
    clamp(exp(mean_w + mean_l), max=1), loss = −log σ(βΔ)·weight, averaged (wzhouad/WPO scripts/run_wpo.py)."""
    rows = ROWS[:4] + _greedy_rows(4)
    mine = _align(tmp_path, MethodConfig(weighting="wpo"), rows=rows)
    batch = _batch(mine)
    loss_mine, _ = _loss_and_grad(mine, batch)

    def wpo_code_logps(model):
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["input_ids"][:, 1:]
        mask = batch["completion_mask"][:, 1:].float()
        per_token = torch.log_softmax(logits, -1).gather(2, labels[..., None]).squeeze(2)
        aligned = per_token - torch.log((torch.softmax(logits, -1) ** 2).sum(-1))
        return (per_token * mask).sum(-1), (aligned * mask).sum(-1) / mask.sum(-1)

    logps, avg_aligned = wpo_code_logps(POLICY)
    ref_logps, _ = wpo_code_logps(REF)
    half = len(rows)
    raw_weight = torch.exp(avg_aligned[:half] + avg_aligned[half:])
    assert (raw_weight > 1).any() and (raw_weight < 1).any(), raw_weight  # the clamp matters on this batch
    logits = 0.1 * ((logps[:half] - logps[half:]) - (ref_logps[:half] - ref_logps[half:]))
    expected = (-F.logsigmoid(logits) * raw_weight.clamp(max=1)).mean()
    torch.testing.assert_close(loss_mine, expected, rtol=1e-5, atol=1e-6)


class _GradCapture(TrainerCallback):
    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# sail: the plain score term; its default baseline is per micro-batch (a batch of 1 has none), so 4 x 1 and 1 x 4
# differ by design there
@pytest.mark.parametrize("method", [MethodConfig(weighting="wpo"),
                                    MethodConfig(loss="sail", sail={"self_label_prob": 0.5, "score_term": "plain"})],
                         ids=["dpo+wpo", "sail"])
def test_batch4_accum1_equals_batch1_accum4(tmp_path, method):
    rows = [{**r, "on_policy": i % 2 == 0} for i, r in enumerate(ROWS[:4])]
    grads = []
    for bs, accum in ((4, 1), (1, 4)):
        trainer = _align(tmp_path / f"b{bs}", method, rows=rows, per_device_train_batch_size=bs,
                         gradient_accumulation_steps=accum, max_grad_norm=0.0)
        capture = _GradCapture()
        trainer.add_callback(capture)
        trainer.train()
        grads.append(capture.grads)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", [
    MethodConfig(loss="dpo"), MethodConfig(loss="ipo"), MethodConfig(loss="hinge"),
    MethodConfig(loss="sppo", pairs="sppo_winprob", reference="behavior", optimizer="rmsprop"),
    MethodConfig(loss="sppo_single", pairs="sppo_winprob", reference="behavior", optimizer="rmsprop"),
    MethodConfig(loss="sppo_hard"),
    MethodConfig(loss="sail", sail={"self_label_prob": 0.5}, optimizer="rmsprop"),
    MethodConfig(loss="dpo", weighting="wpo", wpo={"alignment": "greedy"}),
], ids=lambda m: f"{m.loss}-{m.weighting}")
def test_each_loss_goes_down_with_training(tmp_path, method):
    rows = [{**r, "chosen_winprob": 0.7 + 0.03 * i, "rejected_winprob": 0.4 - 0.03 * i, "on_policy": True,
             "pair_winprob": 0.8 - 0.02 * i} for i, r in enumerate(ROWS)]
    lr = 3e-4 if method.optimizer == "rmsprop" else 3e-3  # RMSprop's first step is ≈ 10·lr·sign(g)
    trainer = _align(tmp_path, method, rows=rows, per_device_train_batch_size=8, max_steps=5, learning_rate=lr,
                     beta=0.5)
    batch = _batch(trainer)

    def loss_now():
        trainer.model.eval()
        with torch.no_grad():
            return trainer.compute_loss(trainer.model, batch).item()

    before = loss_now()
    trainer.train()
    after = loss_now()
    assert after < before, (before, after)
    logged = trainer.state.log_history[0]
    for key in ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "logps/chosen"):
        assert key in logged, key
    assert ("wpo/weight" in logged) == (method.weighting == "wpo")
    expected_opt = torch.optim.RMSprop if method.optimizer == "rmsprop" else torch.optim.AdamW
    assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer,
                      expected_opt)


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="DPOConfig.loss_type"):
        _align(tmp_path, MethodConfig(), loss_type=["ipo"])
    with pytest.raises(ValueError, match="DPOConfig.use_weighting"):
        _align(tmp_path, MethodConfig(), use_weighting=True)
    with pytest.raises(ValueError, match="'chosen_winprob'"):
        _align(tmp_path, MethodConfig(loss="sppo", pairs="sppo_winprob", reference="behavior"))
    with pytest.raises(ValueError, match="'on_policy'"):
        _align(tmp_path, MethodConfig(loss="sail"))
