"""Errors a user can fix. Defined outside cli.py so that `python -m pipeline_lib.cli` and `import pipeline_lib.cli`
share one class."""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; printed as one line (plus an optional hint), exit code 2."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


# The machine's storage refused a write: ENOSPC, EDQUOT (quota), EROFS (read-only), EACCES/EPERM (permissions).
# Deterministic: retrying the same write cannot help (tasks.common.retry_transient), and the user fixes it.
STORAGE_ERRNOS = {28: "no space left on device", 122: "disk quota exceeded", 30: "read-only file system",
                  13: "permission denied", 1: "operation not permitted"}


def storage_error(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in STORAGE_ERRNOS


def describe_storage_error(e: OSError) -> str:
    """One line: the cause and the file, e.g. "no space left on device (ENOSPC) writing /runs/artifacts/...". """
    import errno as _errno

    name = _errno.errorcode.get(e.errno, str(e.errno))
    where = f" writing {e.filename}" if e.filename else ""
    return f"{STORAGE_ERRNOS[e.errno]} ({name}){where}; free space or fix the permissions of run.work_dir, or " \
           "point run.work_dir elsewhere"


class ConfigError(ValueError):
    """A bad config key or value. The message names the key."""


class ModelError(ValueError):
    """A model reference that cannot be resolved or loaded; the message names the reference."""
