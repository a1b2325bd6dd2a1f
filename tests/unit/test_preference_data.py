"""Off-policy preference datasets: files in the hub datasets' formats (plain text, UltraFeedback chat lists) give the
expected pairs tables; malformed files fail with the file, the 1-based row and the reason, and nothing is written."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from _tiny import tiny_tokenizer

from pipeline_lib.artifacts import read_manifest, read_table, sha256_json
from pipeline_lib.models import ResolvedModel
from pipeline_lib.prompts.validate import DataError
from pipeline_lib.stages.dataset_pairs import PAIR_COLUMNS, FilePairs, HubPairs, load_preference_pairs
from pipeline_lib.stages.dataset_pairs import run as make_dataset_pairs
from pipeline_lib.stages.pair import PAIR_PROMPT_COLUMNS
from pipeline_lib.stages.train.fit import pairs_dataset


def rendered(user: str, system: str | None = None) -> str:
    """The tiny tokenizer's template, by hand: <|im_start|>role\\ncontent<|im_end|>\\n per message, then the
    generation prompt <|im_start|>assistant\\n."""
    sys = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return f"{sys}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def chat(prompt: str, reply: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


PLAIN = [
    {"prompt": "tell me a story", "chosen": "the cat sat on the mat", "rejected": "no", "score_chosen": 8.5,
     "score_rejected": 2},
    {"prompt": "tell me a story", "chosen": "a dog ran", "rejected": "bad", "score_chosen": 6, "score_rejected": 7},
    {"prompt": "write a poem", "chosen": "sun and moon", "rejected": "rain", "score_chosen": None,
     "score_rejected": None},
]
# HuggingFaceH4/ultrafeedback_binarized's train_prefs columns (prompt, prompt_id, chosen, rejected, messages,
# score_chosen, score_rejected); chosen/rejected are [user, assistant] message lists.
ULTRA = [{"prompt": p["prompt"], "prompt_id": f"uf{i}", "chosen": chat(p["prompt"], p["chosen"]),
          "rejected": chat(p["prompt"], p["rejected"]), "messages": chat(p["prompt"], p["chosen"]),
          "score_chosen": p["score_chosen"], "score_rejected": p["score_rejected"]} for i, p in enumerate(PLAIN)]


def expected_plain() -> list[dict]:
    """Both "tell me a story" rows share one prompt id (hash of the conversation); the absent scores are NaN."""
    story = sha256_json({"messages": [{"role": "user", "content": "tell me a story"}]})[:16]
    poem = sha256_json({"messages": [{"role": "user", "content": "write a poem"}]})[:16]
    base = {"chosen_response_source": "off_policy", "rejected_response_source": "off_policy", "single_turn": True}
    return [
        {"prompt_id": story, "prompt": "tell me a story", "prompt_text": rendered("tell me a story"),
         "chosen": "the cat sat on the mat", "rejected": "no", "chosen_score": 8.5, "rejected_score": 2.0,
         "source_row": 1, **base},
        {"prompt_id": story, "prompt": "tell me a story", "prompt_text": rendered("tell me a story"),
         "chosen": "a dog ran", "rejected": "bad", "chosen_score": 6.0, "rejected_score": 7.0, "source_row": 2, **base},
        {"prompt_id": poem, "prompt": "write a poem", "prompt_text": rendered("write a poem"), "chosen": "sun and moon",
         "rejected": "rain", "chosen_score": math.nan, "rejected_score": math.nan, "source_row": 3, **base},
    ]


def assert_records(df: pd.DataFrame, expected: list[dict]) -> None:
    assert list(df.columns) == PAIR_COLUMNS
    pd.testing.assert_frame_equal(df.reset_index(drop=True), pd.DataFrame(expected, columns=PAIR_COLUMNS),
                                  check_dtype=False)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_plain_text_jsonl(tmp_path, tok):
    """Counts: 3 pairs, 2 prompts, 2 scored pairs with gaps 6.5 and -1 -> mean 2.75, inverted share 1/2."""
    pairs, counts = load_preference_pairs(FilePairs(source="jsonl", path=write_jsonl(tmp_path / "d.jsonl", PLAIN)),
                                          tok)
    assert_records(pairs, expected_plain())
    assert counts == {"n_rows": 3, "n_pairs": 3, "n_prompts": 2, "n_prompts_tied": 0, "n_scored": 2,
                      "mean_score_gap": 2.75,
                      "score_inverted_share": 0.5}
    assert set(PAIR_PROMPT_COLUMNS) <= set(pairs.columns)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv"])
def test_ultrafeedback_chat_form_gives_the_same_table(tmp_path, tok, fmt):
    """The chat-message form (last message = the assistant reply) in every file format is the same table as the
    plain-text form: same ids, rendering, replies and scores (CSV: message lists as JSON text, null -> empty)."""
    path = tmp_path / f"uf.{fmt}"
    df = pd.DataFrame(ULTRA)
    if fmt == "jsonl":
        write_jsonl(path, ULTRA)
    elif fmt == "parquet":
        df.to_parquet(path)
    else:
        for c in ("chosen", "rejected", "messages"):
            df[c] = df[c].map(json.dumps)
        df.to_csv(path, index=False)
    pairs, _ = load_preference_pairs(FilePairs(source=fmt, path=str(path)), tok)
    assert_records(pairs, expected_plain())


def test_chat_without_prompt_column_and_multi_turn(tmp_path, tok):
    """No prompt column: the prompt is the user message before the reply. A system message is part of the
    rendered conversation, so the row is not single-turn (a hybrid round refuses it)."""
    msgs = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi there"}]
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"chosen": msgs + [{"role": "assistant", "content": "hello"}],
         "rejected": msgs + [{"role": "assistant", "content": "go away"}]}])
    pairs, _ = load_preference_pairs(FilePairs(source="jsonl", path=path), tok)
    row = pairs.iloc[0]
    assert (row["prompt"], row["chosen"], row["rejected"]) == ("hi there", "hello", "go away")
    assert row["prompt_text"] == rendered("hi there", system="be kind") and not row["single_turn"]
    assert row["prompt_id"] == sha256_json({"messages": msgs})[:16]


def test_hub_source_equals_local_file(tmp_path, tok):
    """The real ``datasets.load_dataset`` path on a local directory in ultrafeedback_binarized's layout gives the
    same table as the local Parquet file; n and shard select rows: 3 rows, 2 shards without n -> [2 rows, 1 row]."""
    d = tmp_path / "uf" / "data"
    d.mkdir(parents=True)
    pd.DataFrame(ULTRA).to_parquet(d / "train_prefs-00000-of-00001.parquet")
    opts = HubPairs(source="hub", dataset=str(tmp_path / "uf"), split="train_prefs", cache_dir=str(tmp_path / "c"))
    pairs, _ = load_preference_pairs(opts, tok)
    assert_records(pairs, expected_plain())
    opts.num_shards, opts.shard = 2, 1
    assert load_preference_pairs(opts, tok)[0]["source_row"].tolist() == [3]
    opts.shard = 0
    assert load_preference_pairs(opts, tok)[0]["source_row"].tolist() == [1, 2]
    opts.n, opts.num_shards = 1, 1
    assert load_preference_pairs(opts, tok)[0]["source_row"].tolist() == [1]
    opts.n, opts.num_shards = None, 4
    with pytest.raises(DataError, match="has 3 usable rows, fewer than num_shards=4"):
        load_preference_pairs(opts, tok)


def test_pairs_feed_the_trainer_dataset(tmp_path, tok):
    """The table is what the train stage consumes: TRL's prompt/chosen/rejected from prompt_text/chosen/rejected;
    for SAIL the off-policy pairs are flagged not on-policy."""
    from pipeline_lib.methods import MethodConfig

    pairs, _ = load_preference_pairs(FilePairs(source="jsonl", path=write_jsonl(tmp_path / "d.jsonl", PLAIN)), tok)
    ds = pairs_dataset(pairs, MethodConfig(loss="sail"))
    assert ds["prompt"] == [rendered("tell me a story")] * 2 + [rendered("write a poem")]
    assert ds["chosen"] == ["the cat sat on the mat", "a dog ran", "sun and moon"]
    assert ds["on_policy"] == [False, False, False]


# --------------------------------------------------------------------------------------------------- the stage
@pytest.fixture(scope="module")
def policy(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(d)
    return ResolvedModel(ref="tiny-tokenizer", path=str(d), sha256="0" * 64)


def test_stage_writes_pairs_artifact_keyed_by_content(tmp_path, policy):
    """The artifact holds the same table as the pure function; the same file reuses it; changed content (one
    score) gives a new artifact."""
    path = tmp_path / "d.jsonl"
    write_jsonl(path, PLAIN)
    opts = FilePairs(source="jsonl", path=str(path))
    ref = make_dataset_pairs(opts, policy, tmp_path / "work")
    assert_records(read_table(ref), expected_plain())
    assert read_manifest(ref.path)["metrics"]["mean_score_gap"] == 2.75
    assert make_dataset_pairs(opts, policy, tmp_path / "work").path == ref.path
    write_jsonl(path, [{**PLAIN[0], "score_rejected": 3}] + PLAIN[1:])
    ref2 = make_dataset_pairs(opts, policy, tmp_path / "work")
    assert ref2.path != ref.path and read_manifest(ref2.path)["metrics"]["mean_score_gap"] == 2.25


@pytest.mark.parametrize("row2, reason", [
    ({"prompt": "p", "chosen": "same answer", "rejected": "same answer "},
     "chosen and rejected responses are identical"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "empty 'prompt'"),
    ({"chosen": "a", "rejected": "b"}, "missing field 'prompt'"),
    ({"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),
    ({"prompt": "p", "chosen": "a", "rejected": 3},
     "'rejected' must be a string or a list of chat messages, got a number"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": "high"},
     "'score_chosen' must be a number, got a string"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": True},
     "'score_chosen' must be a number, got a boolean"),
    ({"prompt": "p", "chosen": chat("p", "a"), "rejected": [{"role": "user", "content": "p"}]},
     "the last message of 'rejected' must be the assistant reply, got role 'user'"),
    ({"prompt": "p", "chosen": chat("p", "a"), "rejected": chat("q", "b")},
     "'chosen' and 'rejected' continue different conversations"),
    ({"prompt": "p", "chosen": chat("p", "a"), "rejected": [{"role": "user", "text": "p"}]},
     "'rejected' message 0 must be an object with string 'role' and 'content'"),
    ({"prompt": "p", "chosen": chat("p", " "), "rejected": chat("p", "b")},
     r"empty 'chosen' response \(its last message\)"),
])
def test_malformed_row_fails_and_nothing_is_written(tmp_path, policy, row2, reason):
    path = write_jsonl(tmp_path / "d.jsonl", [PLAIN[0], row2, PLAIN[2]])
    work = tmp_path / "work"
    with pytest.raises(DataError, match=rf"^{path}, row 2: {reason}"):
        make_dataset_pairs(FilePairs(source="jsonl", path=path), policy, work)
    assert not work.exists()


def test_malformed_csv_and_non_utf8(tmp_path, policy):
    """CSV: a missing column fails at row 1, a non-number score and invalid UTF-8 at their record; JSONL: the bad
    byte is at offset 27 of line 2 (len('{"prompt": "p", "chosen": "') = 27); nothing is written."""
    work = tmp_path / "work"
    cases = [
        (b"prompt,chosen\np,a\n", r"row 1: missing field 'rejected' \(fields: prompt, chosen\)"),
        (b"prompt,chosen,rejected,score_chosen\np,a,b,1\np,a,b,abc\n",
         "row 2: 'score_chosen' must be a number, got the text 'abc'"),
        (b"prompt,chosen,rejected\np,a,b\np,\xe9t\xe9,b\n", r"row 2: not valid UTF-8 \(byte 0xe9\)"),
        (b"prompt,chosen,rejected\np,a,a\n", "row 1: chosen and rejected responses are identical"),
    ]
    for content, reason in cases:
        p = tmp_path / "d.csv"
        p.write_bytes(content)
        with pytest.raises(DataError, match=rf"^{p}, {reason}"):
            make_dataset_pairs(FilePairs(source="csv", path=str(p)), policy, work)
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n'
                  b'{"prompt": "p", "chosen": "\xff", "rejected": "b"}\n')
    with pytest.raises(DataError, match=rf"^{p}, row 2: not valid UTF-8 \(byte 0xff at byte offset 27\)"):
        make_dataset_pairs(FilePairs(source="jsonl", path=str(p)), policy, work)
    assert not work.exists()


def test_content_fingerprint_for_task_cache_keys(tmp_path):
    """Same path, changed bytes -> another fingerprint (a Prefect cache hit must not serve stale pairs); a pinned
    hub revision is stable, an unpinned one never repeats."""
    path = tmp_path / "d.jsonl"
    write_jsonl(path, PLAIN)
    opts = FilePairs(source="jsonl", path=str(path))
    before = opts.content_fingerprint()
    assert before == opts.content_fingerprint()
    write_jsonl(path, PLAIN[:2])
    assert opts.content_fingerprint() != before
    hub = HubPairs(source="hub", dataset="HuggingFaceH4/ultrafeedback_binarized", split="train_prefs")
    assert hub.content_fingerprint() != hub.content_fingerprint()
    hub.revision = "abc123"
    assert hub.content_fingerprint() == hub.content_fingerprint() == "revision:abc123"
