"""The KV-cache block size the vLLM worker asks for (pipeline_lib/generation/kv_blocks.py), and the rotation that
keeps bench.generation_vs_commit's sides from always running in the same place."""

from __future__ import annotations

import pytest

from bench.generation_vs_commit import rotated
from pipeline_lib.errors import ConfigError
from pipeline_lib.generation import kv_blocks
from pipeline_lib.stages import collect


def test_default_is_32_on_cpu_and_vllms_own_on_gpus():
    assert kv_blocks.engine_args(None, on_gpu=False) == {"block_size": 32}
    assert kv_blocks.engine_args(None, on_gpu=True) == {}


@pytest.mark.parametrize("size,on_gpu", [(32, False), (64, False), (128, False), (16, True), (48, True)])
def test_a_given_size_is_passed_through(size, on_gpu):
    assert kv_blocks.engine_args(size, on_gpu) == {"block_size": size}


@pytest.mark.parametrize("size", [16, 48, 100])
def test_cpu_sizes_that_would_turn_prefix_caching_off_are_refused(size):
    with pytest.raises(ValueError, match=rf"kv_block_size={size}: on CPU.*multiples of 32"):
        kv_blocks.engine_args(size, on_gpu=False)


@pytest.mark.parametrize("size", [0, -32, 32.0, "32", True])
def test_not_a_positive_whole_number_is_refused(size):
    with pytest.raises(ValueError, match="expected a positive whole number"):
        kv_blocks.engine_args(size, on_gpu=True)


def test_rounds_rotate_the_order_of_the_sides():
    sides = ["old", "new", "compiled"]
    assert [rotated(sides, r) for r in range(4)] == [["old", "new", "compiled"], ["new", "compiled", "old"],
                                                     ["compiled", "old", "new"], ["old", "new", "compiled"]]
    assert sides == ["old", "new", "compiled"]  # the caller's list is left as it was


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the multiple-of-32 rule is vLLM's CPU backend's")
def test_collect_takes_a_block_size_and_refuses_one_cpu_vllm_cannot_share_with_before_any_work(tmp_path):
    assert collect.CollectConfig().kv_block_size is None
    assert collect.CollectConfig(kv_block_size=64).kv_block_size == 64
    with pytest.raises(ValueError, match="kv_block_size"):
        collect.CollectConfig(kv_block_size=0)
    # the check comes first: no policy, prompts or work dir is touched (None would fail on first use)
    with pytest.raises(ConfigError, match=r"collect\.kv_block_size=48: on CPU.*multiples of 32"):
        collect.run(None, None, collect.CollectConfig(kv_block_size=48), tmp_path / "work")
    assert not (tmp_path / "work").exists()
