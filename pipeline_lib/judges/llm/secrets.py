"""The judge's API key, read from an environment variable or a Prefect Secret block at the last moment.

Options only ever hold the *name* of where the key lives (``api_key_env`` / ``api_key_secret``), so the key cannot
reach a config dump, a judge identity, an MLflow param or a log line through them. The value itself travels as a
pydantic ``SecretStr`` (its repr and str are ``**********``) and is unwrapped only to build the Authorization header.
"""

from __future__ import annotations

import os

from pydantic import SecretStr


def resolve_api_key(env: str | None, secret_block: str | None) -> SecretStr | None:
    """The key from ``$env`` or the Prefect Secret block named ``secret_block`` (at most one is set); None when
    neither is (a local ``vllm serve`` needs no key). Errors name the variable or block, never a value."""
    if env and secret_block:
        raise ValueError("judge: set api_key_env or api_key_secret, not both")
    if env:
        value = os.environ.get(env, "")
        if not value:
            raise ValueError(f"judge.api_key_env: environment variable {env!r} is not set or is empty")
        return SecretStr(value)
    if secret_block:
        from prefect.blocks.system import Secret

        try:
            value = Secret.load(secret_block).get()
        except Exception as e:  # no such block, no Prefect API: say which block, with the error's type only
            raise ValueError(f"judge.api_key_secret: cannot load Prefect Secret block {secret_block!r} "
                             f"({type(e).__name__})") from None
        if not isinstance(value, str) or not value:
            raise ValueError(f"judge.api_key_secret: Prefect Secret block {secret_block!r} holds no string key")
        return SecretStr(value)
    return None


MIN_FRAGMENT = 8  # a run of this many characters of the key is treated as a piece of it (any shorter run is not)


def redact(text: str, key: SecretStr | None, limit: int | None = None) -> str:
    """``text`` with the key, and every run of at least :data:`MIN_FRAGMENT` consecutive characters of it (a prefix
    left by someone else's truncation, a suffix, the middle), replaced by ``***``; with ``limit``, only the first
    ``limit`` characters of that. Redaction runs on the text as it came and the cut comes after it: cutting first
    can leave a piece of the key too short to recognise (issue 22: ``redact(body[:300])`` of a body with the key at
    character 290 printed 10 of its characters)."""
    if key is None or not key.get_secret_value():
        return text if limit is None else text[:limit]
    value = key.get_secret_value()
    n = min(MIN_FRAGMENT, len(value))
    grams = {value[i:i + n] for i in range(len(value) - n + 1)}
    out: list[str] = []
    size, i = 0, 0
    while i < len(text) and (limit is None or size < limit):
        if text[i:i + n] in grams:  # extend the match for as long as it stays a piece of the key
            j = i + n
            while j < len(text) and text[i:j + 1] in value:
                j += 1
            out.append("***")
            size += 3
            i = j
        else:
            out.append(text[i])
            size += 1
            i += 1
    return "".join(out) if limit is None else "".join(out)[:limit]
