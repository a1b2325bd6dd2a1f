"""bench.generation's rooflines: the parameter count per generated token and the two ceilings, by hand."""

import pytest

from bench.generation import matmul_params, rooflines


def test_rooflines_by_hand():
    # 1e8 params, 0.5 TFLOP/s: 0.5e12 / 2e8 = 2,500 tok/s; batch 4 at 10 GB/s over 2e8 bytes: 4 * 1e10 / 2e8 = 200
    r = rooflines(100_000_000, batch=4, peak_tflops=0.5, gbps=10.0)
    assert r["compute_roofline_tok_s"] == pytest.approx(2500.0)
    assert r["memory_roofline_tok_s"] == pytest.approx(200.0)
    assert r["roofline_tok_s"] == pytest.approx(200.0)
    assert rooflines(100_000_000, batch=64, peak_tflops=0.5, gbps=10.0)["roofline_tok_s"] == pytest.approx(2500.0)


@pytest.mark.parametrize("tied", [True, False])
def test_matmul_params_counts_the_head_once_and_not_the_lookup(tmp_path, tied):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path, safe_serialization=True)
    unique = sum(p.numel() for p in model.parameters())  # a tied matrix is one parameter
    embed, norms = 100 * 16, 16 * (2 * 2 + 1)  # two norms a layer and the final one: elementwise, no matmul
    # tied: the shared matrix is the head (a matmul) -> all unique parameters; untied: the lookup table is not
    assert matmul_params(str(tmp_path)) == (unique - norms if tied else unique - norms - embed)


def test_compile_decision():
    from pipeline_lib.generation.vllm_worker import enforce_eager

    assert enforce_eager("on", on_gpu=False) is False
    assert enforce_eager("off", on_gpu=True) is True
    assert enforce_eager("auto", on_gpu=True) is False  # vLLM's own default on a GPU
    assert enforce_eager("auto", on_gpu=False) is True  # eager on CPU: compiling did not pay for IFEval
    with pytest.raises(ValueError, match="compile='yes'"):
        enforce_eager("yes", on_gpu=False)
