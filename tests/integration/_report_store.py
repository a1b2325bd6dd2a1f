"""A real MLflow store holding alignflow rounds, written through the lineage API the round flow uses.

Artifacts are real (``write_table`` / ``write_model`` with manifests); the MLflow records are what
``RoundLineage.start_round`` / ``stage_run`` / ``finish_round`` / ``register_checkpoint`` write for a round, with
hand-picked numbers so the report's page can be checked against them. No vLLM, no training: seconds, not minutes.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline_lib.artifacts import ArtifactRef, write_model, write_table
from pipeline_lib.lineage import RoundLineage, client

EXPERIMENT = "report-test"
REGISTERED = "report-test-policy"


def new_store(root: Path) -> tuple[str, RoundLineage]:
    """A SQLite store whose experiment keeps run artifacts under ``root`` (not the working directory)."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client(uri).create_experiment(EXPERIMENT, artifact_location=str(root / "mlartifacts"))
    return uri, RoundLineage(uri, EXPERIMENT)


def seed_policy(root: Path) -> ArtifactRef:
    def build(d: Path) -> None:
        (d / "weights.txt").write_text("seed policy")

    return write_model(build, root / "models" / "seed", name="tiny:seed", producer="external")


def log_round(lin: RoundLineage, root: Path, *, name: str, campaign: str, index: int, policy: ArtifactRef,
              before: dict[str, float], after: dict[str, float], pairs: pd.DataFrame, losses: list[float],
              promoted: bool) -> dict:
    """One round's parent run with a child run per stage, as flows/round.py logs it. Returns ids and refs."""
    art = root / "artifacts" / name
    cfg = {"name": name, "policy": policy.name, "train": {"beta": 0.1 * index, "loss": "dpo"},
           "run": {"registered_model": REGISTERED}}
    parent = lin.start_round(f"key-{name}", name, cfg, tags={"alignflow.campaign": campaign,
                                                             "alignflow.round_index": str(index),
                                                             "prefect.flow_run_id": f"flow-{name}"})
    prompts = write_table(pd.DataFrame({"prompt_id": ["a", "b"], "prompt": [f"{name} p1", f"{name} p2"]}),
                          art / "prompts", name="prompts-train", producer="prompts")
    gens = write_table(pd.DataFrame({"prompt_id": ["a", "a"], "response": ["x", "y"]}), art / "gens",
                       name="generations", producer="collect", inputs={"policy": policy.sha256,
                                                                        "prompts": prompts.sha256})
    judg = write_table(pd.DataFrame({"prompt_id": ["a", "a"], "response": ["x", "y"], "score": [0.9, 0.1]}),
                       art / "judg", name="judgments", producer="annotate", inputs={"generations": gens.sha256})
    pair = write_table(pairs, art / "pairs", name="pairs", producer="pair", inputs={"judgments": judg.sha256})
    log_history = [{"step": i + 1, "loss": v, "rewards/margins": 0.5 * i, "rewards/accuracies": 1.0}
                   for i, v in enumerate(losses)]
    ckpt = write_model(lambda d: (d / "weights.txt").write_text(f"{name} checkpoint"), art / "ckpt",
                       name="checkpoint", producer="train", inputs={"policy": policy.sha256, "pairs": pair.sha256},
                       extra={"log_history": log_history})
    stages = [("prompts-train", {}, {"prompts": prompts}, {"n_prompts": 2}),
              ("collect", {"policy": policy, "prompts": prompts}, {"generations": gens}, {"n_samples": 2}),
              ("annotate", {"generations": gens}, {"judgments": judg}, {"mean_score": 0.5}),
              ("pair", {"judgments": judg}, {"pairs": pair}, {"n_pairs": len(pairs)}),
              ("train", {"policy": policy, "pairs": pair, "reference": policy}, {"checkpoint": ckpt},
               {"steps": len(losses)})]
    runs = {}
    for stage, ins, outs, metrics in stages:
        runs[stage] = lin.stage_run(parent, stage, ins, outs, {"stage": stage}, {**metrics, "stage_s": 1.5},
                                    step_metrics=log_history if stage == "train" else None)
    lin.client.set_tag(parent, "alignflow.promoted", str(promoted).lower())
    lin.client.set_tag(parent, "alignflow.promotion_reason", "promoted: better" if promoted else "champion kept")
    lin.finish_round(parent, {**{f"before.{k}": v for k, v in before.items()},
                              **{f"after.{k}": v for k, v in after.items()}, "promoted": float(promoted)})
    lin.register_checkpoint(parent, ckpt, REGISTERED, "candidate")
    return {"parent": parent, "runs": runs, "pairs": pair, "checkpoint": ckpt, "prompts": prompts,
            "generations": gens, "judgments": judg}


def pairs_table(chosen_score, rejected_score, chosen_n_tokens, rejected_n_tokens) -> pd.DataFrame:
    return pd.DataFrame({"prompt_id": [f"p{i}" for i in range(len(chosen_score))], "chosen_score": chosen_score,
                         "rejected_score": rejected_score, "chosen_n_tokens": chosen_n_tokens,
                         "rejected_n_tokens": rejected_n_tokens})
