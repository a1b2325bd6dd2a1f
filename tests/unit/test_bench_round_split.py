"""bench.round's roofline split, on numbers worked out by hand."""

import pytest

from bench.round import DETAIL_KEYS, roofline_split


def _d(**kw):
    return {**{k: 0.0 for k in DETAIL_KEYS}, **kw}


def test_roofline_split_by_hand():
    details = {"collect": _d(stage_s=100, generated_tokens=10_000, generate_s=40, engine_load_s=5),
               "train": _d(stage_s=200, train_flops=6e13, train_s=150, setup_s=30),
               "pair": _d(stage_s=1)}
    rows = {r["stage"]: r for r in roofline_split(details, n_matmul=100_000_000, peak_tflops=1.0)}
    # collect: 10,000 tokens x 2 x 1e8 FLOPs / 1e12 FLOP/s = 2 s; the rest = 100 - 5 - 40
    assert rows["collect"]["roofline_s"] == pytest.approx(2.0)
    assert rows["collect"]["rest_s"] == pytest.approx(55.0)
    assert rows["collect"]["x_roofline"] == pytest.approx(50.0)
    # train: 6e13 / 1e12 = 60 s; the rest = 200 - 150 - 30
    assert rows["train"]["roofline_s"] == pytest.approx(60.0)
    assert rows["train"]["rest_s"] == pytest.approx(20.0)
    assert rows["pair"]["roofline_s"] == 0.0 and rows["pair"]["rest_s"] == 1.0
    total = rows["all stages"]
    assert total["stage_s"] == 301 and total["roofline_s"] == pytest.approx(62.0)
    assert total["x_roofline"] == pytest.approx(301 / 62)
    assert [r["stage"] for r in roofline_split(details, 1, 1.0)][:3] == ["train", "collect", "pair"]  # longest first


def test_reuse_compare_order_and_saving_by_hand(monkeypatch):
    """Rounds off, on, on, off, each told its mode through the environment; walls 100, 80, 84, 104 s: mean off 102,
    on 82, saved 20 s = 19.6%."""
    import bench.round as br

    calls = []

    def fake_round(config, n_train, overrides, warm_store=True, env=None):
        calls.append(env["ALIGNFLOW_REUSE_WORKER"])
        wall = [100.0, 80.0, 84.0, 104.0][len(calls) - 1]
        return {"round_wall_s": wall, "per_stage_s": {"collect": wall / 2}}

    monkeypatch.setattr(br, "run_round", fake_round)
    out = br.reuse_compare("configs/default.yaml", 32, [])
    assert calls == ["off", "on", "on", "off"]
    assert out["mean_round_wall_s"] == {"off": 102.0, "on": 82.0}
    assert out["saved_s"] == 20.0 and abs(out["saved_share"] - 20 / 102) < 1e-12
    assert [r["collect s"] for r in out["rows"]] == [50.0, 40.0, 42.0, 52.0]
