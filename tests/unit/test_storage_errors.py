"""What a full disk, a read-only work dir, a kill -9 and a shared work dir leave behind (issue 22, should-fix):
non-retryable one-line errors naming the file, model files readable as the umask says, no stale /tmp directories."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipeline_lib.artifacts import write_model, write_table
from pipeline_lib.errors import describe_storage_error, storage_error


@pytest.fixture
def tiny_fs(tmp_path):
    """A 1 MiB tmpfs (needs root and mount(2); skipped elsewhere): a real ENOSPC, then a real EROFS."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                            capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_full_disk_names_the_artifact_and_is_not_retried(tiny_fs):
    df = pd.DataFrame({"x": [os.urandom(64).hex() for _ in range(40_000)]})  # ~5 MB of incompressible text
    final = tiny_fs / "work" / "artifacts" / "collect" / "abc"
    with pytest.raises(OSError) as e:
        write_table(df, final, name="generations", producer="test")
    assert e.value.errno == errno.ENOSPC and str(final) in str(e.value.filename)
    assert storage_error(e.value)
    assert describe_storage_error(e.value) == (f"no space left on device (ENOSPC) writing {final}; free space or "
                                               "fix the permissions of run.work_dir, or point run.work_dir elsewhere")
    assert not list(final.parent.iterdir())  # the temporary directory is gone, nothing under the final name

    subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], check=True)
    with pytest.raises(OSError) as e:
        write_table(df.head(3), tiny_fs / "work" / "artifacts" / "pair" / "def", name="pairs", producer="test")
    assert e.value.errno == errno.EROFS and "artifacts/pair" in str(e.value.filename)
    assert describe_storage_error(e.value).startswith("read-only file system (EROFS) writing ")


def test_retry_policy_does_not_retry_storage_errors():
    """retry_transient on states holding real errors: ENOSPC from /dev/full and EROFS are final, a dead engine is not."""
    from prefect.states import Failed

    from tasks.common import retry_transient

    try:
        with open("/dev/full", "w") as f:
            f.write("x")
    except OSError as e:
        full = e
    assert full.errno == errno.ENOSPC
    ro = OSError(errno.EROFS, "Read-only file system", "/runs/artifacts/x")
    assert not retry_transient(None, None, Failed(data=full))
    assert not retry_transient(None, None, Failed(data=ro))
    assert retry_transient(None, None, Failed(data=RuntimeError("vLLM engine died")))
    assert retry_transient(None, None, Failed(data=OSError(errno.ECONNRESET, "Connection reset")))


def test_cli_prints_one_line_for_a_storage_error(monkeypatch, capsys):
    import pipeline_lib.commands.run as run_cmd
    from pipeline_lib import cli

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/artifacts/train/k1")

    monkeypatch.setattr(run_cmd, "run", full)
    assert cli.main(["run", "--config", "configs/smoke.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["alignflow: error: no space left on device (ENOSPC) writing /runs/artifacts/train/k1; free space "
                   "or fix the permissions of run.work_dir, or point run.work_dir elsewhere"]


def test_model_files_get_the_modes_the_umask_allows(tmp_path):
    """transformers writes model.safetensors through a 0600 temporary file; on a shared work dir the other users
    could read every file of a checkpoint but its weights. Under umask 022 every file is 0644."""
    def build(d: Path) -> None:
        (d / "config.json").write_text("{}")
        w = d / "model.safetensors"
        w.write_bytes(b"weights")
        os.chmod(w, 0o600)

    old = os.umask(0o022)
    try:
        ref = write_model(build, tmp_path / "ckpt", name="checkpoint", producer="test")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in Path(ref.path).iterdir()}
    assert modes["model.safetensors"] == 0o644 and modes["config.json"] == 0o644


def test_stale_generation_temp_dirs_are_swept(tmp_path, monkeypatch):
    """A kill -9 of a collect left /tmp/alignflow-gen-* behind (prompt ids, generations). The next generation call
    removes those of dead processes, and only those."""
    import tempfile

    from pipeline_lib.generation import sampling

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"alignflow-gen-{dead.pid}-abcd"
    live = tmp_path / f"alignflow-gen-{os.getpid()}-efgh"
    other = tmp_path / "alignflow-charts-xyz"
    for d in (stale, live, other):
        d.mkdir()
        (d / "spec.json").write_text("{}")
    assert sampling.sweep_stale_tmp() == [stale]
    assert not stale.exists() and live.exists() and other.exists()
