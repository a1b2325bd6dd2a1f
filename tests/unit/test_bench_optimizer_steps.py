"""bench.optimizer_steps: the schedule and the first steps, worked by hand."""

from __future__ import annotations

import pytest


def test_schedule_is_transformers_linear_with_warmup():
    from bench.optimizer_steps import schedule

    # 20 steps, 10% warm-up = 2 steps: 1/2, 1, then 18/18 ... 1/18
    assert schedule(20, 0.1) == [0.5, 1.0] + [(20 - s) / 18 for s in range(2, 20)]


def test_first_steps_by_hand():
    """A constant gradient g: Adam's bias-corrected first step is lr; RMSprop's (alpha 0.99, v0 = 0, no bias
    correction) is lr * g / sqrt(0.01 g^2) = 10 lr, then lr / sqrt(1 - 0.99^2) = 7.09 lr."""
    import torch

    from bench.optimizer_steps import displacement

    g = [torch.full((4,), 3.0)] * 2
    assert displacement("adamw", g[:1], [1.0])["first_step_over_lr"] == pytest.approx(1.0, rel=1e-6)
    assert displacement("rmsprop", g[:1], [1.0])["first_step_over_lr"] == pytest.approx(10.0, rel=1e-6)
    two = displacement("rmsprop", g, [1.0, 1.0])["displacement_over_peak_lr"]
    assert two == pytest.approx(10.0 + 1 / (1 - 0.99 ** 2) ** 0.5, rel=1e-5)
