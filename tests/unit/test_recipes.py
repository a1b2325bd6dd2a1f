"""Every YAML recipe under configs/ loads, and its first line is the command that runs it.

A recipe is either one round (``RoundConfig``, run by ``alignflow run``) or a campaign (a top-level ``round:`` key,
``flows.campaign.CampaignConfig``, run by ``alignflow campaign``). Loading validates every key and the method
switches together (``RoundConfig.method()``) without loading any model. The first line must read
``# alignflow <run|campaign> --config <the file's path from the repo root>`` and parse with the real CLI parser, so
it can be pasted into a shell from the repo root as it is.

The GPU recipes under configs/recipes/ also carry the papers' hyperparameters; ``test_recipe_matches_its_sources``
pins the values that define each method against the sources cited in the files, with the arithmetic shown.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipeline_lib.config import ConfigError, RoundConfig, load_config

REPO = Path(__file__).resolve().parents[2]
ALL_CONFIGS = sorted(p for ext in ("*.yaml", "*.yml") for p in (REPO / "configs").rglob(ext))


def _is_evaluate(path: Path) -> bool:
    """Evaluation configs (``alignflow evaluate``) have a top-level ``benchmarks`` key."""
    data = yaml.safe_load(path.read_text()) or {}
    return isinstance(data, dict) and "benchmarks" in data


CONFIGS = [p for p in ALL_CONFIGS if not _is_evaluate(p)]  # round and campaign recipes
EVAL_CONFIGS = [p for p in ALL_CONFIGS if _is_evaluate(p)]
COMMAND = re.compile(r"# alignflow (?P<sub>run|campaign) (?P<args>.+)")


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def _is_campaign(path: Path) -> bool:
    data = yaml.safe_load(path.read_text()) or {}
    return isinstance(data, dict) and "round" in data


def _load(path: Path):
    from flows.campaign import CampaignConfig

    return load_config(path, model=CampaignConfig) if _is_campaign(path) else load_config(path)


def command_problem(path: Path, rel: str) -> str | None:
    """Why the first line of ``path`` is not the command that runs it (as file ``rel``), or None if it is."""
    from pipeline_lib.cli import build_parser

    lines = path.read_text().splitlines()
    first = lines[0] if lines else ""
    m = COMMAND.fullmatch(first.strip())
    if not m:
        return f"first line {first!r} is not '# alignflow run|campaign --config <path>'"
    want = "campaign" if _is_campaign(path) else "run"
    if m["sub"] != want:
        return f"first line runs {m['sub']!r}, but the file is a {'campaign' if want == 'campaign' else 'round'} config"
    try:
        args = build_parser().parse_args([m["sub"], *shlex.split(m["args"])])
    except SystemExit:
        return f"first line {first!r} does not parse as an alignflow command"
    if args.config != rel:
        return f"first line runs --config {args.config!r}, not this file ({rel!r})"
    return None


def test_the_recipes_are_found():
    """The glob sees the shipped configs, so the parametrised tests below are not vacuous."""
    names = {_rel(p) for p in CONFIGS}
    assert {"configs/default.yaml", "configs/smoke.yaml", "configs/recipes/sppo_mistral7b.yaml",
            "configs/recipes/wpo_llama3_8b.yaml", "configs/recipes/bpo_2b.yaml",
            "configs/recipes/sail_qwen05b.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=_rel)
def test_config_loads(path):
    """Round configs load as RoundConfig, campaign configs as CampaignConfig; the method switches validate."""
    cfg = _load(path)
    round_cfg = cfg.round if _is_campaign(path) else cfg
    assert isinstance(round_cfg, RoundConfig)
    method = round_cfg.method()
    assert method.loss == round_cfg.train.loss and method.pairs == round_cfg.pairs.strategy


@pytest.mark.parametrize("path", CONFIGS, ids=_rel)
def test_first_line_is_the_command_that_runs_it(path):
    assert command_problem(path, _rel(path)) is None, command_problem(path, _rel(path))


def test_command_check_rejects_wrong_first_lines(tmp_path):
    """The checker itself: a missing comment, the wrong subcommand for the file's kind, and another file's path."""
    round_yaml = "name: r\ntrain: {loss: dpo}\n"
    campaign_yaml = "name: c\nrounds: 2\nround: {train: {loss: dpo}}\n"
    cases = {
        "no_comment.yaml": (round_yaml, "is not '# alignflow"),
        "run_for_campaign.yaml": ("# alignflow run --config configs/x.yaml\n" + campaign_yaml, "campaign config"),
        "campaign_for_round.yaml": ("# alignflow campaign --config configs/x.yaml\n" + round_yaml, "round config"),
        "other_path.yaml": ("# alignflow run --config configs/other.yaml\n" + round_yaml, "not this file"),
        "bad_flag.yaml": ("# alignflow run --konfig configs/x.yaml\n" + round_yaml, "does not parse"),
    }
    for name, (text, expected) in cases.items():
        p = tmp_path / name
        p.write_text(text)
        problem = command_problem(p, "configs/x.yaml")
        assert problem is not None and expected in problem, (name, problem)
    good = tmp_path / "good.yaml"
    good.write_text("# alignflow campaign --config configs/x.yaml\n" + campaign_yaml)
    assert command_problem(good, "configs/x.yaml") is None


def test_campaign_file_is_not_a_round_config():
    """Dispatch matters: a campaign file read as a RoundConfig fails on its top-level keys, naming them."""
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs/recipes/sppo_mistral7b.yaml")
    assert "round: unknown key" in str(e.value) and "rounds: unknown key" in str(e.value)


# What defines each method in its recipe, from the sources cited in the file. Global batch = per-device batch x
# accumulation x GPUs in the source; the recipes keep it on one device as batch_size x grad_accum.
RECIPES = {
    # uclaml/SPPO: 3 iterations, K=5, PairRM, beta=1e-3 so eta = 1/beta = 1000, RMSprop, lr 5e-7, 1 epoch,
    # global batch 8 (per device) x 1 (accumulation) x 8 (GPUs) = 64.
    "configs/recipes/sppo_mistral7b.yaml": dict(
        rounds=3, k=5, judge="pairrm", loss="sppo", pairs="sppo_winprob", reference="behavior", optimizer="rmsprop",
        eta=1000.0, lr=5e-7, epochs=1, global_batch=8 * 1 * 8),
    # wzhouad/WPO llama3_instruct.yaml: beta 0.01, lr 1e-6, 2 epochs, global batch 2 x 8 x 8 GPUs = 128; weight
    # clamped at 1 with sampled alignment (run_wpo.py); K=5 on-policy samples (data set card).
    "configs/recipes/wpo_llama3_8b.yaml": dict(
        rounds=1, k=5, judge="reward_model", loss="dpo", weighting="wpo", clamp=True, alignment="sampled",
        reference="initial", optimizer="adamw", beta=0.01, lr=1e-6, epochs=2, global_batch=2 * 8 * 8,
        data_mode="hybrid"),
    # xu1998hz/BPO run.sh: F = 2 phases, 2 samples per prompt, lr 5e-5, 1 epoch, batch 1 x acc_steps 16 = 16,
    # 10000 prompts over 2 phases = 5000 per phase; reference = the behavior LLM; num_lora=5 adapters of rank 256,
    # alpha 512 (train/sft_train.py).
    "configs/recipes/bpo_2b.yaml": dict(
        rounds=2, k=2, judge="reward_model", loss="dpo", reference="behavior", optimizer="adamw", beta=0.1,
        lr=5e-5, epochs=1, global_batch=1 * 16 * 1, n_train=10000 // 2, ensemble=5, lora_r=256, lora_alpha=512),
    # SAIL code: DPR (SAIL-PR), beta 0.1, RMSprop, lr 1e-5, 5 epochs (5 rounds of 1), 2 samples per prompt, global
    # batch 4 x 2 x 4 GPUs = 32; LoRA rank 64, alpha 16 (pipelines/sft.py). The score-function term: the fork's
    # online_rpl_trainer.py form (lambda_sf 1.0 with a baseline), not the authors' gamma-0.3 hook (a variant).
    "configs/recipes/sail_qwen05b.yaml": dict(
        rounds=5, k=2, judge="reward_model", loss="sail", self_label_prob=0.0, score_coef=1.0,
        score_term="baseline",
        reference="initial", optimizer="rmsprop", beta=0.1, lr=1e-5, epochs=1, global_batch=4 * 2 * 4, lora_r=64,
        lora_alpha=16),
}


@pytest.mark.parametrize("rel", sorted(RECIPES))
def test_recipe_matches_its_sources(rel):
    want = RECIPES[rel]
    cfg = _load(REPO / rel)
    rc = cfg.round if _is_campaign(REPO / rel) else cfg
    t, m = rc.train, rc.method()
    got = dict(rounds=cfg.rounds if _is_campaign(REPO / rel) else 1, k=rc.collect.k, judge=rc.judge.kind,
               loss=m.loss, pairs=m.pairs, weighting=m.weighting, clamp=m.wpo.clamp, alignment=m.wpo.alignment,
               reference=m.reference, optimizer=m.optimizer, beta=t.beta, eta=1 / t.beta, lr=t.learning_rate,
               epochs=t.epochs, global_batch=t.batch_size * t.grad_accum, n_train=rc.prompts.n_train,
               self_label_prob=m.sail.self_label_prob, score_coef=m.sail.score_coef, score_term=m.sail.score_term,
               ensemble=t.ensemble,
               lora_r=t.lora_r, lora_alpha=t.lora_alpha, data_mode=rc.data.mode)
    for key, value in want.items():
        assert got[key] == pytest.approx(value), f"{rel}: {key} = {got[key]!r}, source says {value!r}"


@pytest.mark.parametrize("path", EVAL_CONFIGS, ids=_rel)
def test_evaluate_configs_load_and_start_with_their_command(path):
    from pipeline_lib.cli import build_parser
    from pipeline_lib.evaluation.bench_config import EvaluateModelConfig

    cfg = load_config(path, model=EvaluateModelConfig)
    assert cfg.benchmarks
    first = path.read_text().splitlines()[0]
    assert first.startswith("# alignflow evaluate "), first
    args = build_parser().parse_args(shlex.split(first.removeprefix("# alignflow ").rstrip("\\ ")))
    assert args.config == _rel(path)
