"""The train stage on the tiny model: full fine-tuning and LoRA both give a plain checkpoint that moves the margin."""

import pandas as pd
import pytest
import torch

from pipeline_lib.artifacts import verify, write_table
from pipeline_lib.stages.train import TrainConfig
from pipeline_lib.methods import MethodConfig
from pipeline_lib.stages.train import run as train


def _pairs(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model.path)
    prompts = ["Write a poem about the river.", "List three words about music.", "Describe a city in one line."]
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    df = pd.DataFrame({"prompt_id": ["a", "b", "c"], "prompt": prompts, "prompt_text": texts,
                       "chosen": ["the river is long and blue", "music song sound", "a big old city by the water"],
                       "rejected": ["NO", "WORD WORD WORD WORD", "x"]})
    return df, write_table(df, tmp_path / "pairs", name="pairs", producer="test")


def _margin(path, tok, df):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    out = []
    for p, c, r in zip(df.prompt_text, df.chosen, df.rejected):
        lp = []
        for resp in (c, r):
            p_ids = tok(p, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([p_ids + tok(resp + tok.eos_token, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
            lp.append(logp[len(p_ids) - 1:].sum().item())
        out.append(lp[0] - lp[1])
    return sum(out) / len(out)


def test_diverged_training_saves_nothing(tiny_model, tmp_path):
    """Issue 22, finding 1: learning rate 1e30 (finite, so it passes the config) turns every weight of the tiny model
    into NaN within 2 steps; before, the checkpoint was saved (and a round registered it) with "loss 0.0" in its log.
    Now the stage refuses before writing anything, naming the weights and the knob; a ValueError, so not retried."""
    from pipeline_lib.stages.train.fit import TrainingDivergedError

    torch.set_num_threads(1)
    _, pairs = _pairs(tiny_model, tmp_path)
    cfg = TrainConfig(learning_rate=1e30, epochs=2, batch_size=3, max_length=128, bf16=False, warmup_ratio=0.0)
    with pytest.raises(TrainingDivergedError, match=r"426,624 of 426,624 weights are not finite.*nothing saved.*"
                                                    r"train.learning_rate \(1e\+30\)") as e:
        train(tiny_model, pairs, cfg, MethodConfig(), tmp_path / "work", quiet=True)
    assert isinstance(e.value, ValueError)
    assert not list((tmp_path / "work" / "artifacts" / "train").glob("*/manifest.json"))


@pytest.mark.parametrize("lora_r", [0, 8])
def test_training_raises_the_margin_and_saves_a_plain_checkpoint(tiny_model, tmp_path, lora_r):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    df, pairs = _pairs(tiny_model, tmp_path)
    cfg = TrainConfig(learning_rate=5e-3 if lora_r else 1e-3, epochs=4, batch_size=3, max_length=128, bf16=False,
                      warmup_ratio=0.0, lora_r=lora_r)
    ckpt = train(tiny_model, pairs, cfg, MethodConfig(), tmp_path / "work", quiet=True)
    verify(ckpt)
    tok = AutoTokenizer.from_pretrained(tiny_model.path)
    base = AutoModelForCausalLM.from_pretrained(tiny_model.path).state_dict()
    trained = AutoModelForCausalLM.from_pretrained(ckpt.path).state_dict()
    assert set(trained) == set(base)  # LoRA merged away: same parameter names as the base model
    assert any(not torch.equal(base[k], trained[k]) for k in base)
    assert _margin(ckpt.path, tok, df) > _margin(tiny_model.path, tok, df) + 0.1


def test_bpo_ensemble_averages_the_members_weight_deltas(tiny_model, tmp_path):
    """ensemble=2: two LoRA members from seeds 0 and 1 (different initialisation and data order), each a cached
    train artifact of its own, merged and averaged: every tensor of the result is the mean of the members'."""
    from safetensors.torch import load_file

    from pipeline_lib.artifacts import read_manifest

    torch.set_num_threads(1)
    df, pairs = _pairs(tiny_model, tmp_path)
    cfg = TrainConfig(learning_rate=5e-3, max_steps=3, batch_size=2, max_length=128, bf16=False, warmup_ratio=0.0,
                      lora_r=4, ensemble=2, seed=0)
    ens = train(tiny_model, pairs, cfg, MethodConfig(), tmp_path / "work", quiet=True)
    verify(ens)
    members = read_manifest(ens.path)["ensemble_members"]
    assert [m["seed"] for m in members] == [0, 1]
    w = [load_file(f"{m['path']}/model.safetensors") for m in members]
    avg = load_file(f"{ens.path}/model.safetensors")
    base = load_file(f"{tiny_model.path}/model.safetensors")
    assert set(avg) == set(base)
    moved = [k for k in base if not torch.equal(w[0][k], w[1][k])]
    assert moved  # the seeds matter: the members differ where LoRA adapted the weights
    for k in base:
        torch.testing.assert_close(avg[k], (w[0][k] + w[1][k]) / 2, rtol=0, atol=1e-6)
        # equivalently: the delta from the base is the mean of the members' deltas
        torch.testing.assert_close(avg[k] - base[k], ((w[0][k] - base[k]) + (w[1][k] - base[k])) / 2,
                                   rtol=0, atol=1e-6)
    # member 0 is exactly the single-model run with seed 0: the same cached artifact, not a retrain
    single = train(tiny_model, pairs, cfg.model_copy(update={"ensemble": 1}), MethodConfig(), tmp_path / "work",
                   quiet=True)
    assert single.sha256 == members[0]["sha256"]


def test_ensemble_without_lora_is_a_config_error():
    from pipeline_lib.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"train.ensemble=3 averages LoRA adapters: set train.lora_r > 0"):
        load_config(None, ["train.ensemble=3"])
