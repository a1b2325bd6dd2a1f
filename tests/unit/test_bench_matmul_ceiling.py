"""bench.matmul_ceiling: the step's GEMMs as vLLM runs them (fusions by hand), and the replayed GEMM computes x W^T."""

import pytest

from bench.generation import matmul_params
from bench.matmul_ceiling import cpu_gemm, gemm_shapes, replay


def _llama(tmp_path, tied: bool) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path, safe_serialization=True)
    return str(tmp_path)


@pytest.mark.parametrize("tied", [True, False])
def test_gemm_shapes_fuse_as_vllm_does(tmp_path, tied):
    path = _llama(tmp_path, tied)
    shapes = {name: (n, k) for name, n, k in gemm_shapes(path)}
    # head_dim 8: q 2 heads = 16 rows, k and v 1 head = 8 rows each -> q|k|v = 32; gate|up = 2 x 32
    per_layer = {"self_attn.qkv_proj": (32, 16), "self_attn.o_proj": (16, 16), "mlp.gate_up_proj": (64, 16),
                 "mlp.down_proj": (16, 32)}
    want = {f"model.layers.{i}.{leaf}": s for i in range(2) for leaf, s in per_layer.items()}
    want["lm_head"] = (100, 16)  # tied: the input embedding's matrix; untied: lm_head.weight (the lookup is no GEMM)
    assert shapes == want
    # the replay multiplies exactly the parameters bench.generation's roofline counts
    assert sum(n * k for n, k in shapes.values()) == matmul_params(path)


def test_fusing_projections_of_different_widths_is_an_error(tmp_path):
    import json
    import struct

    header = {"a.q_proj.weight": {"dtype": "BF16", "shape": [4, 8], "data_offsets": [0, 64]},
              "a.k_proj.weight": {"dtype": "BF16", "shape": [4, 6], "data_offsets": [64, 112]}}
    raw = json.dumps(header).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(112))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"a\.k_proj\.weight: K=6 cannot fuse into a\.qkv_proj with K=8"):
        gemm_shapes(str(tmp_path))


def test_replayed_gemm_computes_x_times_w_transposed_and_the_replay_counts_its_flops(tmp_path):
    import torch

    layer = cpu_gemm(24, 16, seed=0)
    x = torch.randn(5, 16).to(torch.bfloat16)
    want = x.double() @ layer.weight.double().T
    got = layer.cpu_linear(x, layer.weight, None).double()
    assert got.shape == (5, 24)
    # bf16 output: within a few bf16 ulps (2^-8 relative) of the float64 product
    assert torch.allclose(got, want, rtol=2 ** -7, atol=1e-3)
    path = _llama(tmp_path, tied=True)
    rows = replay(path, [4, 2], reps=1, warmup=0)
    assert [r["batch"] for r in rows] == [4, 2] and all(r["gemms_per_step"] == 9 for r in rows)
    for r in rows:  # tokens/s = rows / step time; TFLOP/s = rows x 2 x GEMM parameters / step time
        assert r["ceiling_tok_s"] == pytest.approx(r["batch"] / (r["step_ms"] / 1e3))
        assert r["tflops"] == pytest.approx(r["batch"] * 2 * matmul_params(path) / (r["step_ms"] / 1e3) / 1e12)
