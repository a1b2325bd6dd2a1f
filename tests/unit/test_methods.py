"""The method table (pipeline_lib/methods.py): combinations that would compute another objective than their name
fail when the config loads, with a message naming both keys and the reason; the ones that are right load."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline_lib.config import ConfigError, load_config
from pipeline_lib.methods import LOSSES, PAIRINGS, PAIRS, MethodConfig

SMOKE = "configs/smoke.yaml"  # collect.k = 4, train.batch_size = 2, a reward-model judge
DATASET = "data.preference_data={source: jsonl, path: pairs.jsonl}"
SPPO = ["train.loss=sppo", "train.reference=behavior", "pairs.strategy=sppo_winprob"]

REJECTED = [
    # (overrides, substrings of the one-line message: both keys, then the reason)
    (SPPO + ["data.mode=hybrid", DATASET],
     ["train.loss=sppo with data.mode=hybrid", "K samples of the current policy", "judges the dataset's responses"]),
    (SPPO + ["data.mode=off_policy", DATASET],
     ["train.loss=sppo with data.mode=off_policy", "has no samples"]),
    (["train.loss=sppo", "pairs.strategy=sppo_winprob"],  # reference: initial (the default)
     ["train.loss=sppo with train.reference=initial", "π_t, the policy that sampled", "ref_model = model"]),
    (["train.loss=sppo_single", "pairs.strategy=sppo_winprob"],
     ["train.loss=sppo_single with train.reference=initial", "π_t"]),
    (["train.reference=behavior", "data.mode=off_policy", DATASET],
     ["train.reference=behavior with data.mode=off_policy", "not sampled by this round's policy", "plain DPO"]),
    (["train.reference=behavior", "data.mode=hybrid", DATASET],
     ["train.reference=behavior with data.mode=hybrid", "the model that sampled the pairs"]),
    (["train.loss=sail"],  # best_worst over K = 4 samples
     ["train.loss=sail with pairs.strategy=best_worst and collect.k=4", "independent samples",
      "the best and the worst of 4 samples, not two draws"]),
    (["train.loss=sail", "data.mode=hybrid", DATASET],
     ["train.loss=sail with data.mode=hybrid", "independent samples", "data.mode=on_policy with pairs.strategy"]),
    (["train.loss=sail", "pairs.strategy=iid_pairs", "train.batch_size=1"],
     ["train.sail.score_term=baseline with train.batch_size=1", "a batch of one has none"]),
    (["train.loss=sppo", "train.reference=behavior"],  # best_worst pairs carry no win-probabilities
     ["train.loss=sppo with pairs.strategy=best_worst", "chosen_winprob", "'sppo_winprob' or 'sppo_all'"]),
    (["pairs.strategy=unlabelled"],
     ["train.loss=dpo with pairs.strategy=unlabelled", "ordered by a judge"]),
    (["train.loss=sail", "pairs.strategy=unlabelled"],  # SAIL-PR (λ = 0) reads the judge's labels
     ["train.loss=sail with pairs.strategy=unlabelled", "ordered by a judge"]),
    (["pairs.strategy=all_pairs", "data.mode=hybrid", DATASET],
     ["pairs.strategy=all_pairs with data.mode=hybrid", "ignores pairs.strategy"]),
    (["pairs.winprob=pairwise"],
     ["pairs.winprob=pairwise applies to win-probability pairings", "pairs.strategy=best_worst"]),
    (SPPO + ["pairs.min_margin=0.1"],
     ["pairs.min_margin=0.1 with pairs.strategy=sppo_winprob", "keeps every prompt"]),
    (SPPO + ["pairs.unfinished=last"],  # P-hat is estimated over all K samples: re-ranking would not change it
     ["pairs.unfinished=last applies to pairings that rank samples by the judge's score",
      "best_worst, all_pairs, iid_pairs", "not pairs.strategy=sppo_winprob"]),
    (["pairs.unfinished=drop", "data.mode=hybrid", DATASET],
     ["pairs.unfinished=drop with data.mode=hybrid", "does not look at how samples ended"]),
]


@pytest.mark.parametrize("overrides,needles", REJECTED, ids=[" ".join(o[:2]) for o, _ in REJECTED])
def test_wrong_objective_is_rejected_at_load(overrides, needles):
    with pytest.raises(ConfigError) as e:
        load_config(SMOKE, overrides)
    msg = str(e.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, (needle, msg)


ACCEPTED = [
    ["train.loss=sail", "collect.k=2"],  # best_worst of two samples is the two draws, ordered
    ["train.loss=sail", "pairs.strategy=iid_pairs"],
    ["train.loss=sail", "pairs.strategy=all_pairs"],
    ["train.loss=sail", "train.sail.score_coef=0"],  # no score term: plain online DPO with self-label options
    ["train.loss=sail", "train.sail.score_term=plain", "pairs.strategy=iid_pairs", "train.batch_size=1"],
    ["train.loss=sail", "train.sail.self_label_prob=1.0", "pairs.strategy=unlabelled"],  # SAIL-PP, no judge
    ["train.loss=sail", "train.sail.self_label_prob=0.4", "data.mode=off_policy", DATASET],  # SAIL-DDP
    SPPO,
    SPPO + ["pairs.winprob=pairwise"],
    ["train.loss=sppo", "train.reference=behavior", "pairs.strategy=sppo_all"],
    ["train.loss=sppo_single", "train.reference=behavior", "pairs.strategy=sppo_winprob"],
    ["train.loss=sppo_hard", "data.mode=off_policy", DATASET],
    ["train.reference=behavior"],  # BPO on the round's own samples
    ["data.mode=hybrid", DATASET, "train.weighting=wpo"],  # WPO's hybrid setting
    ["pairs.unfinished=last"],
    ["pairs.unfinished=drop", "pairs.strategy=iid_pairs", "train.loss=sail"],
]


@pytest.mark.parametrize("overrides", ACCEPTED, ids=[" ".join(o) for o in ACCEPTED])
def test_right_objectives_load(overrides):
    cfg = load_config(SMOKE, overrides)
    assert cfg.method().loss == cfg.train.loss


def test_every_pairing_and_loss_is_declared():
    """The config's Literal lists and the table agree, so a value the config accepts has rules."""
    from typing import get_args

    from pipeline_lib.config import PairsConfig, TrainConfig

    assert set(get_args(TrainConfig.model_fields["loss"].annotation)) == set(LOSSES)
    assert set(get_args(PairsConfig.model_fields["strategy"].annotation)) == set(PAIRS) <= set(PAIRINGS)
    assert set(get_args(MethodConfig.model_fields["pairs"].annotation)) == set(PAIRS)


def test_cli_exits_2_with_the_reason():
    p = subprocess.run([sys.executable, "-m", "pipeline_lib.cli", "run", "--config", SMOKE, *SPPO, "data.mode=hybrid",
                        DATASET], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "train.loss=sppo with data.mode=hybrid" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("fields,message", [
    ({"loss": "ipo", "label_smoothing": 0.1}, "train.label_smoothing applies only to train.loss=dpo"),
    ({"loss": "dpo", "sail": {"self_label_prob": 0.5}}, "train.sail options are set but train.loss=dpo"),
    ({"wpo": {"clamp": False}}, "train.wpo options are set but train.weighting=none"),
    ({"loss": "sppo", "reference": "behavior"}, "needs chosen_winprob, rejected_winprob per pair"),
    ({"loss": "simpo"}, "train.loss: unknown value 'simpo'"),
    ({"loss": "dpo", "lr": 1.0}, "lr"),
    ({"loss": "sail", "sail": {"self_label_prob": 1.5}}, "self_label_prob"),
    ({"loss": "sail", "sail": {"score_term": "reinforce"}}, "score_term"),
])
def test_method_config_rejects_incompatible_options(fields, message):
    """The trainer validates the same switches without a round around them (``MethodConfig``)."""
    with pytest.raises(ValueError, match=message):
        MethodConfig(**fields)
