"""The LM head and per-token log-probs in one step, without B×T×V logits: TRL's fused head, faster on CPU.

Why the trainer uses TRL's arithmetic at all: in bf16 two correct implementations of the same loss round
differently (~1 ulp of bf16 per element), and Adam's first steps (update ≈ lr·sign(gradient)) turn those differences
into different weights: measured on SmolLM2, a logits-based log-softmax gave parameter gradients 1.2% (median,
relative) away from stock DPOTrainer's and a loss 0.02 away after 12 steps. Scoring with exactly TRL's arithmetic
makes the product's training follow stock TRL bit for bit (tests/unit/test_trainer.py), so its speed-ups are
measured at the same loss.

Why not TRL's kernel as is: without Triton (CPU) it folds each [4096 tokens × 32768 vocab] tile with unfused torch ops,
including multiplications by a logit scale and a temperature of 1.0 and a recomputation of every tile in the
backward pass; that cost our train stage 70% more time per step on the project's CPU. ``ExactChunkedLogProbs`` does
the same floating-point operations on the same tiles in the same order, drops only what cannot change a bit
(×1.0, +0.0, the recomputation of a tile it kept), and so returns the same bits (tests/unit/test_fused_head.py).
It covers the common case (no bias, logit scale, soft-capping or temperature; no Triton device); anything else, and
every Triton (GPU) device, goes through TRL's own kernel, which is fast there.
"""

from __future__ import annotations

import functools
import types

import torch
from accelerate.utils import is_peft_model
from trl.kernels.chunked_logprob import TOKEN_CHUNK_SIZE, _addmm_fp32, _use_triton
from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, FusedCausalLMOutput, add_fused_lm_head

# config fields that rescale or cap the logits (TRL's head handles them; ours does not)
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")
_MARK = "_alignflow_fused_outputs"  # on a patched model: the per-token fields its fused forward returns
# keep a tile for the backward pass instead of recomputing it while the kept tiles stay under this size
KEEP_TILES_BYTES = 1 << 30


class ExactChunkedLogProbs(torch.autograd.Function):
    """``log softmax(hidden @ weight.T)[target]`` for the rows where ``mask`` is set (0 elsewhere), and, if asked,
    ``log Σ_v p_v²`` (no gradient), in TRL's arithmetic: rows in chunks of ``token_chunk``, the vocabulary in tiles
    of ``vocab_chunk``, each tile projected in the autocast dtype into TRL's tile buffer and folded into an online
    log-sum-exp in fp32; the backward writes the logits' gradient in the compute dtype and accumulates both gradient
    GEMMs in fp32 (TRL's ``_addmm_fp32``).

    What is left out cannot change a bit: the folds and the softmax of the backward run only on masked-in rows
    (elementwise work and per-row reductions, which do not depend on the other rows; TRL computes unscored rows and
    then multiplies their gradient by zero), and a tile is kept for the backward instead of recomputed. Every GEMM
    still sees TRL's full rows in TRL's buffer layout: BLAS kernels pick their summation order by shape (a 9-row
    product differs in the last bits from the same rows of a 16-row one), so fewer rows could change the result."""

    @staticmethod
    def forward(ctx, hidden_nh: torch.Tensor, weight_vh: torch.Tensor, target_n: torch.Tensor,
                mask_n: torch.Tensor | None, want_sum_sq: bool, token_chunk: int = TOKEN_CHUNK_SIZE,
                vocab_chunk: int = _CHUNKED_LOGPROB_CHUNK_SIZE):
        device, n_rows, vocab = hidden_nh.device, hidden_nh.shape[0], weight_vh.shape[0]
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else hidden_nh.dtype
        if mask_n is None:
            mask_n = torch.ones(n_rows, dtype=torch.bool, device=device)
        logp_n = torch.zeros(n_rows, device=device, dtype=torch.float32)
        log_sum_sq_n = torch.zeros_like(logp_n) if want_sum_sq else logp_n.new_empty(0)
        log_z_n = torch.zeros_like(logp_n)
        keep = int(mask_n.sum()) * vocab * torch.finfo(dtype).bits // 8 <= KEEP_TILES_BYTES
        kept: list[torch.Tensor] = []
        buf = torch.empty(min(n_rows, token_chunk), vocab_chunk, device=device, dtype=dtype)
        for r0 in range(0, n_rows, token_chunk):
            r1 = min(r0 + token_chunk, n_rows)
            rows = mask_n[r0:r1].nonzero().squeeze(-1)
            if not len(rows):
                continue
            hidden_chunk = hidden_nh[r0:r1].to(dtype)
            target_r = target_n[r0:r1][rows]
            running_max_r = torch.full((len(rows),), float("-inf"), device=device)
            sum_exp_r, sum_sq_r, target_logit_r = (torch.zeros(len(rows), device=device) for _ in range(3))
            for v0 in range(0, vocab, vocab_chunk):
                v1 = min(v0 + vocab_chunk, vocab)
                tile = buf[:r1 - r0, :v1 - v0]
                torch.mm(hidden_chunk, weight_vh[v0:v1].to(dtype).t(), out=tile)
                tile_r = tile[rows]  # a copy: the buffer is reused by the next tile
                if keep:
                    kept.append(tile_r)
                z = tile_r.to(torch.float32, copy=True)  # a copy even in fp32: z is shifted in place below
                m_new = torch.maximum(running_max_r, z.amax(-1))
                rescale = torch.exp(running_max_r - m_new)
                e = torch.exp(z.sub_(m_new.unsqueeze(-1)))
                sum_exp_r.mul_(rescale).add_(e.sum(-1))
                if want_sum_sq:
                    sum_sq_r.mul_(rescale * rescale).add_((e * e).sum(-1))
                running_max_r = m_new
                local = target_r - v0
                in_tile = (local >= 0) & (local < v1 - v0)
                target_z = tile_r.gather(-1, local.clamp(0, v1 - v0 - 1).unsqueeze(-1)).squeeze(-1).float()
                target_logit_r = torch.where(in_tile, target_z, target_logit_r)
                del z, e
            log_z_r = running_max_r + torch.log(sum_exp_r)
            log_z_n[r0 + rows] = log_z_r
            logp_n[r0 + rows] = target_logit_r - log_z_r
            if want_sum_sq:
                log_sum_sq_n[r0 + rows] = torch.log(sum_sq_r) - 2 * torch.log(sum_exp_r)
        ctx.save_for_backward(hidden_nh, weight_vh, target_n, mask_n, log_z_n, *kept)
        ctx.dtype, ctx.chunks = dtype, (token_chunk, vocab_chunk)
        ctx.mark_non_differentiable(log_sum_sq_n)
        return logp_n, log_sum_sq_n

    @staticmethod
    def backward(ctx, grad_logp_n: torch.Tensor, _grad_sum_sq):
        hidden_nh, weight_vh, target_n, mask_n, log_z_n, *kept = ctx.saved_tensors
        dtype, (token_chunk, vocab_chunk) = ctx.dtype, ctx.chunks
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        n_rows, vocab = hidden_nh.shape[0], weight_vh.shape[0]
        f32 = dict(device=hidden_nh.device, dtype=torch.float32)
        grad_hidden = torch.zeros(hidden_nh.shape, **f32) if need_hidden else None
        grad_weight = torch.zeros(weight_vh.shape, **f32) if need_weight else None
        g_n = grad_logp_n.float().contiguous()
        tiles = iter(kept)
        buf = torch.empty(min(n_rows, token_chunk), vocab_chunk, device=hidden_nh.device, dtype=dtype)
        for r0 in range(0, n_rows, token_chunk):
            r1 = min(r0 + token_chunk, n_rows)
            rows = mask_n[r0:r1].nonzero().squeeze(-1)
            if not len(rows):
                continue  # every incoming gradient here is zero: TRL's GEMMs would add exact zeros
            hidden_chunk = hidden_nh[r0:r1].to(dtype)
            g_r1 = g_n[r0:r1][rows].unsqueeze(-1)
            local_r = target_n[r0:r1][rows]
            for v0 in range(0, vocab, vocab_chunk):
                v1 = min(v0 + vocab_chunk, vocab)
                w_chunk = weight_vh[v0:v1].to(dtype)
                tile = buf[:r1 - r0, :v1 - v0]
                if kept:
                    tile_r = next(tiles)
                else:
                    torch.mm(hidden_chunk, w_chunk.t(), out=tile)
                    tile_r = tile[rows]
                # d log p_target / d z_v = 1[v = target] − p_v, times the incoming gradient; as TRL computes it:
                # g·(0 − p) = −(p·g) off the target, g·(1 − p) on it
                p = torch.exp(tile_r.to(torch.float32, copy=True).sub_(log_z_n[r0:r1][rows].unsqueeze(-1)))
                local = local_r - v0
                hit = ((local >= 0) & (local < v1 - v0)).nonzero().squeeze(-1)
                on_target = (1.0 - p[hit, local[hit]]) * g_r1[hit, 0]
                grad = p.mul_(g_r1).neg_()
                grad[hit, local[hit]] = on_target
                # the logits' gradient in the compute dtype, in TRL's tile (its unscored rows are zeros)
                tile.zero_()
                tile[rows] = grad.to(dtype)
                del p, grad
                if grad_hidden is not None:
                    _addmm_fp32(grad_hidden[r0:r1], tile, w_chunk)
                if grad_weight is not None:
                    _addmm_fp32(grad_weight[v0:v1], tile.t(), hidden_chunk)
        return (grad_hidden.to(hidden_nh.dtype) if grad_hidden is not None else None,
                grad_weight.to(weight_vh.dtype) if grad_weight is not None else None, None, None, None, None, None)


def add_fast_fused_head(model, outputs: tuple[str, ...] = ("log_probs",)) -> None:
    """Patch ``model`` like TRL's ``add_fused_lm_head`` (``model(..., labels=l, fused_lm_head=True)`` returns
    per-token ``log_probs``, and ``log_sum_sq_probs`` if in ``outputs``), scoring with ``ExactChunkedLogProbs``
    wherever it applies and with TRL's head (installed underneath) everywhere else."""
    unknown = set(outputs) - {"log_probs", "log_sum_sq_probs"}
    if unknown:
        raise ValueError(f"outputs {sorted(unknown)}: only log_probs and log_sum_sq_probs are produced")
    add_fused_lm_head(model, outputs=outputs)
    trl_forward = model.forward
    config = model.config
    plain = (config.get_text_config() is config and not getattr(config, "output_router_logits", False)
             and all(getattr(config, key, None) in (None, 1.0) for key in _LOGIT_TRANSFORMS))
    want_sum_sq = "log_sum_sq_probs" in outputs

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, **kwargs):
        head = self.get_output_embeddings()
        weight = head.weight
        if not (fused_lm_head and plain and labels is not None and getattr(head, "bias", None) is None
                and "shift_labels" not in kwargs and "num_items_in_batch" not in kwargs
                and type(weight) is torch.nn.Parameter and not _use_triton(weight.device)):
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, **kwargs)
        kwargs["use_cache"] = False
        hidden_bth = self.base_model(*args, **kwargs).last_hidden_state[:, :-1].to(weight.device)
        labels_bt = labels[:, 1:].to(weight.device)
        mask_bt = labels_bt != -100
        logp_n, log_sum_sq_n = ExactChunkedLogProbs.apply(hidden_bth.reshape(-1, hidden_bth.size(-1)), weight,
                                                          labels_bt.clamp(min=0).reshape(-1), mask_bt.reshape(-1),
                                                          want_sum_sq)
        logp_bt = logp_n.view(mask_bt.shape)  # 0 where not scored, as TRL's
        log_sum_sq_bt = log_sum_sq_n.view(mask_bt.shape) if want_sum_sq else None
        return FusedCausalLMOutput(loss=-logp_bt.sum() / mask_bt.sum().clamp(min=1), log_probs=logp_bt,
                                   log_sum_sq_probs=log_sum_sq_bt, label_mask=mask_bt)

    model.forward = types.MethodType(forward, model)
    setattr(model, _MARK, tuple(outputs))


def fused_outputs(model) -> tuple[str, ...]:
    """The per-token fields ``model`` (or, under PEFT, its base model) returns with ``fused_lm_head=True`` after
    ``add_fast_fused_head``, or () for a model without it. A mark rather than a look at ``forward``: accelerate's
    mixed-precision wrapper replaces ``forward`` again when the trainer prepares the model."""
    if is_peft_model(model):
        model = model.get_base_model()
    return getattr(model, _MARK, ())
