"""``ExactChunkedLogProbs`` returns TRL's chunked kernel's bits (log-probs, log Σp², both gradients) in fp32 and under
bf16 autocast, over several row chunks and vocabulary tiles with ragged ends, keeping tiles or recomputing them; the
patched model gives the same per-token results as TRL's patched model and as a plain log-softmax of its logits."""

from __future__ import annotations

import copy

import pytest
import torch
import trl.kernels.chunked_logprob as trl_kernel
from _tiny import preference_rows, tiny_model, tiny_tokenizer
from trl.trainer.utils import add_fused_lm_head

from pipeline_lib import fused_head
from pipeline_lib.fused_head import ExactChunkedLogProbs, add_fast_fused_head

N, H, V = 50, 16, 70
TOKEN_CHUNK, VOCAB_CHUNK = 16, 32  # 4 row chunks (the last of 2 rows), 3 vocabulary tiles (the last of 6 columns)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, H, generator=g) * 2).requires_grad_()
    weight = torch.randn(V, H, generator=g).requires_grad_()
    target = torch.randint(0, V, (N,), generator=g)
    mask = torch.rand(N, generator=g) < 0.6
    mask[TOKEN_CHUNK:2 * TOKEN_CHUNK] = False  # one row chunk with nothing to score
    coef = torch.randn(N, generator=g)  # a non-uniform incoming gradient
    return hidden, weight, target, mask, coef


def _run(fn, autocast: bool, masked: bool):
    hidden, weight, target, mask, coef = _inputs()
    mask = mask if masked else torch.ones(N, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logp, log_sum_sq = fn(hidden, weight, target, mask)
    # as in the patched forward, unscored rows carry no gradient (TRL's output is masked to 0 there)
    (logp * coef * mask).sum().backward()
    return logp.detach()[mask], log_sum_sq[mask], hidden.grad, weight.grad


def _trl(hidden, weight, target, mask):
    out = trl_kernel.ChunkedLogProbFunction.apply(hidden, weight, None, target, 1.0, VOCAB_CHUNK, None, 1.0,
                                                  ("log_probs", "log_sum_sq_probs"))
    return out[0], out[2]


def _ours(hidden, weight, target, mask):
    return ExactChunkedLogProbs.apply(hidden, weight, target, mask, True, TOKEN_CHUNK, VOCAB_CHUNK)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("keep_tiles", [True, False], ids=["kept-tiles", "recomputed-tiles"])
@pytest.mark.parametrize("masked", [False, True], ids=["all-rows", "masked-rows"])
def test_same_bits_as_trl_kernel(monkeypatch, autocast, keep_tiles, masked):
    monkeypatch.setattr(trl_kernel, "TOKEN_CHUNK_SIZE", TOKEN_CHUNK)
    monkeypatch.setattr(fused_head, "KEEP_TILES_BYTES", 1 << 30 if keep_tiles else 0)
    ref = _run(_trl, autocast, masked)
    mine = _run(_ours, autocast, masked)
    for name, a, b in zip(("log_probs", "log_sum_sq_probs", "grad_hidden", "grad_weight"), mine, ref):
        assert torch.equal(a, b), (name, (a - b).abs().max())
    # and the values are the right ones: log-softmax of the (fp32) logits, to float precision
    hidden, weight, target, mask, _ = _inputs()
    mask = mask if masked else torch.ones(N, dtype=torch.bool)
    exact = torch.log_softmax(hidden.detach().double() @ weight.detach().double().T, -1)[mask]
    tol = 0.3 if autocast else 1e-4  # bf16 logits of size ~10 carry ~0.03 absolute rounding each
    torch.testing.assert_close(mine[0].double(), exact.gather(1, target[mask, None]).squeeze(1), rtol=0, atol=tol)
    torch.testing.assert_close(mine[1].double(), torch.logsumexp(2 * exact, -1), rtol=0, atol=tol)


def test_patched_model_matches_trl_patched_model_and_logits():
    tok = tiny_tokenizer()
    rows = preference_rows(3, seed=2)
    enc = tok([r["prompt"] + r["chosen"] for r in rows], padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    labels[:, :3] = -100  # a "prompt" that is not scored
    base = tiny_model(0)
    ours, trl = copy.deepcopy(base), copy.deepcopy(base)
    add_fast_fused_head(ours, ("log_probs", "log_sum_sq_probs"))
    add_fused_lm_head(trl, outputs=("log_probs", "log_sum_sq_probs"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = ours(**enc, labels=labels, fused_lm_head=True)
        b = trl(**enc, labels=labels, fused_lm_head=True)
    assert torch.equal(a.log_probs, b.log_probs) and torch.equal(a.log_sum_sq_probs, b.log_sum_sq_probs)
    assert torch.equal(a.label_mask, b.label_mask)
    # fp32: equal to log_softmax of the model's own logits at the scored positions, 0 elsewhere
    out = ours(**enc, labels=labels, fused_lm_head=True)
    logits = base(**enc).logits[:, :-1].double()
    want = torch.log_softmax(logits, -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)
    want = want.masked_fill(labels[:, 1:] == -100, 0)
    torch.testing.assert_close(out.log_probs.double(), want, rtol=0, atol=1e-5)
    # without fused_lm_head the model is the ordinary causal LM
    torch.testing.assert_close(ours(**enc).logits, base(**enc).logits)


def test_unsupported_outputs_are_named():
    with pytest.raises(ValueError, match=r"\['entropy'\]"):
        add_fast_fused_head(tiny_model(0), ("log_probs", "entropy"))
