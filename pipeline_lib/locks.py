"""Cross-process locks on files, for what two rounds must not do at the same time (issue 22, finding 5).

``flock(2)`` locks, held through an open file descriptor: the kernel releases them when the holder exits, however it
exits (``kill -9`` included), so a crashed round never leaves a lock that blocks the next one. Lock files are never
deleted (deleting one while another process waits on it would let a third lock a new file with the same name); they
are empty and one per key. On NFS, Linux maps ``flock`` to NFS byte-range locks (NFSv4, or v3 with lockd), which
work across machines; local-only locking mounts (``nolock``, ``local_lock=all``) give no protection between machines.

Used for: single-flight stage tasks (``tasks.results.FlockLocks``, one lock per cache key), the creation of an
MLflow SQLite store and the round's parent run, and promotion as a compare-and-set on the champion alias.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Iterator

POLL_S = 0.2


def try_lock(path: Path) -> int | None:
    """An fd holding an exclusive lock on ``path`` (created if needed), or None if another holder has it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def acquire(path: Path, timeout_s: float | None = None) -> int | None:
    """Wait for the lock (polling, so that a timeout and Ctrl-C work); the fd, or None after ``timeout_s``."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        fd = try_lock(path)
        if fd is not None:
            return fd
        if deadline is not None and time.monotonic() >= deadline:
            return None
        time.sleep(POLL_S)


def release(fd: int) -> None:
    os.close(fd)  # closing the last descriptor of the open file releases the flock


def is_locked(path: Path) -> bool:
    """Whether someone (this process included, through another descriptor) holds the lock."""
    if not path.exists():
        return False
    fd = try_lock(path)
    if fd is None:
        return True
    release(fd)
    return False


@contextlib.contextmanager
def file_lock(path: Path, timeout_s: float | None = None, what: str = "") -> Iterator[None]:
    fd = acquire(path, timeout_s)
    if fd is None:
        raise TimeoutError(f"{what or path}: still locked by another process after {timeout_s:g} s ({path})")
    try:
        yield
    finally:
        release(fd)


def store_lock_path(tracking_uri: str, fallback_dir: str | Path | None = None) -> Path | None:
    """Where MLflow-level critical sections lock: beside a SQLite store (every process that writes it sees the file);
    for a server store, in ``fallback_dir`` (the shared work dir of the workers), keyed by the URI; else None."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///")).resolve()
        return db.with_name(f".{db.name}.lock")
    if fallback_dir is None:
        return None
    import hashlib

    return Path(fallback_dir) / ".locks" / f"mlflow-{hashlib.sha256(tracking_uri.encode()).hexdigest()[:16]}.lock"


@contextlib.contextmanager
def store_lock(tracking_uri: str, fallback_dir: str | Path | None = None) -> Iterator[None]:
    path = store_lock_path(tracking_uri, fallback_dir)
    if path is None:
        yield
        return
    with file_lock(path, what=f"MLflow store {tracking_uri}"):
        yield
