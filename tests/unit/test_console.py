"""The quiet terminal: what libraries write (Python, C-level writes, child processes, warnings) goes to the log
file; the product's lines and results keep the terminal; warnings from run loggers come back as one line."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import logging, os, subprocess, sys, warnings
    from pathlib import Path
    from pipeline_lib import console
    with console.library_output_to(Path(sys.argv[1]) if sys.argv[1] != "-" else None):
        print("library print")
        os.write(2, b"c-level write\\n")
        subprocess.run([sys.executable, "-c", "import sys; print('child out'); print('child err', file=sys.stderr)"])
        warnings.warn("a library warning")
        logging.getLogger("prefect.task_runs").warning("retrying collect\\nTraceback (most recent call last): ...")
        console.say("[collect] done")
        print("| table |", file=console.stdout())
    print("after")
""")


def _run(log: str):
    return subprocess.run([sys.executable, "-c", SCRIPT, log], capture_output=True, text=True, cwd=REPO,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=60)


def test_library_output_goes_to_the_log_and_product_lines_to_the_terminal(tmp_path):
    log = tmp_path / "logs" / "run.log"
    p = _run(str(log))
    assert p.returncode == 0, p.stderr
    assert p.stdout == "| table |\nafter\n"
    # the run logger's warning in one line (its traceback stays out), then the product's line
    assert p.stderr.splitlines() == ["warning: [prefect.task_runs] retrying collect", "[collect] done"], p.stderr
    text = log.read_text()
    for line in ("library print", "c-level write", "child out", "child err", "a library warning"):
        assert line in text, line
    assert "[collect] done" not in text and "| table |" not in text


def test_verbose_changes_nothing(tmp_path):
    p = _run("-")
    assert p.returncode == 0
    assert sorted(p.stdout.splitlines()) == sorted(["library print", "child out", "| table |", "after"])
    for line in ("c-level write", "child err", "a library warning", "[collect] done"):
        assert line in p.stderr


def test_an_error_names_only_its_own_commands_log(tmp_path, capsys, monkeypatch):
    # an earlier command in this process (a test session, a notebook) left its log path behind; a config error in the
    # next command, raised before that command opened a log, must not send the user to the earlier command's file
    from pipeline_lib import cli, console

    monkeypatch.setattr(console, "_last_log", [tmp_path / "earlier-command.log"])
    assert cli.main(["run", "--config", "configs/smoke.yaml", "collect.k=0"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("alignflow: error: collect.k"), err
