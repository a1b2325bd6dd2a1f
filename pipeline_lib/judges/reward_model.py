"""Reward-model judge (``kind: reward_model``): a scalar reward r(prompt, response) from any Hugging Face
``AutoModelForSequenceClassification`` with one output (a Bradley-Terry reward model: Llama/Qwen/Mistral RMs,
DeBERTa RMs). ``compare`` and ``rank`` come from the base class: P(a > b) = sigmoid(r_a - r_b).

Formatting. When the tokenizer has a chat template, (prompt, response) becomes the conversation
[user: prompt, assistant: response] rendered by the template (no generation prompt) and tokenised without adding
special tokens again (templates carry their own BOS). Without a template the two texts are tokenised as a text
pair, ``tokenizer(prompt, response)``, which is how encoder RMs such as OpenAssistant's DeBERTa RM were trained.

Batching. Rows are right-padded. For decoder models this keeps every real token at the position it has when the
row is run alone (absolute position embeddings included), and causal attention never looks at the padding.
Hugging Face's ``*ForSequenceClassification`` (``GenericForSequenceClassification.forward`` for Llama and
friends) reads the score at the rightmost token whose id differs from ``config.pad_token_id``; it looks at the
ids, not the attention mask. So we pad with exactly that id, and the position read in a batch is the position read
for the row alone. A model config without ``pad_token_id`` cannot batch in HF; we set it to the tokenizer's pad
token (else its EOS), as TRL's reward trainer does. Note the consequence of HF's rule when pad == EOS and the
template ends in EOS: the reward is read at the last token before the trailing EOS, exactly as during training.

Departures: sequences longer than ``max_length`` lose tokens from the left (the start of the prompt), not the
right, because the reward is read at the end of the response; such items are counted in ``self.truncated``.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Sequence

import numpy as np
from pydantic import Field

from pipeline_lib.judges.base import Item, Judge, JudgeOptions, register_judge

log = logging.getLogger(__name__)


class RewardModelOptions(JudgeOptions):
    kind: Literal["reward_model"] = "reward_model"
    model: str  # local directory or hub id (any reference pipeline_lib.models.resolve accepts)
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(2048, ge=8)
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"  # "auto": the checkpoint's dtype
    trust_remote_code: bool = False  # run code shipped with the model only when the config asks for it
    device: str = "auto"  # "auto": cuda when available, else cpu


@register_judge("reward_model")
class RewardModelJudge(Judge):
    Options = RewardModelOptions
    options: RewardModelOptions

    def __init__(self, options: RewardModelOptions):
        super().__init__(options)
        from pipeline_lib import models

        self.resolved = models.resolve(options.model)  # ModelError (a ValueError) naming a missing model
        self._model = None
        self._tok = None
        self.truncated = 0

    def identity(self) -> dict[str, Any]:
        # The model's content hash (weights, config, tokenizer and its chat template) identifies it; where it is
        # stored, the device and the batch size do not change verdicts.
        opts = self.options.model_dump(exclude={"model", "device", "batch_size"})
        return {"kind": self.kind, "options": opts, "model_sha256": self.resolved.sha256}

    def _load(self):
        if self._model is None:
            import torch
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            o = self.options
            path = self.resolved.path
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=o.trust_remote_code)
            dtype = "auto" if o.dtype == "auto" else getattr(torch, o.dtype)
            model = AutoModelForSequenceClassification.from_pretrained(
                path, dtype=dtype, trust_remote_code=o.trust_remote_code)
            if model.config.num_labels != 1:
                raise ValueError(f"reward_model.model: {o.model!r} has num_labels={model.config.num_labels}; "
                                 "a reward model has exactly one output")
            text_cfg = model.config.get_text_config()
            if text_cfg.pad_token_id is None:
                pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
                if pad is None:
                    raise ValueError(f"reward_model.model: {o.model!r} defines no pad or EOS token to pad batches with")
                text_cfg.pad_token_id = pad
            device = o.device if o.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
            self._model, self._tok, self._device = model.to(device).eval(), tok, device
            self._pad_id = text_cfg.pad_token_id
        return self._model, self._tok

    def encode(self, item: Item) -> list[int]:
        """Token ids of one (prompt, response), left-truncated to ``max_length``."""
        _, tok = self._load()
        if tok.chat_template:
            text = tok.apply_chat_template(
                [{"role": "user", "content": item.prompt}, {"role": "assistant", "content": item.response}],
                tokenize=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tok(item.prompt, item.response)["input_ids"]
        if len(ids) > self.options.max_length:
            self.truncated += 1
            ids = ids[-self.options.max_length:]
        return ids

    def score(self, items: Sequence[Item]) -> np.ndarray:
        import torch

        model, _ = self._load()
        encoded = [self.encode(it) for it in items]
        order = sorted(range(len(items)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
        out = np.zeros(len(items))
        for start in range(0, len(order), self.options.batch_size):
            idx = order[start:start + self.options.batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids_seq = torch.full((len(idx), width), self._pad_id, dtype=torch.long)
            mask_seq = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids_seq[row, :len(encoded[i])] = torch.tensor(encoded[i])
                mask_seq[row, :len(encoded[i])] = 1
            with torch.inference_mode():
                logits = model(input_ids=ids_seq.to(self._device), attention_mask=mask_seq.to(self._device)).logits
            # [B, 1] for HF sequence classifiers; some custom reward models (trust_remote_code) return [B]
            out[idx] = (logits[:, 0] if logits.dim() == 2 else logits).float().cpu().numpy()
        if self.truncated:
            log.warning("reward_model: %d item(s) so far exceeded max_length=%d and lost the start of the prompt",
                        self.truncated, self.options.max_length)
        return out

    def close(self) -> None:
        self._model = None
