"""The vLLM worker's casting weight loader: float32 checkpoints load into vLLM's bfloat16 without one warning per
tensor, and sampling gives the same token ids and log-probs, bit for bit, as vLLM's own loader."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from pipeline_lib.child_process import child_env


def _sample(model_path: str, ids: list[list[int]], cast: bool, tmp) -> tuple[pd.DataFrame, str]:
    spec = {"model": model_path, "prompt_token_ids": ids, "n": 3, "temperature": 1.0, "top_p": 1.0, "max_tokens": 16,
            "seed": 0, "quiet": True, "max_model_len": 128, "cast_loader": cast}
    (tmp / "spec.json").write_text(json.dumps(spec))
    # vLLM's own log level and bars as a person gets them, whatever earlier tests in this process set
    env = {k: v for k, v in child_env().items() if k not in ("VLLM_LOGGING_LEVEL", "VLLM_CONFIGURE_LOGGING",
                                                              "TQDM_DISABLE")}
    p = subprocess.run([sys.executable, "-m", "pipeline_lib.generation.vllm_worker", str(tmp / "spec.json"),
                        str(tmp / "out.parquet")], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return pd.read_parquet(tmp / "out.parquet"), p.stdout + p.stderr


@pytest.mark.slow
def test_cast_loader_same_samples_no_dtype_warnings(tiny_model, tmp_path):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    with safe_open(f"{tiny_model.path}/model.safetensors", "pt") as f:  # the case the loader is for
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.float32"}
    tok = AutoTokenizer.from_pretrained(tiny_model.path)
    ids = [tok(t)["input_ids"] for t in ["Write a poem.", "List three colors.", "Explain gravity."]]
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    stock, stock_log = _sample(tiny_model.path, ids, cast=False, tmp=tmp_path / "a")
    ours, ours_log = _sample(tiny_model.path, ids, cast=True, tmp=tmp_path / "b")
    # the warning this loader removes, so the test sees a change
    assert "Attempted to load weight" in stock_log, stock_log[-4000:]
    assert "Attempted to load weight" not in ours_log, ours_log[-4000:]
    assert [list(x) for x in ours["response_token_ids"]] == [list(x) for x in stock["response_token_ids"]]
    exact = ours["behavior_logp_seq"].tolist(), stock["behavior_logp_seq"].tolist()
    assert exact[0] == exact[1], exact  # exact, not approximate
