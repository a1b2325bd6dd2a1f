"""Where the evaluation data is looked for: config key, ALIGNFLOW_EVAL_DATA, the Hugging Face cache, the development
copy (../shared/data, which the tests read), first found wins."""

from __future__ import annotations

import pytest

from pipeline_lib.evaluation import data


@pytest.fixture
def places(tmp_path, monkeypatch):
    from huggingface_hub import constants

    hf = tmp_path / "hf"
    monkeypatch.setattr(constants, "HF_HOME", str(hf))
    monkeypatch.setenv("ALIGNFLOW_SHARED_DIR", str(tmp_path / "shared"))
    monkeypatch.delenv(data.ENV, raising=False)
    data.use_eval_data_dir(None)
    yield {"hf": hf / data.HF_CACHE_NAME, "dev": tmp_path / "shared" / "data", "env": tmp_path / "env",
           "cfg": tmp_path / "cfg"}
    data.use_eval_data_dir(None)


def test_first_found_wins_in_the_documented_order(places, monkeypatch):
    for d in places.values():
        d.mkdir(parents=True)
    assert data.eval_data_dir() == places["hf"]  # the HF cache before the development copy
    monkeypatch.setenv(data.ENV, str(places["env"]))
    assert data.eval_data_dir() == places["env"]
    data.use_eval_data_dir(str(places["cfg"]))
    assert data.eval_data_dir() == places["cfg"]
    assert data.eval_data_dir(str(places["env"])) == places["env"]  # an explicit argument is the config's value


def test_development_copy_is_the_fallback(places):
    places["dev"].mkdir(parents=True)
    assert data.eval_data_dir() == places["dev"] == data.shared_dir() / "data"


def test_a_named_directory_that_is_missing_is_an_error_not_a_fallback(places, monkeypatch):
    places["dev"].mkdir(parents=True)
    monkeypatch.setenv(data.ENV, str(places["env"]))
    with pytest.raises(FileNotFoundError, match=f"{places['env']} \\(from {data.ENV}\\) does not exist"):
        data.eval_data_dir()


def test_nothing_found_lists_every_place(places):
    with pytest.raises(FileNotFoundError) as e:
        data.eval_data_dir()
    msg = str(e.value)
    assert str(places["hf"]) in msg and str(places["dev"]) in msg and data.ENV in msg and "run.eval_data_dir" in msg


def test_the_product_reads_mt_bench_files_from_it(places, monkeypatch):
    from pipeline_lib.evaluation.bench_config import shared_mt_bench_file

    monkeypatch.setenv(data.ENV, str(places["env"]))
    places["env"].mkdir()
    assert shared_mt_bench_file("question.jsonl") == str(places["env"] / "mt_bench" / "question.jsonl")
