"""Loss functions against hand-worked numbers and the authors' code (uclaml/SPPO ``sppo/trainer.py``, the SAIL authors'
``cdpo/cdpo_trainer.py`` in github.com/xudongwu-0/SAIL at c3a4ef3); SAIL's gradient against the exact gradient of its
objective."""

from __future__ import annotations

import inspect
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline_lib.losses import (dpo_loss, hinge_loss, ipo_loss, sail_loss, sppo_hard_loss, sppo_loss, sppo_single_loss,
                                 wpo_pair_weight)
from pipeline_lib.methods import LOSSES, MethodConfig

LN3 = math.log(3.0)


def t(*v, grad=False):
    return torch.tensor(v, dtype=torch.float64, requires_grad=grad)


def test_dpo_by_hand():
    """β = 0.1, Δ = 10·ln 3 → βΔ = ln 3, σ = 3/4: −ln(3/4) = 0.2876821; with ε = 0.1:
    0.9·0.2876821 + 0.1·ln 4 (1.3862944) = 0.3975433. d loss/d policy_chosen = −β·σ(−βΔ) = −0.1·0.25 = −0.025."""
    pc = t(10 * LN3, grad=True)
    loss, m = dpo_loss(pc, t(0.0), t(0.0), t(0.0), beta=0.1)
    assert loss.item() == pytest.approx(0.2876821, abs=1e-7)
    loss.sum().backward()
    assert pc.grad.item() == pytest.approx(-0.025, abs=1e-9)
    smooth, _ = dpo_loss(t(10 * LN3), t(0.0), t(0.0), t(0.0), beta=0.1, label_smoothing=0.1)
    assert smooth.item() == pytest.approx(0.3975433, abs=1e-7)


def test_reward_metrics_by_hand():
    """β = 0.1, ρ_w = −8 − (−10) = 2, ρ_l = −12 − (−11) = −1 → rewards 0.2 and −0.1, margin 0.3, accuracy 1."""
    _, m = dpo_loss(t(-8.0), t(-12.0), t(-10.0), t(-11.0), beta=0.1)
    assert m["rewards/chosen"].item() == pytest.approx(0.2)
    assert m["rewards/rejected"].item() == pytest.approx(-0.1)
    assert m["rewards/margins"].item() == pytest.approx(0.3)
    assert m["rewards/accuracies"].item() == 1.0


def test_ipo_and_hinge_by_hand():
    """IPO, β = 0.5 (target margin 1): Δ = 0.5 → 0.25. Hinge, β = 0.1: Δ = 4 → 0.6, Δ = 12 → 0."""
    loss, _ = ipo_loss(t(0.5), t(0.0), t(0.0), t(0.0), beta=0.5)
    assert loss.item() == pytest.approx(0.25)
    loss, _ = hinge_loss(t(4.0, 12.0), t(0.0, 0.0), t(0.0, 0.0), t(0.0, 0.0), beta=0.1)
    assert loss.tolist() == pytest.approx([0.6, 0.0])


def test_sppo_by_hand():
    """β = 0.5 (η = 2), P̂_w = 0.8, P̂_l = 0.3 → targets 0.6, −0.4; ρ_w = 1, ρ_l = −1 → ½(0.4² + 0.6²) = 0.26."""
    loss, _ = sppo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), beta=0.5, chosen_winprob=t(0.8),
                        rejected_winprob=t(0.3))
    assert loss.item() == pytest.approx(0.26)


def test_sppo_single_by_hand_and_symmetric():
    """uclaml/SPPO sppo/trainer.py lines 880-883: loss_w = (ρ_w − η(P − ½))², loss_l = (ρ_l + η(P − ½))², mean of the
    two. β = 0.5 (η = 2), P(y_w ≻ y_l) = 0.8 → targets ±0.6; ρ_w = 1, ρ_l = −1 → ½(0.4² + 0.4²) = 0.16. Swapping
    the responses (P → 1 − P) gives the same loss."""
    loss, _ = sppo_single_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), beta=0.5, pair_winprob=t(0.8))
    assert loss.item() == pytest.approx(0.16)
    swapped, _ = sppo_single_loss(t(-12.0), t(-10.0), t(-11.0), t(-11.0), beta=0.5, pair_winprob=t(0.2))
    assert swapped.item() == pytest.approx(0.16)


def test_sppo_hard_by_hand_and_as_twice_sppo_with_hard_labels():
    """β = 0.5: ρ_w = 2, ρ_l = 0 → (2 − 1)² + (0 + 1)² = 2. With P̂_w = 1, P̂_l = 0, sppo is half of it."""
    loss, _ = sppo_hard_loss(t(2.0), t(0.0), t(0.0), t(0.0), beta=0.5)
    assert loss.item() == pytest.approx(2.0)
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(8, generator=g, dtype=torch.float64) * 5 for _ in range(4))
    hard, _ = sppo_hard_loss(pc, pr, rc, rr, beta=0.2)
    soft, _ = sppo_loss(pc, pr, rc, rr, beta=0.2, chosen_winprob=torch.ones(8), rejected_winprob=torch.zeros(8))
    torch.testing.assert_close(hard, 2 * soft)


def test_wpo_pair_weight_by_hand():
    """exp(−0.1 − 0.3) = 0.6703200 (clamp irrelevant); exp(0.3 + 0.2) = 1.6487213 unclamped, 1 clamped."""
    lw_c, lw_r = t(-0.1, 0.3), t(-0.3, 0.2)
    assert wpo_pair_weight(lw_c, lw_r, clamp=False).tolist() == pytest.approx([0.6703200, 1.6487213])
    assert wpo_pair_weight(lw_c, lw_r, clamp=True).tolist() == pytest.approx([0.6703200, 1.0])


def test_sail_value_and_gradients_by_hand():
    """Worked in ``sail_loss``'s docstring: β = 1, h = ln 3, λ = ½ → loss 0.4250086; on-policy gradients
    (0.1970137, 0.6530035) w.r.t. (policy_chosen, policy_rejected); off-policy (−0.2279949, +0.2279949)."""
    for on_policy, grads in ((True, (0.1970137, 0.6530035)), (False, (-0.2279949, 0.2279949))):
        pc, pr = t(LN3, grad=True), t(0.0, grad=True)
        loss, m = sail_loss(pc, pr, t(0.0), t(0.0), beta=1.0, on_policy=torch.tensor([on_policy]),
                            self_label_prob=0.5, score_term="plain")
        assert loss.item() == pytest.approx(0.4250086, abs=1e-7)
        loss.sum().backward()
        assert (pc.grad.item(), pr.grad.item()) == pytest.approx(grads, abs=1e-7)
        assert m["sail/self_label_entropy"].item() == pytest.approx(0.5623351, abs=1e-7)


def test_sail_with_judge_labels_only_and_off_policy_is_dpo():
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (torch.randn(6, generator=g, dtype=torch.float64) * 3 for _ in range(4))
    sail, _ = sail_loss(pc, pr, rc, rr, beta=0.3, on_policy=torch.zeros(6, dtype=torch.bool))
    dpo, _ = dpo_loss(pc, pr, rc, rr, beta=0.3)
    torch.testing.assert_close(sail, dpo)


# -- SAIL on a toy with an enumerable response space ------------------------------------------------------------------
K, BETA = 3, 0.7
THETA_REF = torch.tensor([0.2, -0.4, 0.1], dtype=torch.float64)
SCORES = torch.tensor([1.0, 0.0, -0.5], dtype=torch.float64)  # judge: P*(i ≻ j) = σ(s_i − s_j)
Q_OFFLINE = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)  # response distribution of an offline dataset


def _toy_terms(theta):
    """All ordered pairs (i, j) and both judge orders: (winner, loser, judge probability of that order)."""
    logp = torch.log_softmax(theta, 0)
    logp_ref = torch.log_softmax(THETA_REF, 0)
    rows = [(i, j, w, l, torch.sigmoid(SCORES[w] - SCORES[l]))
            for i, j in itertools.product(range(K), repeat=2) for w, l in ((i, j), (j, i))]
    return logp, logp_ref, rows


def _exact_objective(theta, lam, on_policy):
    """J(θ) = Σ_ij μ_i μ_j Σ_order P*(order) [(1−λ) log σ(z) + λ(σ(z) log σ(z) + σ(−z) log σ(−z))], z = βh(w, l);
    μ = π_θ on-policy, μ = q offline. A finite sum: its autograd gradient is the closed-form expected gradient."""
    logp, logp_ref, rows = _toy_terms(theta)
    mu = torch.exp(logp) if on_policy else Q_OFFLINE
    total = 0.0
    for i, j, w, l, p_order in rows:
        z = BETA * ((logp[w] - logp_ref[w]) - (logp[l] - logp_ref[l]))
        f_self = torch.sigmoid(z) * F.logsigmoid(z) + torch.sigmoid(-z) * F.logsigmoid(-z)
        total = total + mu[i] * mu[j] * p_order * ((1 - lam) * F.logsigmoid(z) + lam * f_self)
    return total


def _expected_surrogate_gradient(theta, lam, on_policy, **coefs):
    """Σ over the same outcomes of (probability of the outcome) × ∇ sail_loss, probabilities held constant."""
    theta = theta.detach().requires_grad_(True)
    logp, logp_ref, rows = _toy_terms(theta)
    mu = (torch.exp(logp) if on_policy else Q_OFFLINE).detach()
    w_idx = torch.tensor([r[2] for r in rows])
    l_idx = torch.tensor([r[3] for r in rows])
    prob_b = torch.stack([mu[i] * mu[j] * p for i, j, _, _, p in rows])
    loss_b, _ = sail_loss(logp[w_idx], logp[l_idx], logp_ref[w_idx], logp_ref[l_idx], beta=BETA,
                          on_policy=torch.full((len(rows),), on_policy), self_label_prob=lam, score_term="plain",
                          **coefs)
    (prob_b * loss_b).sum().backward()
    return theta.grad


@pytest.mark.parametrize("lam,on_policy,variant", [
    (0.0, True, "SAIL-PR: policy responses, judge labels"),
    (1.0, True, "SAIL-PP: policy responses, self labels"),
    (1.0, False, "SAIL-DDP: offline responses, self labels"),
    (0.4, True, "mixture of judge and self labels on policy responses"),
    (0.4, False, "offline responses, mixed labels"),
])
def test_sail_expected_gradient_equals_gradient_of_its_objective(lam, on_policy, variant):
    theta = torch.tensor([0.5, -0.3, 0.9], dtype=torch.float64, requires_grad=True)
    (-_exact_objective(theta, lam, on_policy)).backward()
    got = _expected_surrogate_gradient(theta, lam, on_policy)
    torch.testing.assert_close(got, theta.grad, rtol=1e-10, atol=1e-12, msg=variant)


@pytest.mark.parametrize("lam,on_policy,coefs", [
    (0.0, True, {"score_coef": 0.0}),  # plain DPO on policy samples misses the score-function term
    (1.0, False, {"label_coef": 0.0}),  # self-labels without their gradient teach nothing (pathwise part is 0)
])
def test_sail_without_its_extra_terms_is_not_the_gradient(lam, on_policy, coefs):
    theta = torch.tensor([0.5, -0.3, 0.9], dtype=torch.float64, requires_grad=True)
    (-_exact_objective(theta, lam, on_policy)).backward()
    got = _expected_surrogate_gradient(theta, lam, on_policy, **coefs)
    assert (got - theta.grad).abs().max() > 1e-3
    if coefs.get("label_coef") == 0.0:
        assert got.abs().max() < 1e-12


@pytest.mark.parametrize("lam", [0.0, 1.0, 0.4])
def test_sail_baseline_keeps_the_expected_gradient(lam):
    """A batch of two independent on-policy pairs: each row's baseline is the other row's f, independent of its own
    responses, so E[(f_i − f_j)·∇log π_i] = E[f_i ∇log π_i] and the expected gradient of the batch-mean loss is
    still the exact gradient of −J. Enumerated over every (outcome, outcome) batch of the toy."""
    theta = torch.tensor([0.5, -0.3, 0.9], dtype=torch.float64, requires_grad=True)
    (-_exact_objective(theta, lam, True)).backward()
    th = theta.detach().requires_grad_(True)
    logp, logp_ref, rows = _toy_terms(th)
    mu = torch.exp(logp).detach()
    prob = [mu[i] * mu[j] * p for i, j, _, _, p in rows]
    total = 0.0
    for (a, ra), (b, rb) in itertools.product(enumerate(rows), repeat=2):
        w, l = torch.tensor([ra[2], rb[2]]), torch.tensor([ra[3], rb[3]])
        loss_b, _ = sail_loss(logp[w], logp[l], logp_ref[w], logp_ref[l], beta=BETA, self_label_prob=lam,
                              on_policy=torch.ones(2, dtype=torch.bool), score_term="baseline")
        total = total + prob[a] * prob[b] * loss_b.mean()
    total.backward()
    torch.testing.assert_close(th.grad, theta.grad, rtol=1e-10, atol=1e-12)


def test_sail_score_terms_by_hand():
    """The issue's worked point, β = 0.1, ρ_w = −2, ρ_l = −1 (h = −1, z = −0.1): f = log σ(−0.1) = −0.7443967, DPO's
    ∂L/∂log π = ∓β·σ(0.1) = ∓0.0524979. With γ = 0.3 (log π_w = −64, log π_l = −50):
      plain: ∂L/∂log π_w = −0.0524979 + 0.3·0.7443967 = 0.1708211, ∂L/∂log π_l = 0.0524979 + 0.2233190 = 0.2758169;
      hook (cdpo_trainer.py lines 1146-1178, −γ·f/log π): −0.0524979 − 0.3·0.7443967/64 = −0.0559873 and
        0.0524979 − 0.3·0.7443967/50 = 0.0480315.
    Baseline, score_coef 1, a batch of three on-policy pairs with h = −1, 0, 10 (z = −0.1, 0, 1):
      f = (−0.7443967, −0.6931472, −0.3132617); baselines (others' mean) = (−0.5032044, −0.5288292, −0.7187719);
      f − b = (−0.2411922, −0.1643180, 0.4055102); ∂L_i/∂log π_w,i = −β·σ(−z_i) − (f_i − b_i), ∂L_i/∂log π_l,i =
      +β·σ(−z_i) − (f_i − b_i): (0.1886943, 0.2936901), (0.1143180, 0.2143180), (−0.4324044, −0.3786161)."""
    for form, coef, want in (("plain", 0.3, (0.1708211, 0.2758169)), ("hook", 0.3, (-0.0559873, 0.0480315))):
        pc, pr = t(-64.0, grad=True), t(-50.0, grad=True)
        loss, m = sail_loss(pc, pr, t(-62.0), t(-49.0), beta=0.1, on_policy=torch.tensor([True]), score_coef=coef,
                            score_term=form)
        assert loss.item() == pytest.approx(0.7443967, abs=1e-7)  # the value is −f in every form
        loss.sum().backward()
        assert (pc.grad.item(), pr.grad.item()) == pytest.approx(want, abs=1e-7), form
    pc, pr = t(-20.0, -20.0, -10.0, grad=True), t(-19.0, -20.0, -20.0, grad=True)
    loss, m = sail_loss(pc, pr, t(0.0, 0.0, 0.0), t(0.0, 0.0, 0.0), beta=0.1,
                        on_policy=torch.ones(3, dtype=torch.bool))  # the default form: baseline
    loss.sum().backward()
    assert pc.grad.tolist() == pytest.approx([0.1886943, 0.1143180, -0.4324044], abs=1e-7)
    assert pr.grad.tolist() == pytest.approx([0.2936901, 0.2143180, -0.3786161], abs=1e-7)
    assert m["sail/score_weight"].tolist() == pytest.approx([0.2411922, 0.1643180, 0.4055102], abs=1e-7)
    assert m["sail/dpo_weight"].tolist() == pytest.approx([0.0524979, 0.05, 0.0268941], abs=1e-7)
    # one on-policy pair in its batch has no baseline, and off-policy rows neither get nor give one: DPO's gradient
    pc, pr = t(-20.0, -20.0, grad=True), t(-19.0, -20.0, grad=True)
    loss, _ = sail_loss(pc, pr, t(0.0, 0.0), t(0.0, 0.0), beta=0.1, on_policy=torch.tensor([True, False]))
    loss.sum().backward()
    assert pc.grad.tolist() == pytest.approx([-0.0524979, -0.05], abs=1e-7)


def test_sail_hook_form_equals_the_authors_gradient_hook():
    """The authors' DPR step (cdpo_trainer.py: loss = mean_b −log σ(β h_b), lines 1122 and 1377; hooks on the policy
    log-probs that return grad − γ·log σ(β h)/log π, lines 1142-1183), rebuilt with tensor hooks, against
    ``score_term="hook"``: the hook acts on the gradient of the batch mean, so it equals score_coef = γ·B."""
    g = torch.Generator().manual_seed(3)
    b, beta, gamma = 4, 0.1, 0.3
    pc0, pr0 = -10 - 40 * torch.rand(b, generator=g, dtype=torch.float64), -10 - 40 * torch.rand(
        b, generator=g, dtype=torch.float64)
    rc, rr = pc0 + torch.randn(b, generator=g, dtype=torch.float64), pr0 + torch.randn(b, generator=g,
                                                                                      dtype=torch.float64)
    pc, pr = pc0.clone().requires_grad_(True), pr0.clone().requires_grad_(True)
    logsig = F.logsigmoid(beta * ((pc - rc) - (pr - rr)))
    f = logsig.detach()
    pc.register_hook(lambda grad: grad - gamma * f / pc0)
    pr.register_hook(lambda grad: grad - gamma * f / pr0)
    (-logsig).mean().backward()
    ours_c, ours_r = pc0.clone().requires_grad_(True), pr0.clone().requires_grad_(True)
    loss_b, _ = sail_loss(ours_c, ours_r, rc, rr, beta=beta, on_policy=torch.ones(b, dtype=torch.bool),
                          score_coef=gamma * b, score_term="hook")
    loss_b.mean().backward()
    torch.testing.assert_close(ours_c.grad, pc.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ours_r.grad, pr.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("beta,h,rho", [(0.1, -1.0, 0.2), (1.0, LN3, 0.5)])
def test_sail_label_coef_is_the_codes_squared_label_term_in_expectation(beta, h, rho):
    """The code's DDP (cdpo_trainer.py): the pair's order is swapped with probability 1 − σ(βh) (lines 1073-1081, the
    probability not differentiated), and −½ρ(log σ(βh'))² is added to −log σ(βh') (lines 1122-1128). Its expected
    gradient equals sail_loss with λ = 1 and label_coef = ρ: both are −βρ·z σ(z) σ(−z) on ∂/∂log π_w (by hand:
    β = 0.1, h = −1, ρ = 0.2 → 0.0004988; β = 1, h = ln 3, ρ = ½ → −0.1029949)."""
    def code_loss(pc, pr, sign):
        logsig = F.logsigmoid(beta * sign * (pc - pr))
        return -logsig - 0.5 * rho * logsig ** 2

    pc, pr = t(h, grad=True), t(0.0, grad=True)
    p_keep = torch.sigmoid(t(beta * h))
    expected = p_keep * code_loss(pc, pr, 1.0) + (1 - p_keep) * code_loss(pc, pr, -1.0)
    expected.sum().backward()
    ours_c, ours_r = t(h, grad=True), t(0.0, grad=True)
    loss, _ = sail_loss(ours_c, ours_r, t(0.0), t(0.0), beta=beta, on_policy=torch.tensor([False]),
                        self_label_prob=1.0, label_coef=rho)
    loss.sum().backward()
    torch.testing.assert_close(ours_c.grad, pc.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ours_r.grad, pr.grad, rtol=1e-12, atol=1e-14)
    want = -beta * rho * beta * h * math.prod((torch.sigmoid(t(beta * h)).item(), torch.sigmoid(t(-beta * h)).item()))
    assert ours_c.grad.item() == pytest.approx(want, abs=1e-12)


# -- registry -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_registry_entries_accept_what_they_declare(name):
    spec = LOSSES[name]
    params = inspect.signature(spec.fn).parameters
    method = MethodConfig(loss=name, reference=(spec.references or ("initial",))[0],
                          pairs="sppo_winprob" if set(spec.columns) - {"on_policy"} else "best_worst")
    for key in ("beta", *method.loss_kwargs(), *spec.columns):
        assert key in params, f"{name}: declares {key!r} but its function does not take it"
    assert spec.aggregation in ("sum", "mean")


def test_method_config_loss_kwargs():
    assert MethodConfig().loss_kwargs() == {"label_smoothing": 0.0}
    assert MethodConfig(loss="sail", sail={"self_label_prob": 0.25}).loss_kwargs() == {
        "self_label_prob": 0.25, "score_coef": 1.0, "score_term": "baseline", "label_coef": 1.0}
    assert MethodConfig(loss="ipo", weighting="wpo", wpo={"alignment": "greedy"}).loss_kwargs() == {}
