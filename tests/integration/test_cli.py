import subprocess
import sys

import pytest

from pipeline_lib.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "pipeline_lib.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_bad_config_key_exits_2_naming_the_key():
    p = run_cli("run", "--config", "configs/smoke.yaml", "train.betta=0.3")
    assert p.returncode == 2
    assert "train.betta: unknown key" in p.stderr and "Traceback" not in p.stderr


def test_bad_value_exits_2_naming_the_key():
    p = run_cli("run", "--config", "configs/smoke.yaml", "collect.k=zero")
    assert p.returncode == 2 and "collect.k" in p.stderr


def test_missing_model_exits_2_naming_it(tmp_path):
    p = run_cli("run", "--config", "configs/smoke.yaml", f"policy={tmp_path}/nope", f"run.work_dir={tmp_path}",
                f"run.mlflow_tracking_uri=sqlite:///{tmp_path}/m.db")
    assert p.returncode != 0 and f"{tmp_path}/nope" in p.stderr


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    # every registered subcommand is listed, and the task groups name each of them
    import re

    listed = re.findall(r"^    ([a-z][a-z-]+)", out, flags=re.M)
    assert listed[:3] == ["run", "campaign", "serve"]
    groups = out.split("commands by task:")[1].split("examples:")[0]
    assert all(name in groups for name in listed), (listed, groups)
