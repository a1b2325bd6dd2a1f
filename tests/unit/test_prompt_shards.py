import pytest

from pipeline_lib.artifacts import read_table
from pipeline_lib.config import ConfigError, load_config
from pipeline_lib.prompts.sources import BuiltinPrompts
from pipeline_lib.stages.prompts import run as make_prompts


def test_campaign_shards_are_disjoint_and_cover_one_draw(tmp_path):
    cfg = BuiltinPrompts(seed=3)
    shards = [read_table(make_prompts(cfg.model_copy(update={"shard": k, "num_shards": 3}), "train", 5, tmp_path))
              for k in range(3)]
    ids = [set(s.prompt_id) for s in shards]
    assert all(len(i) == 5 for i in ids)
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    whole = read_table(make_prompts(cfg.model_copy(update={"shard": 0, "num_shards": 1}), "train", 15, tmp_path))
    assert list(whole.prompt_id) == [p for s in shards for p in s.prompt_id]  # consecutive slices of one draw


def test_heldout_ignores_shards(tmp_path):
    a = make_prompts(BuiltinPrompts(shard=1, num_shards=2), "heldout", 4, tmp_path)
    b = make_prompts(BuiltinPrompts(), "heldout", 4, tmp_path)
    assert a.sha256 == b.sha256


def test_shard_out_of_range_is_a_config_error():
    with pytest.raises(ConfigError, match="prompts.shard"):
        load_config("configs/smoke.yaml", ["prompts.shard=2", "prompts.num_shards=2"])
