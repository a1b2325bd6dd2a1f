"""Bad input that used to get through or end in a traceback (issue 22): non-finite numbers, a binary or empty config
file, an override without a key, an absurd tiny-model seed. Each is one ConfigError / ModelError naming the problem."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pipeline_lib.config import ConfigError, RoundConfig, load_config
from pipeline_lib.models import ModelError, resolve


@pytest.mark.parametrize("override, key", [
    ("train.learning_rate=.inf", "train.learning_rate"),  # trained a 100 % NaN model that was registered
    ("train.beta=.inf", "train.beta"),
    ("train.beta=.nan", "train.beta"),
    ("collect.temperature=-.inf", "collect.temperature"),
    ("promotion.margin=.nan", "promotion.margin"),
    ("train.sail.score_coef=.inf", "train.sail.score_coef"),  # a nested option model (not a Section)
    ("data.hybrid.min_margin=.inf", "data.hybrid.min_margin"),
    ("judge.temperature=.inf", "judge.temperature"),  # the free-form judge section, through its options model
])
def test_non_finite_numbers_are_refused_naming_the_key(override, key):
    extra = {"train.sail.score_coef=.inf": ["train.loss=sail"],
             "judge.temperature=.inf": ["judge.kind=llm", "judge.model=m", "judge.base_url=http://127.0.0.1:9/v1"]}
    with pytest.raises(ConfigError) as e:
        load_config("configs/smoke.yaml", [*extra.get(override, []), override])
    assert str(e.value).startswith(f"{key}: ") and "finite" in str(e.value)


def test_flow_parameters_refuse_infinity_too():
    """The Prefect UI / a deployment passes a dict, not a file: the same model refuses it."""
    with pytest.raises(ValidationError, match="finite"):
        RoundConfig.model_validate({"train": {"learning_rate": float("inf")}})
    cfg = RoundConfig()
    with pytest.raises(ValidationError, match="finite"):
        cfg.train.beta = float("nan")  # validate_assignment


def test_large_but_finite_values_still_load():
    """Finite is the only new rule: an absurd finite learning rate loads (training refuses its NaN weights:
    tests/integration/test_train_stage.py::test_diverged_training_saves_nothing)."""
    assert load_config("configs/smoke.yaml", ["train.learning_rate=1e30"]).train.learning_rate == 1e30


def test_binary_config_file_is_one_line(tmp_path):
    p = tmp_path / "model.bin"
    p.write_bytes(b"\x80\x04\x95\x00\xff\xfe binary")
    with pytest.raises(ConfigError, match=r"model\.bin: not a text file \(byte 0 is not UTF-8\)"):
        load_config(p)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_config_file_is_refused(tmp_path, text):
    """An empty file used to run the whole default recipe (the embedded model, 64 prompts, ...) silently."""
    p = tmp_path / "empty.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match="empty.yaml: the config file is empty"):
        load_config(p)


@pytest.mark.parametrize("override", ["=5", " =5", "train.=5", "train..beta=0.1"])
def test_override_without_a_key_is_refused(override):
    with pytest.raises(ConfigError, match="key before '=' is empty"):
        load_config("configs/smoke.yaml", [override])


@pytest.mark.parametrize("ref", ["tiny:99999999999999999999999", "tiny:4294967296", "tiny-rm:12345678901"])
def test_absurd_tiny_seed_is_a_model_error(ref):
    with pytest.raises(ModelError, match=r"0 <= seed < 2\*\*32"):
        resolve(ref)
