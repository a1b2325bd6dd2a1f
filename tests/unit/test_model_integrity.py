"""A model directory changed in place is never used under its old digest (issue 22, finding 4)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline_lib.artifacts import ArtifactRef, tree_hash
from pipeline_lib.models import HASH_SIDECAR, ModelError, dir_hash, resolve


def _model_dir(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (d / "model.safetensors").write_bytes(bytes(range(256)) * 16)
    return d


def _corrupt_in_place(f: Path) -> None:
    """Flip one byte without changing the size, then put the mtime back (what the red team did)."""
    st = f.stat()
    with open(f, "r+b") as fh:
        fh.seek(100)
        b = fh.read(1)
        fh.seek(100)
        fh.write(bytes([b[0] ^ 0xFF]))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns


def test_dir_hash_sees_a_file_corrupted_in_place_with_its_mtime_restored(tmp_path):
    d = _model_dir(tmp_path / "m")
    clean = dir_hash(d)
    assert (d / HASH_SIDECAR).is_file() and dir_hash(d) == clean  # memoised
    _corrupt_in_place(d / "model.safetensors")
    assert dir_hash(d) == tree_hash(d, exclude=(HASH_SIDECAR, "manifest.json"))[0] != clean


def test_registered_version_changed_after_registration_is_refused(tmp_path, monkeypatch):
    """models:/ resolves by rehashing the directory and comparing with the version's alignflow.sha256: a match
    resolves (to that digest); after an in-place corruption the reference is refused, naming both digests."""
    from pipeline_lib.lineage import RoundLineage

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    d = _model_dir(tmp_path / "ckpt")
    clean = dir_hash(d)
    lin = RoundLineage(uri, "integrity")
    run = lin.start_round("k1", "r", {}, {})
    v = lin.register_checkpoint(run, ArtifactRef(kind="model", name="checkpoint", path=str(d), sha256=clean),
                                "integrity-policy", "candidate")
    assert resolve("models:/integrity-policy@candidate").sha256 == clean
    _corrupt_in_place(d / "model.safetensors")
    now = tree_hash(d, exclude=(HASH_SIDECAR, "manifest.json"))[0]
    for ref in ("models:/integrity-policy@candidate", f"models:/integrity-policy/{v}"):
        with pytest.raises(ModelError) as e:
            resolve(ref)
        assert now in str(e.value) and clean in str(e.value) and "changed after registration" in str(e.value)
