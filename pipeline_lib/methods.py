"""The method table: the training switches, what each loss / reference / pairing needs, and the rules that reject a
combination computing another objective than the one its name promises.

Switches (ARCHITECTURE: orthogonal options): loss × weighting × reference × pairs × optimizer, plus the round's data
mode. Most combinations are fine; the ones that are not are declared here, on the specs, once:
- ``LossSpec``: the loss function, the per-pair columns it reads, whether it needs judge-ordered pairs or pairs of
  independent policy samples, and the references and data modes its objective is defined for (with the reason);
- ``PairSpec``: what a pairing produces (judge order, independent draws, win-probability columns) and whether it
  reads the judge at all; the off-policy and hybrid data modes are pairings of their own (they ignore
  ``pairs.strategy``);
- ``ReferenceSpec``: the data modes a reference is defined for.
``validate_method`` checks the switches among themselves (``MethodConfig``, also in the trainer);
``validate_round`` adds the round's context (data mode, K, batch size, margin) when a round config loads. Every
message names the config keys in conflict and why the combination is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline_lib.losses import (Tensor, dpo_loss, hinge_loss, ipo_loss, sail_loss, sppo_hard_loss, sppo_loss,
                                 sppo_single_loss)

DATA_MODES = ("on_policy", "off_policy", "hybrid")
WINPROB_COLUMNS = ("chosen_winprob", "rejected_winprob", "pair_winprob")
DERIVED_COLUMNS = ("on_policy",)  # built by the train stage from each response's source, for every pairing


def _always(m: "MethodConfig") -> bool:
    return True


def _never(m: "MethodConfig") -> bool:
    return False


@dataclass(frozen=True)
class LossSpec:
    fn: Callable[..., tuple[Tensor, dict]]
    aggregation: Literal["sum", "mean"] = "sum"  # how per-token log-probs become the *_seq inputs
    columns: tuple[str, ...] = ()  # per-example dataset columns passed to ``fn`` as keyword tensors
    options: tuple[str, ...] = ()  # MethodConfig fields passed to ``fn`` (besides beta)
    needs_order: Callable[["MethodConfig"], bool] = _always  # relies on a judge's chosen/rejected order
    needs_independent: Callable[["MethodConfig"], bool] = _never  # on-policy pairs must be two independent draws
    independent_why: str = ""
    references: tuple[str, ...] | None = None  # the references its objective is defined against (None: any)
    reference_why: str = ""
    data_modes: tuple[str, ...] = DATA_MODES
    data_why: str = ""


_SPPO_REFERENCE = ("SPPO's reference is π_t, the policy that sampled this iteration's data (uclaml/SPPO "
                   "sppo/run_sppo.py: ref_model = model); against the campaign's first policy the objective is "
                   "another one from round 2 on")
_SPPO_DATA = ("P̂(y ≻ π_t) must be estimated against K samples of the current policy (SPPO Algorithm 1; uclaml/SPPO "
              "scripts/compute_prob.py averages over the policy's K samples only): an off_policy round has no samples, "
              "and a hybrid round judges the dataset's responses together with the samples and pairs by score")

LOSSES: dict[str, LossSpec] = {
    "dpo": LossSpec(dpo_loss, options=("label_smoothing",)),
    "ipo": LossSpec(ipo_loss, aggregation="mean"),
    "hinge": LossSpec(hinge_loss),
    "sppo": LossSpec(sppo_loss, columns=("chosen_winprob", "rejected_winprob"), needs_order=_never,
                     references=("behavior",), reference_why=_SPPO_REFERENCE, data_modes=("on_policy",),
                     data_why=_SPPO_DATA),
    "sppo_single": LossSpec(sppo_single_loss, columns=("pair_winprob",), needs_order=_never,
                            references=("behavior",), reference_why=_SPPO_REFERENCE, data_modes=("on_policy",),
                            data_why=_SPPO_DATA),
    "sppo_hard": LossSpec(sppo_hard_loss),
    "sail": LossSpec(
        sail_loss, columns=("on_policy",), options=("sail",),
        # self-labelled pairs (λ = 1, SAIL-PP) need no judge: f is symmetric in the two responses
        needs_order=lambda m: m.sail.self_label_prob < 1.0,
        needs_independent=lambda m: m.sail.score_coef > 0,
        independent_why="SAIL's score-function term is the gradient of its objective only for pairs of two "
                        "independent samples of the policy (losses.sail_loss, part 3)"),
}


@dataclass(frozen=True)
class PairSpec:
    judge_order: bool  # chosen/rejected ordered by the judge's verdicts
    independent: Literal["always", "k2", "never"]  # a pair is two independent draws of the sampler (k2: if K = 2)
    describe: str  # how it picks a pair, for messages ({k}: collect.k)
    columns: tuple[str, ...] = ()  # per-pair columns it produces beyond the texts and scores
    needs_judge: bool = True  # reads the annotate stage's verdicts (False: the round skips annotate)
    uses_margin: bool = True  # honours pairs.min_margin

    @property
    def ranks_by_score(self) -> bool:
        """Orders samples by the judge's score (the pairings with a score margin): pairs.unfinished applies."""
        return self.uses_margin and self.needs_judge


PAIRINGS: dict[str, PairSpec] = {
    "best_worst": PairSpec(True, "k2", "the best and the worst of {k} samples"),
    "all_pairs": PairSpec(True, "always", "every judge-ordered pair of the {k} samples"),
    "iid_pairs": PairSpec(True, "always", "samples (0, 1), (2, 3), … ordered by the judge"),
    "sppo_winprob": PairSpec(True, "k2", "the argmax and argmin of P̂ among {k} samples", WINPROB_COLUMNS,
                             uses_margin=False),
    "sppo_all": PairSpec(False, "always", "every sample once in sample order", WINPROB_COLUMNS, uses_margin=False),
    "unlabelled": PairSpec(False, "always", "samples (0, 1), (2, 3), … in sample order, without a judge",
                           needs_judge=False, uses_margin=False),
    # the pairings of the other data modes (not pairs.strategy values)
    "dataset": PairSpec(True, "never", "the dataset's pairs as they are"),
    "hybrid": PairSpec(True, "never", "the best of the dataset's responses and the samples, and a lower-scored one"),
}
PAIRS = ("best_worst", "all_pairs", "iid_pairs", "sppo_winprob", "sppo_all", "unlabelled")  # pairs.strategy
DATA_PAIRING = {"off_policy": "dataset", "hybrid": "hybrid"}  # on_policy: pairs.strategy


@dataclass(frozen=True)
class ReferenceSpec:
    data_modes: tuple[str, ...] = DATA_MODES
    data_why: str = ""


REFERENCE_SPECS: dict[str, ReferenceSpec] = {
    "initial": ReferenceSpec(),
    "behavior": ReferenceSpec(
        ("on_policy",),
        "BPO's reference is the model that sampled the pairs (xu1998hz/BPO train/online_dpo_rand_trainer.py: the "
        "reference adapter is the sampler's), but a dataset's responses were not sampled by this round's policy, "
        "which the stage would use as the reference: the run would be plain DPO under BPO's name"),
}


def _producers(columns: set[str]) -> str:
    return " or ".join(f"'{p}'" for p in PAIRS if columns <= set(PAIRINGS[p].columns))


def validate_method(m: "MethodConfig") -> None:
    """Reject switches that conflict among themselves, naming the keys and the reason (ValueError)."""
    # loss is the one free-text switch; weighting, reference and pairs are Literal fields, checked by pydantic
    # before this runs (validate_method is MethodConfig's after-validator)
    if m.loss not in LOSSES:
        raise ValueError(f"train.loss: unknown value {m.loss!r}; known: {', '.join(LOSSES)}")
    spec = LOSSES[m.loss]
    if spec.references is not None and m.reference not in spec.references:
        raise ValueError(f"train.loss={m.loss} with train.reference={m.reference}: {spec.reference_why}; set "
                         f"train.reference={spec.references[0]}")
    _check_pairing(m, m.pairs, f"pairs.strategy={m.pairs}")


def _check_pairing(m: "MethodConfig", pairing: str, keys: str) -> None:
    spec, pair = LOSSES[m.loss], PAIRINGS[pairing]
    missing = set(spec.columns) - set(DERIVED_COLUMNS) - set(pair.columns)
    if missing:
        raise ValueError(f"train.loss={m.loss} with {keys}: the loss needs {', '.join(sorted(missing))} per pair "
                         f"(win-probabilities P̂(y ≻ π) from the judge), which only pairs.strategy="
                         f"{_producers(missing)} produces in an on_policy round")
    if spec.needs_order(m) and not pair.judge_order:
        raise ValueError(f"train.loss={m.loss} with {keys}: the loss needs pairs ordered by a judge "
                         f"(chosen ≻ rejected), and this pairing takes {pair.describe.format(k='K')}")


def validate_round(m: "MethodConfig", *, data_mode: str, k: int, batch_size: int, min_margin: float = 0.0,
                   unfinished: str = "keep") -> None:
    """The round's context on top of ``validate_method``: the data mode, K samples per prompt, the batch size."""
    if data_mode not in DATA_MODES:
        raise ValueError(f"data.mode: unknown value {data_mode!r}; known: {', '.join(DATA_MODES)}")
    spec = LOSSES[m.loss]
    if data_mode not in spec.data_modes:
        raise ValueError(f"train.loss={m.loss} with data.mode={data_mode}: {spec.data_why}")
    ref = REFERENCE_SPECS[m.reference]
    if data_mode not in ref.data_modes:
        raise ValueError(f"train.reference={m.reference} with data.mode={data_mode}: {ref.data_why}; use "
                         f"train.reference=initial, or data.mode=on_policy")
    pairing = DATA_PAIRING.get(data_mode, m.pairs)
    if pairing != m.pairs and m.pairs != "best_worst":
        raise ValueError(f"pairs.strategy={m.pairs} with data.mode={data_mode}: that data mode takes "
                         f"{PAIRINGS[pairing].describe} and ignores pairs.strategy (hybrid rounds: data.hybrid)")
    if pairing != m.pairs:
        _check_pairing(m, pairing, f"data.mode={data_mode}")
        if unfinished != "keep":
            raise ValueError(f"pairs.unfinished={unfinished} with data.mode={data_mode}: that data mode takes "
                             f"{PAIRINGS[pairing].describe} and does not look at how samples ended")
    pair = PAIRINGS[pairing]
    if min_margin > 0 and pairing == m.pairs and not pair.uses_margin:
        raise ValueError(f"pairs.min_margin={min_margin} with pairs.strategy={m.pairs}: that pairing keeps every "
                         "prompt (as uclaml/SPPO scripts/compute_prob.py does) and has no score margin to apply")
    independent = pair.independent == "always" or (pair.independent == "k2" and k == 2)
    if data_mode != "off_policy" and spec.needs_independent(m) and not independent:
        if pairing == m.pairs:
            where, fix = f"pairs.strategy={pairing} and collect.k={k}", "pairs.strategy=iid_pairs (or all_pairs, or " \
                                                                        "collect.k=2)"
        else:
            where, fix = f"data.mode={data_mode}", "data.mode=on_policy with pairs.strategy=iid_pairs"
        raise ValueError(f"train.loss={m.loss} with {where}: {spec.independent_why}, and this pairing takes "
                         f"{pair.describe.format(k=k)}, not two draws; use {fix}, or set train.sail.score_coef=0")
    if m.loss == "sail" and m.sail.score_term == "baseline" and m.sail.score_coef > 0 and batch_size < 2 \
            and data_mode != "off_policy":
        raise ValueError("train.sail.score_term=baseline with train.batch_size=1: a pair's baseline is the mean f of "
                         "the other on-policy pairs in its batch, and a batch of one has none, so the score term "
                         "would vanish; use train.batch_size >= 2, or train.sail.score_term=plain")


class WpoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alignment: Literal["sampled", "greedy"] = Field("sampled", description="denominator Σπ² (sampled) or max π")
    clamp: bool = Field(True, description="cap w(y_w)·w(y_l) at 1 like the WPO code (TRL's use_weighting: false)")


class SailOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    self_label_prob: float = Field(0.0, ge=0.0, le=1.0,
                                   description="probability a pair is labelled by the policy, σ(βh), instead of the "
                                               "judge: 0 = SAIL-PR on policy pairs, 1 = SAIL-PP / SAIL-DDP")
    score_coef: float = Field(1.0, ge=0.0, description="coefficient of the score-function term (on-policy pairs); "
                                                       "1 = the exact gradient of SAIL's objective")
    score_term: Literal["baseline", "plain", "hook"] = Field(
        "baseline", description="baseline: (f − mean f of the batch's other pairs)·∇log π; plain: f·∇log π; "
                                "hook: the authors' gradient hook −score_coef·f/log π (see losses.sail_loss)")
    label_coef: float = Field(1.0, ge=0.0, description="coefficient of the gradient through self-labels σ(βh)")


class MethodConfig(BaseModel):
    """The orthogonal training switches (ARCHITECTURE: loss × weighting × reference × pairs × optimizer)."""

    model_config = ConfigDict(extra="forbid")
    loss: str = "dpo"
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="dpo only: conservative DPO ε")
    weighting: Literal["none", "wpo"] = "none"
    wpo: WpoOptions = WpoOptions()
    reference: Literal["initial", "behavior"] = "initial"
    pairs: Literal["best_worst", "all_pairs", "iid_pairs", "sppo_winprob", "sppo_all", "unlabelled"] = "best_worst"
    optimizer: Literal["adamw", "rmsprop"] = "adamw"
    sail: SailOptions = SailOptions()

    @model_validator(mode="after")
    def _compatible(self) -> "MethodConfig":
        validate_method(self)
        spec = LOSSES[self.loss]
        if self.label_smoothing and "label_smoothing" not in spec.options:
            raise ValueError(f"train.label_smoothing applies only to train.loss=dpo, not train.loss={self.loss}")
        if "sail" in self.model_fields_set and "sail" not in spec.options:
            raise ValueError(f"train.sail options are set but train.loss={self.loss}: they apply to train.loss=sail")
        if "wpo" in self.model_fields_set and self.weighting != "wpo":
            raise ValueError(f"train.wpo options are set but train.weighting={self.weighting}: they apply to "
                             "train.weighting=wpo")
        return self

    def loss_kwargs(self) -> dict:
        """Keyword options for the loss function, from the fields its spec names."""
        out = {}
        for name in LOSSES[self.loss].options:
            value = getattr(self, name)
            out.update(value.model_dump() if isinstance(value, BaseModel) else {name: value})
        return out
