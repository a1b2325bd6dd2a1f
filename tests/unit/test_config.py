import pytest

from pipeline_lib.config import ConfigError, RoundConfig, load_config

REPO_CONFIGS = ["configs/default.yaml", "configs/smoke.yaml"]


@pytest.mark.parametrize("path", REPO_CONFIGS)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, RoundConfig)


def test_overrides_are_typed_and_dotted():
    cfg = load_config("configs/smoke.yaml", ["train.beta=0.25", "collect.k=6", "run.quiet=true", "name=x"])
    assert cfg.train.beta == 0.25 and cfg.collect.k == 6 and cfg.run.quiet is True and cfg.name == "x"


@pytest.mark.parametrize("override,needle", [
    ("train.betta=0.1", "train.betta: unknown key"),
    ("train.beta=abc", "train.beta"),
    ("train.beta=-1", "train.beta"),
    ("collect.k=1", "collect.k"),
    ("train.num_processes=0", "train.num_processes"),
    ("train.nnodes=2", "several hosts need a rendezvous endpoint"),
    ("train.rdzv_endpoint=h:29500", "an endpoint needs nnodes > 1"),
    ("scale.shards=0", "scale.shards"),
    ("judge.kind=nope", "unknown judge 'nope'"),
    ("nosuch.section=1", "nosuch: unknown key"),
])
def test_bad_keys_and_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config("configs/smoke.yaml", [override])
    assert needle in str(e.value)


@pytest.mark.parametrize("overrides,needle", [
    (["train.fsdp=true"], "at least 2"),
    (["train.fsdp=true", "train.num_processes=2", "train.lora_r=8"], "shard full fine-tuning only"),
    (["train.fsdp=true", "train.num_processes=2", "train.deepspeed=configs/deepspeed/zero2.json"],
     "two sharding engines"),
])
def test_fsdp_refuses_what_it_cannot_shard(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config("configs/smoke.yaml", overrides)
    assert needle in str(e.value)
    ok = load_config("configs/smoke.yaml", ["train.fsdp=true", "train.nnodes=2", "train.rdzv_endpoint=h:29500"])
    assert ok.train.fsdp  # one process per host on two hosts is two shards


def test_override_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="key=value"):
        load_config("configs/smoke.yaml", ["train.beta"])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
