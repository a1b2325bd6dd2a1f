"""The dataset-pairs stage (off-policy data): an existing ``prompt`` / ``chosen`` / ``rejected`` dataset as a
pairs table.

Most preference data is off-policy (WPO, Zhou et al. 2024, Sec. 1): responses written by other models and ranked
by people or a judge. This module turns such a dataset (Hugging Face hub or a local JSONL / CSV / Parquet file) into
the pairs table of the pair stage (``stages/pair.py``), so a round can skip collect/annotate/pair entirely (pure
off-policy DPO, or WPO, whose weights re-weight exactly this kind of data), or feed a hybrid round
(``stages/hybrid_*.py``).

Accepted row forms (``docs/data_sources.md``):
- plain text: ``prompt`` str, ``chosen`` str, ``rejected`` str;
- chat, as ``HuggingFaceH4/ultrafeedback_binarized``: ``chosen`` and ``rejected`` are message lists whose last
  message is the assistant reply; the messages before it (the same in both) are the conversation that is rendered
  with the tokenizer's chat template; ``prompt`` is optional there (default: the last user message);
- optional ``score_chosen`` / ``score_rejected`` numbers (kept as ``chosen_score`` / ``rejected_score``, NaN if
  absent).

Departures: pairs whose chosen and rejected replies are equal up to surrounding whitespace are an error (they carry
no preference), not silently dropped; prompt ids are a hash of the rendered conversation, not the dataset's own id
column, so the same conversation always has the same id (the hybrid round joins on it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline_lib.artifacts import ArtifactRef, ref_from_dir, sha256_json, write_table
from pipeline_lib.prompts.validate import (FILE_READERS, Row, Rows, content_fingerprint, hub_fingerprint, read_hub,
                                           select_rows, type_name)
from pipeline_lib.stage import done, output_dir

PAIR_COLUMNS = ["prompt_id", "prompt", "prompt_text", "chosen", "rejected", "chosen_score", "rejected_score",
                "chosen_response_source", "rejected_response_source", "source_row", "single_turn"]


class _PairSetOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    score_chosen_column: str = "score_chosen"
    score_rejected_column: str = "score_rejected"
    n: int | None = Field(None, ge=1, description="pairs to use (default: all rows of the shard)")
    shuffle: bool = Field(False, description="seeded shuffle before taking n / sharding")
    seed: int = 0
    shard: int = Field(0, ge=0)
    num_shards: int = Field(1, ge=1, description="disjoint shards (one per round of a campaign)")

    @model_validator(mode="after")
    def _shard_in_range(self):
        if self.shard >= self.num_shards:
            raise ValueError(f"shard={self.shard} must be < num_shards={self.num_shards}")
        return self

    def fields(self) -> list[str]:
        return [self.prompt_column, self.chosen_column, self.rejected_column, self.score_chosen_column,
                self.score_rejected_column]


class HubPairs(_PairSetOptions):
    source: Literal["hub"]
    dataset: str = Field(description="e.g. HuggingFaceH4/ultrafeedback_binarized (or a local dataset directory)")
    config: str | None = None
    split: str = Field("train", description="e.g. train_prefs")
    revision: str | None = None
    cache_dir: str | None = None

    def content_fingerprint(self) -> str:
        """For task cache keys: the config says where the data is, this says what it is."""
        return hub_fingerprint(self.revision)

    def rows(self) -> Rows:
        return read_hub(self.dataset, self.config, self.split, self.revision, self.cache_dir, self.fields())


class FilePairs(_PairSetOptions):
    source: Literal["jsonl", "csv", "parquet"]
    path: str

    def content_fingerprint(self) -> str | None:
        """For task cache keys: the config says where the data is, this says what it is."""
        return content_fingerprint(self.path)

    def rows(self) -> Rows:
        return FILE_READERS[self.source](self.path)


PreferenceSource = Annotated[Union[HubPairs, FilePairs], Field(discriminator="source")]


def _reply(row: Row, name: str) -> tuple[list[dict], str]:
    """(conversation before the reply, reply text) of a plain-text or chat-form response field."""
    v = row.raw(name)
    if row.textual and isinstance(v, str) and v.lstrip().startswith("[{"):
        v = row.structured(name)  # CSV: a JSON list of messages is the chat form
    if isinstance(v, str):
        if not v.strip():
            row.fail(f"empty {name!r} response")
        return [], v
    if not isinstance(v, (list, tuple)):
        row.fail(f"{name!r} must be a string or a list of chat messages, got {type_name(v)}")
    msgs = row.messages(name, v)
    if msgs[-1]["role"] != "assistant":
        row.fail(f"the last message of {name!r} must be the assistant reply, got role {msgs[-1]['role']!r}")
    if not msgs[-1]["content"].strip():
        row.fail(f"empty {name!r} response (its last message)")
    if len(msgs) > 1 and msgs[-2]["role"] != "user":
        row.fail(f"the message before the reply in {name!r} must be from the user, got {msgs[-2]['role']!r}")
    return msgs[:-1], msgs[-1]["content"]


def pair_record(row: Row, opts: _PairSetOptions) -> dict:
    """One validated pair (conversation, prompt, replies, scores); raises DataError naming the row."""
    history, chosen = _reply(row, opts.chosen_column)
    history_r, rejected = _reply(row, opts.rejected_column)
    if history != history_r:
        row.fail(f"{opts.chosen_column!r} and {opts.rejected_column!r} continue different conversations")
    if row.has(opts.prompt_column) or not history:
        prompt = row.text(opts.prompt_column)
    else:  # chat form without a prompt column: the user turn the reply answers
        prompt = history[-1]["content"]
        if not prompt.strip():
            row.fail("empty prompt (the user message before the reply)")
    if chosen.strip() == rejected.strip():
        row.fail("chosen and rejected responses are identical")
    messages = history or [{"role": "user", "content": prompt}]
    # single_turn: the conversation is what collect would render for `prompt` (a hybrid round needs that)
    return {"messages": messages, "single_turn": messages == [{"role": "user", "content": prompt}],
            "prompt": prompt, "chosen": chosen, "rejected": rejected,
            "chosen_score": row.number(opts.score_chosen_column),
            "rejected_score": row.number(opts.score_rejected_column), "source_row": row.row_number}


def validate_pairs(options: _PairSetOptions) -> tuple[Rows, list[dict]]:
    """Read the source and validate every row (no model, no tokenizer): call this before loading anything."""
    rows = options.rows()
    return rows, [pair_record(Row(rows, number, data), options) for number, data in rows.rows]


def pairs_table(records: list[dict], tokenizer) -> pd.DataFrame:
    """The pairs table (``PAIR_COLUMNS``) of validated records; ``prompt_text`` is the conversation rendered with the
    tokenizer's chat template and the generation prompt, exactly as collect renders its prompts."""
    from pipeline_lib.generation.sampling import render_chat

    df = pd.DataFrame(records)
    df["prompt_id"] = [sha256_json({"messages": m})[:16] for m in df["messages"]]
    first = df.drop_duplicates("prompt_id")
    texts, _ = render_chat(tokenizer, first["messages"].tolist())
    df["prompt_text"] = df["prompt_id"].map(dict(zip(first["prompt_id"], texts)))
    df["chosen_response_source"] = df["rejected_response_source"] = "off_policy"
    return df[PAIR_COLUMNS]


def pair_counts(pairs: pd.DataFrame) -> dict:
    gap = (pairs["chosen_score"] - pairs["rejected_score"]).dropna()
    # n_prompts_tied: the pair stage's count of prompts without a pair; a dataset's pairs come given (always 0)
    return {"n_pairs": len(pairs), "n_prompts": int(pairs["prompt_id"].nunique()), "n_prompts_tied": 0,
            "n_scored": len(gap),
            "mean_score_gap": float(gap.mean()) if len(gap) else float("nan"),
            "score_inverted_share": float((gap < 0).mean()) if len(gap) else float("nan")}


def _select(rows: Rows, records: list[dict], options: _PairSetOptions, tokenizer) -> tuple[pd.DataFrame, dict]:
    idx = select_rows(len(records), options.n, options.shard, options.num_shards, options.shuffle, options.seed,
                      rows.origin)
    pairs = pairs_table([records[i] for i in idx], tokenizer)
    return pairs, {"n_rows": len(records), **pair_counts(pairs)}


def load_preference_pairs(options: _PairSetOptions, tokenizer) -> tuple[pd.DataFrame, dict]:
    """Validate every row, select shard / n, render the prompts: (pairs, counts)."""
    rows, records = validate_pairs(options)
    return _select(rows, records, options, tokenizer)


def run(options: _PairSetOptions, policy: Any, work_dir: str | Path) -> ArtifactRef:
    """The dataset-pairs stage: a pairs artifact from an off-policy dataset. ``policy`` (a ResolvedModel) provides
    the tokenizer whose chat template renders the prompts. Every row is validated before the tokenizer is loaded,
    and nothing is written when a row is bad."""
    from transformers import AutoTokenizer

    rows, records = validate_pairs(options)
    config = options.model_dump()
    inputs = {"data": rows.digest, "tokenizer": policy.sha256}
    out = output_dir(work_dir, "dataset_pairs", inputs, config)
    if done(out):
        return ref_from_dir(out)
    pairs, counts = _select(rows, records, options, AutoTokenizer.from_pretrained(policy.path))
    return write_table(pairs, out, name="pairs", producer="dataset_pairs", inputs=inputs, config=config,
                       extra={"metrics": counts, "source": rows.origin})
