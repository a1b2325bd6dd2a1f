"""Content-addressed artifacts: a Parquet table or a model directory plus a manifest.

Every stage output lives in ``<work_dir>/artifacts/<stage>/<key>/`` where ``key`` hashes the stage name, the
hashes of its inputs, its resolved config and the code version. The directory is built under a temporary name
and renamed into place, so a crash never leaves a half-written artifact under the final name, and a re-run of
the same stage with the same inputs finds the finished directory and reuses it (resume).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import pandas as pd
from pydantic import BaseModel

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
TABLE_FILE = "data.parquet"
HASH_SIDECAR = ".alignflow-hash.json"  # pipeline_lib.models.dir_hash's memo, written into model directories


class ArtifactError(RuntimeError):
    """An artifact is missing, corrupt, or does not match its manifest."""


class ArtifactRef(BaseModel):
    """What tasks pass around: where an artifact lives and what its content hashes to."""

    kind: Literal["table", "model"]
    name: str
    path: str
    sha256: str
    rows: int | None = None

    @property
    def dir(self) -> Path:
        return Path(self.path)

    @property
    def short(self) -> str:
        return self.sha256[:12]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-able object with sorted keys (stable across runs and machines)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def tree_hash(root: Path, exclude: Iterable[str] = (MANIFEST, HASH_SIDECAR)) -> tuple[str, dict[str, str]]:
    """Hash of a directory: sha256 over the sorted (relative path, file sha256) list."""
    files = {}
    skip = set(exclude)
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name not in skip and ".tmp-" not in p.name:
            files[p.relative_to(root).as_posix()] = sha256_file(p)
    return sha256_json(sorted(files.items())), files


def read_manifest(path: str | Path) -> dict:
    mpath = Path(path) / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"no manifest at {mpath}: the artifact is missing or was never finished")
    return json.loads(mpath.read_text())


def ref_from_dir(path: str | Path) -> ArtifactRef:
    m = read_manifest(path)
    return ArtifactRef(kind=m["kind"], name=m["name"], path=str(Path(path)), sha256=m["sha256"], rows=m.get("rows"))


def verify(ref: ArtifactRef) -> None:
    """Recompute the content hash and compare with the reference and the manifest."""
    m = read_manifest(ref.path)
    actual = sha256_file(ref.dir / TABLE_FILE) if ref.kind == "table" else tree_hash(ref.dir)[0]
    if actual != ref.sha256 or m["sha256"] != ref.sha256:
        raise ArtifactError(f"artifact {ref.path} is corrupt: content hashes to {actual[:12]}, expected {ref.sha256[:12]}")


def _finish(tmp: Path, final: Path, manifest: dict) -> ArtifactRef:
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():  # another run finished first; keep the existing one (same key = same content)
        shutil.rmtree(tmp, ignore_errors=True)
        return ref_from_dir(final)
    os.replace(tmp, final)
    return ref_from_dir(final)


def _manifest(kind: str, name: str, sha: str, rows: int | None, producer: str, inputs: dict[str, str], config: Any,
              extra: dict | None = None) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "name": name,
        "sha256": sha,
        "rows": rows,
        "producer": producer,
        "inputs": inputs,
        "config": config,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }


def _tmp_dir(final: Path) -> Path:
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    return tmp


def write_table(df: pd.DataFrame, final: Path, *, name: str, producer: str, inputs: dict[str, str] | None = None,
                config: Any = None, extra: dict | None = None) -> ArtifactRef:
    """Write ``df`` as a table artifact at ``final`` atomically and return its reference."""
    final = Path(final)
    if (final / MANIFEST).is_file():
        return ref_from_dir(final)
    tmp = _tmp_dir(final)
    try:
        df.to_parquet(tmp / TABLE_FILE, index=False)
        sha = sha256_file(tmp / TABLE_FILE)
        return _finish(tmp, final, _manifest("table", name, sha, len(df), producer, inputs or {}, config, extra))
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _naming(e, final) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_model(build: Callable[[Path], None], final: Path, *, name: str, producer: str,
                inputs: dict[str, str] | None = None, config: Any = None, extra: dict | None = None) -> ArtifactRef:
    """Let ``build(tmp_dir)`` write a model directory, then hash it and move it into place atomically."""
    final = Path(final)
    if (final / MANIFEST).is_file():
        return ref_from_dir(final)
    tmp = _tmp_dir(final)
    try:
        build(tmp)
        _readable_as_umask_says(tmp)
        sha, files = tree_hash(tmp)
        extra = {**(extra or {}), "files": files}
        return _finish(tmp, final, _manifest("model", name, sha, None, producer, inputs or {}, config, extra))
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _naming(e, final) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _naming(e: OSError, final: Path) -> OSError:
    """The same error (errno kept, so retry and CLI classify it) naming the artifact when the call did not (a failed
    write() on an open file names no file; pyarrow's errors name none either)."""
    if e.filename or e.errno is None:
        return e
    return type(e)(e.errno, e.strerror or str(e), str(final))


def _umask() -> int:
    try:  # Linux >= 4.7; os.umask() would have to set it to read it, racing other threads' file creation
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _readable_as_umask_says(root: Path) -> None:
    """Give a model directory's files the modes the umask allows (0644 under 022). transformers writes its weight
    shards through a temporary file (mode 0600) and renames it: model.safetensors ended up unreadable to the other
    users of a shared work dir while every other file was 0644."""
    mask = _umask()
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            os.chmod(p, 0o666 & ~mask)


def read_table(ref: ArtifactRef, check: bool = True) -> pd.DataFrame:
    if check:
        verify(ref)
    return pd.read_parquet(ref.dir / TABLE_FILE)


def stage_key(stage: str, inputs: dict[str, str], config: Any, code_version: str) -> str:
    """The key of a stage output: same inputs + same config + same code = same artifact."""
    return sha256_json({"stage": stage, "inputs": inputs, "config": config, "code": code_version})[:20]
