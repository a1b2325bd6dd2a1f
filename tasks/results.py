"""Where stage tasks keep their results, and what a cached result must prove before it is used (issue 22).

A stage task returns an :class:`ArtifactRef` (a dict of them for the evaluations, a list for a shard split); Prefect persists it as a *result record* in
``<work_dir>/prefect-results/<cache key>`` and a later run with the same cache key reads it back instead of running
the stage. Three things went wrong with Prefect's defaults, and this module is the answer to each:

- **Code execution** (finding 2). A record names its own serializer, and Prefect decodes the record with whatever
  serializer the *file* says (pickle when it says nothing), whatever the task was configured with. A pickle planted
  in the work dir ran in ``alignflow run`` at the next cache lookup; even Prefect's JSON serializer takes its decoder
  hooks by import path from the file. :class:`WorkDirResults` (the result storage block) hands Prefect only records
  whose serializer is exactly ``{"type": "alignflow-json"}`` (:class:`ArtifactJSON`: plain JSON, decoded into an
  allow-list of two types); anything else reads as "no such record", so the stage runs again and its record replaces
  the planted file. Nothing read from the work dir is ever unpickled.
- **Stale and foreign hits** (finding 3). Records store artifact paths relative to the work dir and resolve them
  against the work dir the record was found in, so a copied work dir uses its own artifacts. A record whose artifact
  is missing, or whose content no longer hashes to the recorded digest, is no hit: the stage runs again (a corrupt
  directory is first moved aside to ``<dir>.corrupt-<time>`` so it is rebuilt, not reused).
- **Concurrent runs** (finding 5). Each task runs in a SERIALIZABLE Prefect transaction whose lock is an ``flock`` on
  ``prefect-results/.locks/<cache key>.lock`` (:class:`FlockLocks`): a second run of the same stage waits for the
  first and then finds its record (state ``Cached``, no second MLflow run). The kernel drops the lock of a killed
  holder, so a crash never blocks the re-run.

What the work dir must still be trusted with: see docs/operations.md ("What the work dir must be trusted with").
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from prefect._internal.compatibility.async_dispatch import async_dispatch
from prefect.filesystems import LocalFileSystem
from prefect.serializers import Serializer

from pipeline_lib import locks
from pipeline_lib.artifacts import ArtifactError, ArtifactRef, read_manifest, sha256_json, verify
from pipeline_lib.models import ResolvedModel, dir_hash
from tasks.common import cache_key, results_dir

log = logging.getLogger("alignflow.results")
SERIALIZER_TYPE = "alignflow-json"


# -- what a record may hold ------------------------------------------------------------------------------------------
class ArtifactJSON(Serializer):
    """Task results as plain JSON, decoded into an allow-list: an ArtifactRef (``{"ArtifactRef": {...}}``), a
    ResolvedModel, or a dict of them keyed by name (``{"dict": {...}}``, the evaluation tasks). Nothing else."""

    type: Literal["alignflow-json"] = SERIALIZER_TYPE

    def dumps(self, obj: Any) -> bytes:
        return json.dumps(_encode(obj)).encode()

    def loads(self, blob: bytes) -> Any:
        return _decode(json.loads(blob))


def _encode(obj: Any) -> dict:
    if isinstance(obj, ArtifactRef):
        return {"ArtifactRef": obj.model_dump()}
    if isinstance(obj, ResolvedModel):
        return {"ResolvedModel": vars(obj)}
    if isinstance(obj, dict) and all(isinstance(k, str) for k in obj):
        return {"dict": {k: _encode(v) for k, v in obj.items()}}
    if isinstance(obj, list):  # the shard split: one ArtifactRef per shard
        return {"list": [_encode(v) for v in obj]}
    raise TypeError(f"stage task results must be ArtifactRef, ResolvedModel or a dict or list of them, not "
                    f"{type(obj).__name__}")


def _decode(data: Any) -> Any:
    if not isinstance(data, dict) or len(data) != 1:
        raise ValueError("not an alignflow task result")
    (kind, fields), = data.items()
    if kind == "ArtifactRef":
        return ArtifactRef.model_validate(fields)
    if kind == "ResolvedModel" and isinstance(fields, dict):
        return ResolvedModel(**{k: str(fields[k]) for k in ("ref", "path", "sha256")})
    if kind == "dict" and isinstance(fields, dict):
        return {str(k): _decode(v) for k, v in fields.items()}
    if kind == "list" and isinstance(fields, list):
        return [_decode(v) for v in fields]
    raise ValueError(f"not an alignflow task result type: {kind!r}")


def _refs(payload: dict):
    """The encoded ArtifactRefs inside an encoded result (mutable dicts, for re-rooting)."""
    if "ArtifactRef" in payload and isinstance(payload["ArtifactRef"], dict):
        yield payload["ArtifactRef"]
    elif isinstance(payload.get("dict"), dict) or isinstance(payload.get("list"), list):
        inner = payload["dict"].values() if "dict" in payload else payload["list"]
        for v in inner:
            if isinstance(v, dict):
                yield from _refs(v)


# -- the storage block: only our records, only valid hits ---------------------------------------------------------------
class InvalidRecord(ValueError):
    """A result record that must not be used (Prefect's exists() turns any exception into "no record")."""


class WorkDirResults(LocalFileSystem):
    """Result records under ``<work_dir>/prefect-results``, checked on every read (see the module docstring)."""

    _block_type_name = "Alignflow Work Dir Results"
    _block_type_slug = "alignflow-work-dir-results"

    @property
    def work_dir(self) -> Path:
        return Path(self.basepath).expanduser().resolve().parent

    def _read_checked(self, path: str) -> bytes:
        p = Path(self._resolve_path(path))
        if not p.is_file():
            raise ValueError(f"Path {p} does not exist.")
        return checked_record(p.read_bytes(), self.work_dir, p.name)

    def _write(self, path: str, content: bytes) -> str:
        p = Path(self._resolve_path(path))
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_bytes(relative_record(content, self.work_dir))
        os.replace(tmp, p)  # a kill mid-write leaves a temp file, never a torn record
        return str(p)

    async def aread_path(self, path: str) -> bytes:
        return self._read_checked(path)

    @async_dispatch(aread_path)
    def read_path(self, path: str) -> bytes:
        return self._read_checked(path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return self._write(path, content)

    @async_dispatch(awrite_path)
    def write_path(self, path: str, content: bytes) -> str:
        return self._write(path, content)


def _payload(record: dict, where: str) -> dict:
    meta = record.get("metadata") if isinstance(record, dict) else None
    serializer = meta.get("serializer") if isinstance(meta, dict) else None
    if serializer != {"type": SERIALIZER_TYPE}:  # exactly ours: no other type, no extra (import-path) fields
        raise InvalidRecord(f"{where}: not written by alignflow (serializer {serializer!r}); ignored")
    try:
        payload = json.loads(record["result"])
    except (KeyError, TypeError, ValueError):
        raise InvalidRecord(f"{where}: unreadable result") from None
    if not isinstance(payload, dict) or len(payload) != 1:
        raise InvalidRecord(f"{where}: unreadable result")
    return payload


def relative_record(content: bytes, work_dir: Path) -> bytes:
    """The record as Prefect serialized it, with artifact paths inside ``work_dir`` made relative to it."""
    record = json.loads(content)
    payload = _payload(record, "result record")  # we write nothing we would not read back
    for ref in _refs(payload):
        try:
            ref["path"] = Path(ref["path"]).resolve().relative_to(work_dir).as_posix()
        except ValueError:
            pass  # outside the work dir: kept absolute, still verified on read
    record["result"] = json.dumps(payload)
    return json.dumps(record).encode()


def checked_record(content: bytes, work_dir: Path, where: str) -> bytes:
    """The record with its artifact paths resolved against ``work_dir``, if every artifact is there and verifies."""
    try:
        record = json.loads(content)
    except ValueError:
        raise InvalidRecord(f"{where}: not JSON; ignored") from None
    payload = _payload(record, where)
    for ref in _refs(payload):
        ref["path"] = str(work_dir / str(ref.get("path", "")))  # an absolute path stays as it is
    try:
        result = _decode(payload)
    except (ValueError, TypeError, KeyError) as e:
        raise InvalidRecord(f"{where}: {e}") from None
    for ref in _artifacts(result):
        check_artifact(ref, where)
    record["result"] = json.dumps(payload)
    return json.dumps(record).encode()


def _artifacts(result: Any) -> list[ArtifactRef]:
    """The ArtifactRefs a decoded result holds (itself, or the values of its dict or list)."""
    if isinstance(result, ArtifactRef):
        return [result]
    inner = result.values() if isinstance(result, dict) else result if isinstance(result, list) else []
    return [v for v in inner if isinstance(v, ArtifactRef)]


def check_artifact(ref: ArtifactRef, where: str = "") -> None:
    """A cached reference is a hit only if its artifact is where it says and hashes to its digest. Tables are
    rehashed (a Parquet file); model directories through the ctime-keyed memo (pipeline_lib.models.dir_hash)."""
    try:
        manifest = read_manifest(ref.path)
    except ArtifactError:
        log.warning("cached result %s: its artifact %s is gone; the stage runs again", where, ref.path)
        raise InvalidRecord(f"{where}: artifact {ref.path} is missing") from None
    try:
        if ref.kind == "table":
            verify(ref)
        elif manifest.get("sha256") != ref.sha256 or dir_hash(ref.dir) != ref.sha256:
            raise ArtifactError(f"artifact {ref.path} is corrupt: it no longer hashes to {ref.short}")
    except ArtifactError as e:
        aside = ref.dir.with_name(f"{ref.dir.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        os.replace(ref.dir, aside)  # so the stage builds the artifact again instead of finding this one
        log.warning("cached result %s: %s; moved to %s, the stage runs again", where, e, aside)
        raise InvalidRecord(str(e)) from None


def _run_logger():
    """The task run's logger (the message reaches the terminal and the Prefect UI), else this module's."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return log


# -- single flight ------------------------------------------------------------------------------------------------------
class FlockLocks:
    """Prefect's LockManager protocol over ``flock`` (pipeline_lib.locks), one lock file per cache key."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._held: dict[str, tuple[str, int]] = {}
        self._mu = threading.Lock()

    def __getstate__(self) -> dict:
        # A task sent to another process (a Ray or Dask worker) carries its cache policy and so this lock manager:
        # it goes there as its directory only; locks held here (file descriptors of this process) stay here.
        return {"directory": self.directory}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["directory"])

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.lock"

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:
        with self._mu:
            if key in self._held:
                return self._held[key][0] == holder
        fd = locks.try_lock(self._path(key))
        if fd is None:  # another run computes the same result: wait for it, then read its record
            _run_logger().info("another run is computing this stage (cache key %s…); waiting for it", key[:12])
            fd = locks.acquire(self._path(key), acquire_timeout)
            if fd is None:
                return False
        with self._mu:
            self._held[key] = (holder, fd)
        return True

    async def aacquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                            hold_timeout: float | None = None) -> bool:
        import anyio

        return await anyio.to_thread.run_sync(self.acquire_lock, key, holder, acquire_timeout, hold_timeout)

    def release_lock(self, key: str, holder: str) -> None:
        with self._mu:
            held = self._held.get(key)
            if held is None or held[0] != holder:
                return
            del self._held[key]
        locks.release(held[1])

    def is_locked(self, key: str) -> bool:
        return locks.is_locked(self._path(key))

    def is_lock_holder(self, key: str, holder: str) -> bool:
        with self._mu:
            return self._held.get(key, ("",))[0] == holder

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_locked(key):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(locks.POLL_S)
        return True

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        import anyio

        return await anyio.to_thread.run_sync(self.wait_for_lock, key, timeout)


def with_result_store(work_dir: str | Path, *tasks, relog: bool = False):
    """The tasks with their results kept (and checked, and locked) in ``<work_dir>/prefect-results``. The storage
    block is saved server-side: Prefect refers to result storage by block id. ``relog``: ignore existing records
    (Prefect's refresh_cache), so each stage runs, finds its artifact already there (every stage function returns an
    existing artifact at once) and logs its MLflow run: for a new MLflow store or experiment, where cache hits would
    leave the round without stage runs."""
    from prefect.cache_policies import CachePolicy
    from prefect.transactions import IsolationLevel

    base = results_dir(work_dir).resolve()
    storage = WorkDirResults(basepath=str(base))
    storage.save(f"alignflow-results-{sha256_json(str(base))[:12]}", overwrite=True)
    policy = CachePolicy.from_cache_key_fn(cache_key).configure(
        isolation_level=IsolationLevel.SERIALIZABLE, lock_manager=FlockLocks(base / ".locks"))
    refresh = {"refresh_cache": True} if relog else {}
    return [t.with_options(result_storage=storage, result_serializer=ArtifactJSON(), cache_policy=policy, **refresh)
            for t in tasks]
