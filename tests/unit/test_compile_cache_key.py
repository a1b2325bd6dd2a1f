"""How compiled CPU engines share vLLM's compile cache (pipeline_lib/generation/compile_cache.py): the architecture
key and the length buckets. tests/integration/test_compile_cache.py checks the engines themselves."""

from __future__ import annotations

from transformers import AutoConfig

from pipeline_lib.generation.compile_cache import architecture_id, bucketed_max_model_len
from pipeline_lib.models import resolve


def test_the_key_is_the_configuration_not_the_path():
    a, b = AutoConfig.from_pretrained(resolve("tiny:0").path), AutoConfig.from_pretrained(resolve("tiny:1").path)
    assert a._name_or_path != b._name_or_path  # two checkpoints, two directories
    assert architecture_id(a) == architecture_id(b)
    deeper = AutoConfig.from_pretrained(resolve("tiny:0").path, num_hidden_layers=a.num_hidden_layers + 1)
    assert architecture_id(deeper) != architecture_id(a)
    eps = AutoConfig.from_pretrained(resolve("tiny:0").path, rms_norm_eps=a.rms_norm_eps * 10)  # a graph constant
    assert architecture_id(eps) != architecture_id(a)


def test_lengths_share_a_bucket_within_the_models_context():
    path = resolve("tiny:0").path  # a context of 2,048 (pipeline_lib/models.py)
    assert [bucketed_max_model_len(n, path) for n in (25, 256, 257, 1500, 2048, 3000)] == [
        256, 256, 512, 2048, 2048, 3000]  # 3,000 > the context: left as asked, for vLLM to refuse in its own words
    assert bucketed_max_model_len(None, path) is None  # the model's own maximum
    assert bucketed_max_model_len(700) == 1024  # no model to read: the bucket alone
