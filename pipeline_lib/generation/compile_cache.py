"""Let a compiled CPU engine load its model from vLLM's compile cache instead of compiling it again every start.

vLLM 0.32 saves a compiled model ahead of time (``VLLM_USE_AOT_COMPILE``, on by default with torch 2.13) and, on the
next start with the same configuration, loads it and calls ``finalize_loading`` on the loaded function
(``vllm/compilation/decorators.py``, ``_try_load_aot_compiled_fn``). That method belongs to vLLM's own backend's
function (``VllmSerializableFunction``). CPU engines compile in mode ``DYNAMO_TRACE_ONCE`` with Inductor as the
backend, so what was saved is torch's own bundled AOT-autograd callable, which has no such method: every load fails
("'function' object has no attribute 'finalize_loading'"), vLLM logs a warning and compiles from scratch, and a
compiled engine took about a minute to start every time (63 s here, against 4 s eager).

For that callable there is nothing left to finalize: it is complete when loaded. So this gives its class a
``finalize_loading`` that does nothing, and the load goes through. Measured (SmolLM2-135M, 2 cores of an AMD EPYC,
2026-12-06): a compiled engine start from the cache **10 s instead of 63 s**, and the same 4 samples of one prompt,
token ids and log-probs exactly, as an engine compiled from scratch (tests/integration/test_compile_cache.py checks
this on the tiny model).

vLLM keys that cache by a hash of its whole configuration, the model's *path* and ``max_model_len`` among it, so each
round's candidate (a new directory) and each job whose prompts ask for another length compiled again in full (67-69 s
here). The model enters the compiled graph only through its configuration: the weights are inputs of the compiled
function, read from the module at each call. So on CPU, ``key_by_architecture`` hashes the model's configuration
(config.json as transformers reads it, less its own path) where vLLM hashes the path, and the worker rounds a compiled
engine's ``max_model_len`` up to a power of two (``bucketed_max_model_len``): a checkpoint of an architecture compiled
before loads in seconds. tests/integration/test_compile_cache.py checks that a second checkpoint of the tiny model
(other weights, another max_tokens) loads the first one's compiled model and samples exactly what that checkpoint
compiled from scratch samples, and not what the first checkpoint samples. Left as vLLM keys it: GPUs (not measured
here) and models with remote code (their code, not only their configuration, lives in their directory)."""

from __future__ import annotations

_installed = False
_vllm_factors = None  # vLLM's aot_compile_hash_factors, kept: the architecture key calls it


def install() -> bool:
    """Give torch's bundled AOT-autograd callable a no-op ``finalize_loading`` where it has none. Returns whether it
    was added (False where torch has no such class, or the class already has the method: a vLLM or torch that no
    longer needs this)."""
    global _installed
    if _installed:
        return True
    try:
        from torch._dynamo.aot_compile_types import BundledAOTAutogradSerializableCallable as Bundled
    except ImportError:
        return False
    if "finalize_loading" in vars(Bundled):
        return False
    Bundled.finalize_loading = _nothing_to_finalize
    _installed = True
    return True


def _nothing_to_finalize(self, vllm_config) -> None:
    """The loaded callable runs as it is: no backend to rebuild, no artifacts to load later."""


def loads() -> int:
    """How many compiled models this process has loaded from the cache so far (vLLM's own counter)."""
    from vllm.compilation.counter import compilation_counter

    return compilation_counter.num_aot_artifacts_loaded


def architecture_id(hf_config) -> str:
    """What the compiled graph depends on from the model's directory: its configuration (less the path it was read
    from), hashed."""
    import hashlib
    import json

    cfg = {k: v for k, v in hf_config.to_dict().items() if k not in ("_name_or_path", "name_or_path")}
    return "alignflow-architecture:" + hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()


def _factors_by_architecture(vllm_config):
    model_config = vllm_config.model_config
    if model_config is None or model_config.trust_remote_code:
        return _vllm_factors(vllm_config)
    path = model_config.model
    model_config.model = architecture_id(model_config.hf_config)  # for the hash only: restored at once
    try:
        return _vllm_factors(vllm_config)
    finally:
        model_config.model = path


def key_by_architecture() -> None:
    """Key vLLM's ahead-of-time compile cache by the model's configuration instead of its path (CPU engines; once
    per process, before the engine is built)."""
    global _vllm_factors
    from vllm.compilation import caching

    if _vllm_factors is None:
        _vllm_factors = caching.aot_compile_hash_factors
        caching.aot_compile_hash_factors = _factors_by_architecture


def bucketed_max_model_len(needed: int | None, model_path: str | None = None) -> int | None:
    """A compiled CPU engine's ``max_model_len``: the next power of two, at least 256, so that jobs whose prompts ask
    for a few tokens more or less share one compiled model (vLLM hashes the length; some models build their graph
    from it, so it stays in the key). Never above the model's own context (read from its configuration) nor below
    ``needed``; None (the model's own maximum) stays None."""
    if needed is None:
        return None
    bucket = max(256, 1 << (int(needed) - 1).bit_length())
    limit = _context_limit(model_path) if model_path else None
    return max(int(needed), min(bucket, limit)) if limit else bucket


# the configuration keys vLLM derives a model's context from (vllm/config/model.py, _get_and_verify_max_len)
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length",
                 "model_max_length", "max_target_positions", "seq_len")


def _context_limit(model_path: str) -> int | None:
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError):
        return None
    got = [v for k in _CONTEXT_KEYS if isinstance(v := getattr(cfg, k, None), int) and v > 0]
    return min(got) if got else None
