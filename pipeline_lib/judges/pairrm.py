"""PairRM judge (``kind: pairrm``): a pairwise reward model, P(a beats b | prompt), from LLM-Blender's PairRM.

Input format, as the reference's ``CrossCompareCollator`` / ``tokenize_pair`` build it: the prompt and each response
are tokenised separately with the encoder's special tokens, ``<|source|>`` + prompt truncated to
``source_max_length`` tokens, each response ``<|candidateK|>`` + response truncated to
``(source_max_length + 2 * candidate_max_length - len(prompt tokens)) // 2`` tokens (the prompt's unused budget is
shared by the candidates), then concatenated. ``[SEP]`` strings inside texts become spaces. Rows are right-padded.

Probabilities. The ranker's logit l(a, b) depends on which response sits in slot 1 (position bias), so ``compare``
runs both orders and averages the two logits for "a beats b" (LLM-Blender's recommended ``[A,B]+[B,A]`` mode):

    P(a > b) = sigmoid((l(a, b) - l(b, a)) / 2)

which makes P(a > b) + P(b > a) = 1 and P(a > a) = 1/2. ``rank`` evaluates every ordered pair of the K candidates
in batches and returns the K x K matrix of the same probabilities; ``score`` (from the base class) is a candidate's
mean win probability against the others of its prompt.

Departures from the reference: LLM-Blender's ``compare(return_logits=True)`` and SPPO's win probabilities
(``sigmoid(s_i - s_j)`` with ``s_i`` the row mean of ``L - L^T`` over all K candidates) use the sum
l(a, b) - l(b, a), i.e. twice our logit, and SPPO's pair probability also depends on the other candidates. We keep
each pair's probability a function of that pair alone (so it can be cached per pair) and average rather than add
the two orders: each l is trained as a Bradley-Terry logit (``-log sigmoid(l)``, the "instructgpt" loss), so their
mean is again one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
from pydantic import Field

from pipeline_lib.judges.base import Judge, JudgeOptions, _sigmoid_np, register_judge

# Marker tokens in the order the reference collator adds them to the DeBERTa tokenizer (ids 128001..128004 in
# PairRM's vocabulary); "<|candidate|>" is added but replaced by candidate1/2 before the encoder sees it.
SOURCE, CAND1, CAND2, CAND = "<|source|>", "<|candidate1|>", "<|candidate2|>", "<|candidate|>"
MARKERS = (SOURCE, CAND1, CAND2, CAND)


class PairRMOptions(JudgeOptions):
    kind: Literal["pairrm"] = "pairrm"
    model: str = "llm-blender/PairRM"  # hub id or local directory (any reference models.resolve accepts)
    batch_size: int = Field(8, ge=1)  # ordered pairs per forward pass
    source_max_length: int = Field(1224, ge=8)
    candidate_max_length: int = Field(412, ge=8)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"  # "auto": cuda when available, else cpu


@register_judge("pairrm")
class PairRMJudge(Judge):
    Options = PairRMOptions
    options: PairRMOptions

    def __init__(self, options: PairRMOptions):
        super().__init__(options)
        self.resolved = _resolve(options.model)
        self._model = None
        self._tok = None

    def identity(self) -> dict[str, Any]:
        # Where the model lives, the device and the batch size do not change verdicts; its content does.
        opts = self.options.model_dump(exclude={"model", "device", "batch_size"})
        return {"kind": self.kind, "options": opts, "model_sha256": self.resolved.sha256}

    # -- loading ------------------------------------------------------------------------------------------------
    def _load(self):
        if self._model is None:
            import torch

            from pipeline_lib.judges.pairrm_model import load_pairrm

            device = self.options.device
            if device == "auto":
                device = "cuda" if torch.cuda.is_available() else "cpu"
            model = load_pairrm(self.resolved.path)
            self._tok = _load_tokenizer(Path(self.resolved.path), model.pretrained_model.config.vocab_size)
            self._markers = tuple(self._tok.convert_tokens_to_ids(m) for m in (SOURCE, CAND1, CAND2))
            self._model = model.to(device=device, dtype=getattr(torch, self.options.dtype))
            self._device = device
        return self._model, self._tok

    # -- encoding -----------------------------------------------------------------------------------------------
    def encode(self, prompt: str, first: str, second: str) -> tuple[list[int], tuple[int, int, int]]:
        """Token ids of one (prompt, slot-1 response, slot-2 response) row and its three marker positions."""
        _, tok = self._load()
        o = self.options
        sep = tok.sep_token or ""

        def piece(marker: str, text: str, max_len: int) -> list[int]:
            text = text.replace(sep, " ") if sep else text
            return tok.encode(marker + text, max_length=max_len, truncation=True)

        src = piece(SOURCE, prompt, o.source_max_length)
        cand_len = (o.source_max_length + 2 * o.candidate_max_length - len(src)) // 2
        c1, c2 = piece(CAND1, first, cand_len), piece(CAND2, second, cand_len)
        ids = src + c1 + c2
        # The marker is the first content token of its piece (after [CLS], if the tokenizer adds one).
        pos = (src.index(self._markers[0]), len(src) + c1.index(self._markers[1]),
               len(src) + len(c1) + c2.index(self._markers[2]))
        return ids, pos

    def logits(self, rows: Sequence[tuple[str, str, str]]) -> np.ndarray:
        """Raw logits l(first, second | prompt) for (prompt, first, second) rows, in batches of ``batch_size``."""
        import torch

        model, tok = self._load()
        encoded = [self.encode(*r) for r in rows]
        out = np.zeros(len(rows))
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        for start in range(0, len(rows), self.options.batch_size):
            chunk = encoded[start:start + self.options.batch_size]
            width = max(len(ids) for ids, _ in chunk)
            ids_seq = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask_seq = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, (ids, _) in enumerate(chunk):  # right padding: real tokens keep their relative positions
                ids_seq[i, :len(ids)] = torch.tensor(ids)
                mask_seq[i, :len(ids)] = 1
            pos = torch.tensor([p for _, p in chunk], dtype=torch.long)
            with torch.inference_mode():
                logit = model(ids_seq.to(self._device), mask_seq.to(self._device), pos.to(self._device))
            out[start:start + len(chunk)] = logit.float().cpu().numpy()
        return out

    # -- judge views --------------------------------------------------------------------------------------------
    def compare(self, prompt: str, a: str, b: str, meta: Mapping[str, Any] | None = None) -> float:
        if a == b:  # l(a, a) - l(a, a) = 0 exactly; running it would only add float noise from the batch kernels
            return 0.5
        if b < a:  # one canonical computation per pair, so that P(a > b) + P(b > a) = 1 to the last bit
            return 1.0 - self.compare(prompt, b, a, meta)
        l_ab, l_ba = self.logits([(prompt, a, b), (prompt, b, a)])
        return float(_sigmoid_np(np.float64(l_ab - l_ba) / 2.0))

    def rank(self, prompt: str, candidates: Sequence[str], meta: Mapping[str, Any] | None = None) -> np.ndarray:
        k = len(candidates)
        ordered = [(i, j) for i in range(k) for j in range(k) if i != j]
        logit = np.zeros((k, k))
        if ordered:
            logit[tuple(zip(*ordered))] = self.logits([(prompt, candidates[i], candidates[j]) for i, j in ordered])
        upper = np.triu_indices(k, 1)
        p = _sigmoid_np((logit - logit.T)[upper] / 2.0)
        m = np.full((k, k), 0.5)
        m[upper], m[upper[::-1]] = p, 1.0 - p
        return m

    def close(self) -> None:
        self._model = None


def _resolve(ref: str):
    """Resolve the model reference (a missing one raises ModelError, a ValueError naming it). The project's hub
    resolver fetches safetensors only; PairRM's original upload may hold just ``pytorch_model.bin``, so a hub
    snapshot without weights gets that file too and is hashed again."""
    from pipeline_lib import models

    resolved = models.resolve(ref)
    path = Path(resolved.path)
    has_weights = (path / "model.safetensors").is_file() or (path / "pytorch_model.bin").is_file()
    if has_weights or Path(ref).expanduser().exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+(@[\w./-]+)?", ref):
        return resolved  # a local directory without weights is reported by load_pairrm
    from huggingface_hub import snapshot_download

    repo, _, revision = ref.partition("@")
    snapshot_download(repo, revision=revision or None, allow_patterns=["pytorch_model.bin"])
    return models.resolve(ref)


def _load_tokenizer(path: Path, vocab_rows: int):
    """The checkpoint's tokenizer (PairRM ships DeBERTa-v3's with the markers), else the ranker config's base
    model's (the reference loads ``microsoft/deberta-v3-large``); markers are added if absent, in the reference's
    order, and must fall inside the embedding matrix."""
    import json

    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        cfg = json.loads((path / "config.json").read_text())
        tok = AutoTokenizer.from_pretrained(cfg.get("model_name", "microsoft/deberta-v3-large"))
    missing = [m for m in MARKERS if m not in tok.get_vocab()]
    if missing:
        tok.add_tokens(missing)
    for m in MARKERS[:3]:
        mid = tok.convert_tokens_to_ids(m)
        if mid is None or mid >= vocab_rows or mid == tok.unk_token_id:
            raise ValueError(f"pairrm: marker {m!r} has id {mid}, outside the model's {vocab_rows} embeddings: "
                             f"the tokenizer at {path} does not match the weights")
    return tok
