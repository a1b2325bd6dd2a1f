"""The DPO family as pure functions of per-sequence log-probs (the method table that combines them: ``methods.py``).

Every loss takes ``policy_chosen_seq, policy_rejected_seq, ref_chosen_seq, ref_rejected_seq`` (shape [B]: log π(y|x)
summed, or averaged when the spec says ``aggregation="mean"``, over completion tokens) plus keyword extras, and
returns ``(loss_b, metrics)``: the per-example loss [B] and detached per-example metrics [B]. Write
``ρ_w = policy_chosen − ref_chosen`` and ``ρ_l = policy_rejected − ref_rejected`` (log-ratios), ``Δ = ρ_w − ρ_l``.

- ``dpo``         −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ)          DPO Eq. 7; ε > 0 is the conservative DPO of the DPO code.
- ``ipo``         (Δ̄ − 1/(2β))², Δ̄ from length-averaged log-probs     IPO Eq. 17, normalised as TRL does.
- ``hinge``       max(0, 1 − βΔ)                               SLiC-HF calibration loss, as in TRL.
- ``sppo``        ½[(ρ_w − η(P̂_w − ½))² + (ρ_l − η(P̂_l − ½))²], η = 1/β   SPPO Eq. 4.7 (uclaml/SPPO trainer).
- ``sppo_single`` ½[(ρ_w − η(P_wl − ½))² + (ρ_l + η(P_wl − ½))²], P_wl = P(y_w ≻ y_l)   uclaml/SPPO's other loss.
- ``sppo_hard``   (ρ_w − ½η)² + (ρ_l + ½η)²                   TRL's hard-label SPPO (P̂_w = 1, P̂_l = 0).
- ``sail``        see ``sail_loss``.

Departures, stated once:
- ``sppo`` keeps the uclaml/SPPO code's ½ (the mean of the two squared errors). On the code's pair (the argmax and
  argmin of P̂ among the K samples, ``pairs.strategy: sppo_winprob``) that is not an unbiased estimate of Algorithm
  1's expectation over y ~ π_t: both responses are selected for extreme P̂. ``pairs.strategy: sppo_all`` regresses
  every sample instead (see ``pipeline_lib/stages/pair.py``). ``sppo_hard`` is TRL's and has no ½, so
  ``sppo(P̂_w=1, P̂_l=0) = ½·sppo_hard``.
- ``ipo`` uses length-averaged log-ratios, like TRL (the IPO paper writes sequence log-ratios; TRL's comment
  says the authors confirmed the normalisation).
- ``hinge`` uses margin 1 with β scaling the logit (TRL/SPPO code), i.e. SLiC's δ = 1/β in log-ratio units.
- ``sail``: the paper's full text could not be read here (only its abstract, reviews and summaries), so no equation
  numbers are cited; the authors' code was read (``cdpo/cdpo_trainer.py`` in the fork github.com/xudongwu-0/SAIL,
  commits "neurips24"/"pulicize" by the first author), and the same fork's later ``cdpo/online_rpl_trainer.py``.
  The objective follows the paper's description (the bilevel problem made single-level by the reward–policy
  equivalence; responses from the policy or an offline dataset; labels from the judge or the policy's own σ(βh));
  its gradient terms are derived in ``sail_loss`` and checked against autograd on an enumerable toy. The label
  source is mixed in expectation (weights 1−λ, λ) per example rather than sampled as the code does, which has the
  same expected gradient and less variance.
- WPO weights are clamped at 1 by default, as the original WPO code does (``torch.clamp(..., max=1)``); TRL's
  ``use_weighting`` does not clamp. ``wpo.clamp: false`` reproduces TRL.
"""


from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def reward_metrics(beta: float, ratio_chosen_seq: Tensor, ratio_rejected_seq: Tensor) -> dict[str, Tensor]:
    """Implicit rewards r = β·log(π/π_ref) per example (DPO §5), detached."""
    rc, rr = beta * ratio_chosen_seq.detach(), beta * ratio_rejected_seq.detach()
    return {"rewards/chosen": rc, "rewards/rejected": rr, "rewards/margins": rc - rr,
            "rewards/accuracies": (rc > rr).float()}


def dpo_loss(policy_chosen_seq: Tensor, policy_rejected_seq: Tensor, ref_chosen_seq: Tensor,
             ref_rejected_seq: Tensor, *, beta: float, label_smoothing: float = 0.0) -> tuple[Tensor, dict]:
    """Sigmoid DPO (Rafailov et al. 2023, Eq. 7), with conservative label smoothing ε.

    By hand, β = 0.1, Δ = 10·ln 3 (so βΔ = ln 3, σ(ln 3) = 3/4):
      ε = 0:   −log(3/4) = 0.2876821
      ε = 0.1: 0.9·0.2876821 + 0.1·(−log(1/4) = 1.3862944) = 0.2589139 + 0.1386294 = 0.3975433
    """
    ratio_w, ratio_l = policy_chosen_seq - ref_chosen_seq, policy_rejected_seq - ref_rejected_seq
    z = beta * (ratio_w - ratio_l)
    loss_b = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return loss_b, reward_metrics(beta, ratio_w, ratio_l)


def ipo_loss(policy_chosen_seq: Tensor, policy_rejected_seq: Tensor, ref_chosen_seq: Tensor,
             ref_rejected_seq: Tensor, *, beta: float) -> tuple[Tensor, dict]:
    """IPO (Azar et al. 2023, Eq. 17) with β as τ: (Δ − 1/(2β))², on length-averaged log-probs (spec: mean).

    By hand, β = 0.5 (target margin 1/(2β) = 1), Δ = 0.5: (0.5 − 1)² = 0.25.
    """
    ratio_w, ratio_l = policy_chosen_seq - ref_chosen_seq, policy_rejected_seq - ref_rejected_seq
    loss_b = (ratio_w - ratio_l - 1 / (2 * beta)) ** 2
    return loss_b, reward_metrics(beta, ratio_w, ratio_l)


def hinge_loss(policy_chosen_seq: Tensor, policy_rejected_seq: Tensor, ref_chosen_seq: Tensor,
               ref_rejected_seq: Tensor, *, beta: float) -> tuple[Tensor, dict]:
    """SLiC-HF hinge (Zhao et al. 2023) on the DPO logit: max(0, 1 − βΔ).

    By hand, β = 0.1: Δ = 4 → max(0, 1 − 0.4) = 0.6; Δ = 12 → max(0, −0.2) = 0.
    """
    ratio_w, ratio_l = policy_chosen_seq - ref_chosen_seq, policy_rejected_seq - ref_rejected_seq
    loss_b = torch.relu(1 - beta * (ratio_w - ratio_l))
    return loss_b, reward_metrics(beta, ratio_w, ratio_l)


def sppo_loss(policy_chosen_seq: Tensor, policy_rejected_seq: Tensor, ref_chosen_seq: Tensor,
              ref_rejected_seq: Tensor, *, beta: float, chosen_winprob: Tensor,
              rejected_winprob: Tensor) -> tuple[Tensor, dict]:
    """SPPO (Wu et al. 2024, Eq. 4.7 / Algorithm 1): regress each log-ratio onto η(P̂(y ≻ π_t | x) − ½), η = 1/β.

    ``*_winprob`` is P̂(y ≻ π_t | x), the estimated probability that y beats a fresh policy sample (in the SPPO code:
    the mean over the K samples of P(y ≻ y_k), ``chosen_probs_win``/``chosen_probs_lose`` of
    ``scripts/compute_prob.py``; how P is computed: ``pipeline_lib/winprob.py``). The reference is π_t, the policy
    that generated this round's samples. Loss = ½[(ρ_w − η(P̂_w − ½))² + (ρ_l − η(P̂_l − ½))²] (uclaml/SPPO
    ``sppo/trainer.py`` lines 876-879). The two sides are independent regressions, so which one is "chosen" does not
    matter: on ``sppo_all`` pairs it is the regression of every sample of Algorithm 1.

    By hand, β = 0.5 (η = 2), P̂_w = 0.8, P̂_l = 0.3 → targets 2·0.3 = 0.6 and 2·(−0.2) = −0.4;
    ρ_w = −10 − (−11) = 1, ρ_l = −12 − (−11) = −1 → ½[(1 − 0.6)² + (−1 + 0.4)²] = ½(0.16 + 0.36) = 0.26.
    """
    eta = 1.0 / beta
    ratio_w, ratio_l = policy_chosen_seq - ref_chosen_seq, policy_rejected_seq - ref_rejected_seq
    err_w = ratio_w - eta * (chosen_winprob.to(ratio_w.dtype) - 0.5)
    err_l = ratio_l - eta * (rejected_winprob.to(ratio_l.dtype) - 0.5)
    loss_b = 0.5 * (err_w ** 2 + err_l ** 2)
    return loss_b, reward_metrics(beta, ratio_w, ratio_l)


def sppo_single_loss(policy_chosen_seq: Tensor, policy_rejected_seq: Tensor, ref_chosen_seq: Tensor,
                     ref_rejected_seq: Tensor, *, beta: float, pair_winprob: Tensor) -> tuple[Tensor, dict]:
    """uclaml/SPPO's ``sppo_single`` (``sppo/trainer.py`` lines 880-883): both log-ratios regressed on the pair's own
    probability P_wl = P(y_w ≻ y_l) (``chosen_probs`` = ``probability[argmax][argmin]``, ``scripts/compute_prob.py``
    line 95) instead of each response's P̂ against the policy: ½[(ρ_w − η(P_wl − ½))² + (ρ_l + η(P_wl − ½))²],
    η = 1/β. Swapping the two responses (P_lw = 1 − P_wl) gives the same loss.

    By hand, β = 0.5 (η = 2), P_wl = 0.8 → targets +0.6 and −0.6; ρ_w = 1, ρ_l = −1 →
    ½[(1 − 0.6)² + (−1 + 0.6)²] = ½(0.16 + 0.16) = 0.16.
    """
    eta = 1.0 / beta
    ratio_w, ratio_l = policy_chosen_seq - ref_chosen_seq, policy_rejected_seq - ref_rejected_seq
    target = eta * (pair_winprob.to(ratio_w.dtype) - 0.5)
    loss_b = 0.5 * ((ratio_w - target) ** 2 + (ratio_l + target) ** 2)
    return loss_b, reward_metrics(beta, ratio_w, ratio_l)


def sppo_hard_loss(policy_chosen_seq: Tensor, policy_rejected_seq: Tensor, ref_chosen_seq: Tensor,
                   ref_rejected_seq: Tensor, *, beta: float) -> tuple[Tensor, dict]:
    """TRL's ``sppo_hard``: SPPO with P̂_w = 1, P̂_l = 0 and no ½: (ρ_w − 1/(2β))² + (ρ_l + 1/(2β))².

    By hand, β = 0.5: ρ_w = 2, ρ_l = 0 → (2 − 1)² + (0 + 1)² = 2.
    """
    ratio_w, ratio_l = policy_chosen_seq - ref_chosen_seq, policy_rejected_seq - ref_rejected_seq
    loss_b = (ratio_w - 0.5 / beta) ** 2 + (ratio_l + 0.5 / beta) ** 2
    return loss_b, reward_metrics(beta, ratio_w, ratio_l)


ScoreTerm = Literal["baseline", "plain", "hook"]


def _leave_one_out_advantage(f: Tensor, on_policy: Tensor) -> Tensor:
    """f − b per row, b = the mean of f over the *other* on-policy rows of the batch (0 where there is none): a
    baseline that does not depend on the row's own responses, so E[(f − b)∇log π] = E[f ∇log π] exactly (the
    batch mean including the row itself, as ``online_rpl_trainer.py`` line 485 uses, shrinks the term by (B−1)/B)."""
    on = on_policy.to(f.dtype)
    n_others = on.sum() - on
    b = (torch.sum(on * f) - on * f) / n_others.clamp(min=1)
    return torch.where(n_others > 0, f - b, torch.zeros_like(f)) * on


def sail_loss(policy_chosen_seq: Tensor, policy_rejected_seq: Tensor, ref_chosen_seq: Tensor,
              ref_rejected_seq: Tensor, *, beta: float, on_policy: Tensor, self_label_prob: float = 0.0,
              score_coef: float = 1.0, label_coef: float = 1.0,
              score_term: ScoreTerm = "baseline") -> tuple[Tensor, dict]:
    """SAIL (Ding et al. 2024): the single-level online objective, with the gradient terms that DPO drops.

    With h = ρ_w − ρ_l and z = βh, SAIL maximises (reward–policy equivalence turning the bilevel problem into one
    level) J(θ) = E_{x, (y1,y2) ~ μ, label ~ q} [log σ(β h_θ(y_winner, y_loser))], where
      - responses μ: ``on_policy`` rows were sampled from π_θ itself (SAIL-PR, SAIL-PP); other rows come from a
        fixed dataset (SAIL-DDP);
      - labels q: the judge's order (y_w ≻ y_l) with probability 1 − λ, the policy's own preference
        p_θ(y_w ≻ y_l) = σ(z) with probability λ = ``self_label_prob`` (SAIL-PP / SAIL-DDP self-improvement).
    We take the expectation over the label source exactly instead of sampling it, per example:
      f = (1−λ)·log σ(z) + λ·[σ(z)·log σ(z) + σ(−z)·log σ(−z)],   loss = −f.
    The exact gradient of J has three parts (derived here; our implementation of the paper's objective):
      1. pathwise ∇f with labels held fixed — the DPO gradient; for the self-labelled part it is
         σ(z)σ(−z) − σ(−z)σ(z) = 0, so self-labels teach nothing through this path alone;
      2. through the self-label p_θ = σ(z): (log σ(z) − log σ(−z))·∇σ(z) = z·σ(z)σ(−z)·∇z  (× ``label_coef``).
         The code's DDP/DPP term −½ρ(log σ(βh))² on a sampled self-label (``cdpo_trainer.py`` lines 1124-1133,
         labels swapped with probability σ(−z), lines 1073-1081) has this expected gradient with ``label_coef`` = ρ
         (tests/unit/test_losses.py checks it);
      3. through the sampling distribution when responses come from π_θ (score function / log-derivative trick),
         on-policy rows only, × ``score_coef``, in one of three forms (``score_term``):
         - ``plain``: f·∇[log π_θ(y_w|x) + log π_θ(y_l|x)], the term exactly as it appears in ∇J;
         - ``baseline`` (default): (f − b)·∇[…], b = the mean f of the batch's other on-policy rows. Same
           expectation, less variance: f = log σ(βh) < 0 always, so the plain term pushes both responses of every
           pair down (at z = 0 by 0.69·score_coef per unit of ∇log π, against DPO's β/2 = 0.05 at β = 0.1); centred,
           it moves pairs only relative to each other, and vanishes while every pair has the same z (e.g. the first
           step of a round against its own sampler). The fork's ``online_rpl_trainer.py`` (lines 470-488)
           subtracts a batch-mean baseline the same way;
         - ``hook``: the authors' ``cdpo_trainer.py`` form (lines 1142-1183): a gradient hook that changes
           ∂L/∂log π(y|x) by −γ·log σ(βh)/log π(y|x) (f in place of log σ(βh) under self-labels, its expectation),
           i.e. opposite in sign to the exact term and |log π| times smaller. The hook acts on the gradient of the
           batch-mean loss after the trainer's 1/(gradient accumulation) scaling, so relative to the per-example
           DPO gradient their γ weighs B·GA times more than ``score_coef`` does here: γ corresponds to
           ``score_coef`` = γ·B·GA (their per-device batch B and accumulation GA; 0.3·4·2 = 2.4 for DPR).
    Parts 2 and 3 enter through zero-valued surrogates, so ``loss_b`` equals −f exactly and only gradients change.
    ``policy_*_seq`` must be sums over tokens (log π(y|x)), since part 3 needs ∇ log π_θ(y|x).

    Part 3 is the exact gradient only for pairs of independent samples of π_θ at temperature 1, and only at the θ
    that sampled them: the argmax/argmin of K > 2 samples are not two draws (``methods.py`` rejects that pairing);
    at temperature T ≠ 1 (or top-p < 1) the responses come from a tempered/truncated π, whose score is not
    ∇log π_θ(y|x); and a round samples once, so after its first optimizer step the samples are from an older θ
    (the term would need importance weights π_θ/π_θ₀, which we do not apply).

    By hand, β = 1, h = ln 3 (σ(z) = ¾), λ = ½, on-policy, coefficients 1, ``plain``:
      f_judge = ln ¾ = −0.2876821;  f_self = ¾ ln ¾ + ¼ ln ¼ = −0.2157616 − 0.3465736 = −0.5623351
      f = ½(−0.2876821) + ½(−0.5623351) = −0.4250086  →  loss = 0.4250086
      ∂loss/∂policy_chosen   = −[½·σ(−z) + ½·z·σ(z)σ(−z) + f] = −[0.125 + 0.1029949 − 0.4250086] = 0.1970137
      ∂loss/∂policy_rejected = −[−0.125 − 0.1029949 − 0.4250086] = 0.6530035
      off-policy (no part 3): ∓0.2279949 for chosen/rejected.
    """
    lam = float(self_label_prob)
    ratio_w, ratio_l = policy_chosen_seq - ref_chosen_seq, policy_rejected_seq - ref_rejected_seq
    z = beta * (ratio_w - ratio_l)
    logsig_pos, logsig_neg = F.logsigmoid(z), F.logsigmoid(-z)
    p_self = torch.sigmoid(z)
    p_self = p_self.detach() + label_coef * (p_self - p_self.detach())  # value σ(z); gradient scaled (part 2)
    f_self = p_self * logsig_pos + (1 - p_self) * logsig_neg
    f = (1 - lam) * logsig_pos + lam * f_self
    on = on_policy.to(f.dtype)
    fd = f.detach()
    d_chosen = policy_chosen_seq - policy_chosen_seq.detach()  # value 0, gradient ∇log π(y_w|x)
    d_rejected = policy_rejected_seq - policy_rejected_seq.detach()
    if score_term == "hook":  # ∂(−score)/∂log π(y) = −γ·f/log π(y), per side
        w_chosen, w_rejected = fd / policy_chosen_seq.detach(), fd / policy_rejected_seq.detach()
        score = score_coef * on * (w_chosen * d_chosen + w_rejected * d_rejected)
        weight = score_coef * on * 0.5 * (w_chosen + w_rejected)
    elif score_term in ("plain", "baseline"):
        adv = fd * on if score_term == "plain" else _leave_one_out_advantage(fd, on_policy)
        score = score_coef * adv * (d_chosen + d_rejected)
        weight = score_coef * adv
    else:
        raise ValueError(f"sail score_term: unknown form {score_term!r}; known: baseline, plain, hook")
    loss_b = -(f + score)  # part 3, value 0
    metrics = reward_metrics(beta, ratio_w, ratio_l)
    metrics["sail/self_label_entropy"] = -f_self.detach()
    metrics["sail/on_policy"] = on.detach()
    # the size of part 3's coefficient on ∇log π (per side) next to DPO's β·σ(−z) on ∇ρ: the two scales to compare
    metrics["sail/score_weight"] = weight.detach().abs()
    metrics["sail/dpo_weight"] = beta * torch.sigmoid(-z.detach())
    return loss_b, metrics


# -- weighting ------------------------------------------------------------------------------------------------------
def wpo_pair_weight(log_w_chosen_seq: Tensor, log_w_rejected_seq: Tensor, *, clamp: bool) -> Tensor:
    """WPO pair weight w(y_w)·w(y_l) = exp(log w_w + log w_l) (Zhou et al. 2024, Eq. 2), detached.

    ``clamp=True`` caps it at 1 as the original WPO code does; ``False`` is TRL's ``use_weighting``.
    By hand: log w_w = −0.1, log w_l = −0.3 → exp(−0.4) = 0.6703200; log w_w = 0.3, log w_l = 0.2 → exp(0.5) =
    1.6487213 unclamped, 1 clamped.
    """
    w = torch.exp(log_w_chosen_seq.detach() + log_w_rejected_seq.detach())
    return w.clamp(max=1.0) if clamp else w
