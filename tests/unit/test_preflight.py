"""`alignflow run` resolves every model reference and sizes its data before the flow starts (issue 22, should-fix):
each bad one is a one-line error, exit 2, and the flow (Prefect's server, ~25 s) never starts."""

from __future__ import annotations

import pytest


@pytest.fixture
def no_flow(monkeypatch, tmp_path):
    import flows.round

    def started(cfg):
        raise AssertionError("the flow started before the bad reference was found")

    monkeypatch.setattr(flows.round, "alignment_round", started)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


@pytest.mark.parametrize("override, needle", [
    ("judge.model=/no/such/reward-model", "model '/no/such/reward-model': no such directory"),  # after a collect
    ("initial_policy=/no/such/initial", "model '/no/such/initial': no such directory"),  # after the server
    ("policy=models:/nobody@champion", "model 'models:/nobody@champion': not found in the MLflow registry"),
    ("prompts.n_train=10000000", "builtin prompts: 10000000 train prompts asked for; the generator draws at most"),
    ("collect.k=10000", "collect.k: Input should be less than or equal to 256"),
])
def test_bad_reference_or_size_fails_before_the_flow(no_flow, capsys, override, needle):
    from pipeline_lib import cli

    extra = ["judge.kind=reward_model"] if override.startswith("judge.model") else []
    assert cli.main(["run", "--config", "configs/smoke.yaml", *extra, override]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "mlflow.store.db.utils" not in line]
    assert len(err) == 1 and err[0].startswith("alignflow: error: ") and needle in err[0], err
