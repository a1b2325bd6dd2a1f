"""PairRM judge on a randomly initialised model of PairRM's architecture (tiny DeBERTa-v3 + comparison head) with a
locally built tokenizer carrying the marker tokens. No hub access.

Checked: P(a > b) + P(b > a) = 1 and P(a > a) = 1/2; the K x K matrix equals the pairwise calls; batching equals
one-by-one; determinism; equivalence with the reference computation (LLM-Blender's marker lookup with
``torch.where``) from a ``pytorch_model.bin`` written under the reference's state-dict key names; a save/load
round trip in the published layout; the prompt/candidate truncation budget. Pinned to the CPU, where the fp32
tolerances hold (an H100 run differed from the CPU reference by 1e-5 on logits of size 3)."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from pipeline_lib.judges import build_judge
from pipeline_lib.judges.pairrm import CAND1, CAND2, MARKERS, SOURCE
from pipeline_lib.judges.pairrm_model import DEBERTA_V3, RANKER_CONFIG, PairRMModel, load_pairrm, save_pairrm

PROMPT = "write a poem about the sea"
CANDS = ["the sea is blue and the fox jumps", "I do not know, sorry", "paris", "the quick brown dog over the lazy sea"]


def build_tokenizer():
    """A DeBERTa-like tokenizer: [CLS] text [SEP], a small BPE vocabulary, the four PairRM markers added last."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["the quick brown fox jumps over the lazy dog", "write a poem about the sea", "I do not know, sorry",
              "paris is the capital of france", "explain gravity to a child"]
    tk = Tokenizer(models.BPE(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, show_progress=False,
                                                       special_tokens=["[PAD]", "[CLS]", "[SEP]", "[UNK]"]))
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tk.token_to_id("[CLS]")), ("[SEP]", tk.token_to_id("[SEP]"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                                  unk_token="[UNK]")
    tok.add_tokens(list(MARKERS))  # as the reference collator does, in the same order
    return tok


def tiny_backbone_config(vocab_size):
    from transformers import DebertaV2Config

    # DeBERTa-v3 settings (relative attention, 64-wide heads) at a tiny size; a wider initialisation than the
    # default 0.02 makes the marker embeddings depend visibly on the texts (init only, not architecture).
    return DebertaV2Config(**{**DEBERTA_V3, "vocab_size": vocab_size, "hidden_size": 128, "num_hidden_layers": 2,
                              "intermediate_size": 256, "num_attention_heads": 2, "position_buckets": 32,
                              "initializer_range": 0.1})


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    torch.manual_seed(0)
    model = PairRMModel(tiny_backbone_config(len(tok))).eval()
    with torch.no_grad():  # spread the random head's outputs so probabilities are far from 1/2
        model.head_layer[4].weight.mul_(30.0)
    out = tmp_path_factory.mktemp("pairrm")
    save_pairrm(model, out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def judge(model_dir):
    return build_judge({"kind": "pairrm", "device": "cpu", "model": str(model_dir), "batch_size": 4})


def test_probabilities_are_complementary_and_spread(judge):
    p = judge.compare(PROMPT, CANDS[0], CANDS[1])
    q = judge.compare(PROMPT, CANDS[1], CANDS[0])
    assert p + q == 1.0
    assert judge.compare(PROMPT, CANDS[2], CANDS[2]) == 0.5
    # Definition: P(a > b) = sigmoid((l(a, b) - l(b, a)) / 2) with l the slot-order logits.
    l_ab, l_ba = judge.logits([(PROMPT, CANDS[0], CANDS[1]), (PROMPT, CANDS[1], CANDS[0])])
    assert p == pytest.approx(1.0 / (1.0 + np.exp(-(l_ab - l_ba) / 2.0)), abs=1e-6)
    m = judge.rank(PROMPT, CANDS)
    assert np.abs(m - 0.5).max() > 0.2  # otherwise the checks above would pass trivially


def test_rank_matrix_equals_pairwise_calls(judge):
    m = judge.rank(PROMPT, CANDS)
    k = len(CANDS)
    assert m.shape == (k, k)
    np.testing.assert_array_equal(np.diag(m), 0.5)
    np.testing.assert_array_equal(m + m.T, 1.0)
    pairwise = np.array([[judge.compare(PROMPT, a, b) for b in CANDS] for a in CANDS])
    np.testing.assert_allclose(m, pairwise, atol=1e-6)


def test_score_is_mean_win_probability(judge):
    from pipeline_lib.judges.base import Item

    m = judge.rank(PROMPT, CANDS)
    s = judge.score([Item(PROMPT, c) for c in CANDS])
    np.testing.assert_allclose(s, (m.sum(axis=1) - 0.5) / (len(CANDS) - 1), atol=1e-6)


def test_batching_equals_one_by_one(model_dir):
    rows = [(PROMPT, a, b) for a in CANDS for b in CANDS if a != b] + [("explain gravity", "a child", "gravity")]
    batched = build_judge({"kind": "pairrm", "device": "cpu", "model": str(model_dir), "batch_size": 8}).logits(rows)
    single = build_judge({"kind": "pairrm", "device": "cpu", "model": str(model_dir), "batch_size": 1}).logits(rows)
    np.testing.assert_allclose(batched, single, atol=1e-5, rtol=0)


def test_deterministic_across_loads_and_calls(model_dir, judge):
    again = build_judge({"kind": "pairrm", "device": "cpu", "model": str(model_dir), "batch_size": 4})
    np.testing.assert_array_equal(judge.rank(PROMPT, CANDS), judge.rank(PROMPT, CANDS))
    np.testing.assert_array_equal(again.rank(PROMPT, CANDS), judge.rank(PROMPT, CANDS))
    assert again.identity_hash() == judge.identity_hash()


def reference_logits(backbone, head, tok, rows, s_max=1224, c_max=412):
    """LLM-Blender's computation, written independently: tokenize_pair's format, right padding to a common
    length, trimming of all-padding columns, then the markers located with torch.where on the ids."""
    ids = []
    for src, c1, c2 in rows:
        s = tok.encode(SOURCE + src, max_length=s_max, truncation=True)
        budget = (s_max + 2 * c_max - len(s)) // 2
        ids.append(s + tok.encode(CAND1 + c1, max_length=budget, truncation=True)
                   + tok.encode(CAND2 + c2, max_length=budget, truncation=True))
    enc = tok.pad({"input_ids": ids}, padding="max_length", max_length=max(map(len, ids)) + 5, return_tensors="pt")
    keep = enc["attention_mask"].ne(0).any(dim=0)
    input_ids, mask = enc["input_ids"][:, keep], enc["attention_mask"][:, keep]
    encs = backbone(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    picked = []
    for marker in (SOURCE, CAND1, CAND2):
        r, c = torch.where(input_ids == tok.convert_tokens_to_ids(marker))
        picked.append(encs[r, c, :])
    left = head(torch.cat([picked[0], picked[1]], dim=-1))
    right = head(torch.cat([picked[0], picked[2]], dim=-1))
    return (left - right).mean(dim=-1).detach().numpy()


def test_reference_checkpoint_layout_and_outputs(tmp_path, tok):
    """A checkpoint written as the reference writes it (pytorch_model.bin of CrossCompareReranker's state dict:
    ``pretrained_model.*`` + ``head_layer.{1,4}.*``, and the ranker's config.json) loads into our module and
    gives the reference's logits."""
    from transformers import DebertaV2Model

    torch.manual_seed(1)
    backbone = DebertaV2Model(tiny_backbone_config(len(tok))).eval()
    hidden = backbone.config.hidden_size
    head = nn.Sequential(nn.Dropout(0.05), nn.Linear(2 * hidden, hidden), nn.Tanh(), nn.Dropout(0.05),
                         nn.Linear(hidden, 1)).eval()
    with torch.no_grad():
        head[4].weight.mul_(30.0)
    state = {f"pretrained_model.{k}": v for k, v in backbone.state_dict().items()}
    state.update({f"head_layer.{k}": v for k, v in head.state_dict().items()})
    assert {"head_layer.1.weight", "head_layer.1.bias", "head_layer.4.weight", "head_layer.4.bias"} <= set(state)
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(RANKER_CONFIG))
    tok.save_pretrained(tmp_path)

    rows = [(PROMPT, CANDS[0], CANDS[1]), (PROMPT, CANDS[3], CANDS[2]), ("explain gravity", "a child", CANDS[1])]
    ours = build_judge({"kind": "pairrm", "device": "cpu", "model": str(tmp_path), "batch_size": 2}).logits(rows)
    with torch.no_grad():
        ref = reference_logits(backbone, head, tok, rows)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    assert np.abs(ref).max() > 0.1


def test_save_load_round_trip_keeps_reference_key_names(tmp_path, model_dir):
    from safetensors.torch import load_file

    model = load_pairrm(model_dir)
    saved = load_file(model_dir / "model.safetensors")
    assert set(saved) == set(model.state_dict())
    assert {k.split(".")[0] for k in saved} == {"pretrained_model", "head_layer"}
    assert {"pretrained_model.embeddings.word_embeddings.weight", "pretrained_model.encoder.rel_embeddings.weight",
            "pretrained_model.encoder.layer.1.attention.self.query_proj.weight"} <= set(saved)
    assert json.loads((model_dir / "config.json").read_text())["ranker_type"] == "pairranker"
    save_pairrm(model, tmp_path)
    again = load_pairrm(tmp_path)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v, rtol=0, atol=0)
    # The DeBERTa config is re-derived from the shapes: same sizes as the one the model was built with.
    cfg = again.pretrained_model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size,
            cfg.position_buckets) == (128, 2, 2, 256, 32)


def test_truncation_budget(model_dir):
    """Prompt <= source_max_length tokens; each candidate <= (S + 2C - len(prompt)) // 2; markers kept."""
    j = build_judge({"kind": "pairrm", "device": "cpu", "model": str(model_dir), "source_max_length": 12,
                     "candidate_max_length": 8})
    long_text = " ".join(["the quick brown fox"] * 20)
    ids, (p_src, p_c1, p_c2) = j.encode(long_text, long_text, "paris")
    _, tok = j._load()
    src_len = p_c1 - 1  # [CLS] precedes each marker
    assert src_len == 12
    cand1_len = p_c2 - 1 - src_len
    assert cand1_len == (12 + 2 * 8 - 12) // 2 == 8
    assert [ids[p] for p in (p_src, p_c1, p_c2)] == [tok.convert_tokens_to_ids(m) for m in (SOURCE, CAND1, CAND2)]
    assert ids[p_c1 - 1] == tok.cls_token_id and ids[-1] == tok.sep_token_id


def test_missing_model_and_foreign_weights_are_named(tmp_path):
    with pytest.raises(ValueError, match="no-such-pairrm"):
        build_judge({"kind": "pairrm", "device": "cpu", "model": str(tmp_path / "no-such-pairrm")})
    (tmp_path / "config.json").write_text("{}")
    torch.save({"classifier.weight": torch.zeros(1, 2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="head_layer"):
        build_judge({"kind": "pairrm", "device": "cpu", "model": str(tmp_path)}).compare("p", "a", "b")


def test_sppo_authors_win_probabilities_equal_llm_blender_on_the_rankers_logits(judge, tmp_path):
    """The annotate stage's default SPPO probabilities from the cached pairwise verdicts equal the authors' pipeline
    computed from the ranker's raw logits: LLM-Blender's scores s_i = mean_j (L_ij - L_ji) with L_ii = 0
    (llm_blender/gpt_eval/utils.py lines 26-43; pair_ranker/ranker.py _full_predict), then uclaml/SPPO
    scripts/compute_prob.py: P_ij = 1 / (1 + exp(s_j - s_i)) (line 45), P-hat_i = sum_j P_ij / K (lines 84, 96)."""
    import pandas as pd

    from pipeline_lib.judges.base import Item
    from pipeline_lib.judges.cache import CachedJudge
    from pipeline_lib.winprob import win_probability_columns

    k = len(CANDS)
    ordered = [(i, j) for i in range(k) for j in range(k) if i != j]  # batched as the judge's rank batches them
    logit = np.zeros((k, k))
    logit[tuple(zip(*ordered))] = judge.logits([(PROMPT, CANDS[i], CANDS[j]) for i, j in ordered])
    s = (logit - logit.T).mean(axis=1)
    prob = 1 / (1 + np.exp(s[None, :] - s[:, None]))
    want = prob.sum(axis=1) / k
    df = pd.DataFrame({"prompt_id": "p", "sample_index": range(k), "response": CANDS, "score": 0.0})
    items = [Item(PROMPT, c) for c in CANDS]
    cols = win_probability_columns(CachedJudge(judge, tmp_path), df, items)
    np.testing.assert_allclose(cols["winprob"], want, rtol=0, atol=1e-9)
    np.testing.assert_allclose(np.stack(cols["winprob_row"]), prob, rtol=0, atol=1e-9)
    # the per-pair form keeps the judge's own pair probabilities, sigmoid((L_ij - L_ji) / 2), less spread
    pairwise = (1 / (1 + np.exp(-(logit - logit.T) / 2))).mean(axis=1)
    np.testing.assert_allclose(cols["winprob_pairwise"], pairwise, rtol=0, atol=1e-9)
    assert np.abs(pairwise - 0.5).sum() < np.abs(want - 0.5).sum()
