"""The ``fitness:`` config section: how a candidate's fitness is computed from the items it is
scored on (docs/irt.md).

    fitness: {estimator: mean}                       # the default: the mean over the items scored
    fitness: {estimator: irt, anchors: 25}           # IRT estimate from 25 anchor items per task
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from evomerge.evaluation.tasks import metric_range

DEFAULT_ANCHORS = 25
MAX_ANCHORS = 1_000_000


class FitnessConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    estimator: Literal["mean", "irt"] = Field("mean", description="mean: each task's metric on the items "
                                              "scored (today's fitness); irt: candidates are scored on "
                                              "anchor items only and their full-split metric is estimated "
                                              "with a 2PL IRT model (p-IRT, docs/irt.md)")
    anchors: int | None = Field(None, ge=1, le=MAX_ANCHORS, description=f"irt: anchor items per task "
                                f"(default {DEFAULT_ANCHORS}); at most the split's size")
    anchor_choice: Literal["cluster", "random"] = Field("cluster", description="irt: anchors nearest the "
                                                        "centroids of a seeded k-means of the items' IRT "
                                                        "parameters, or a seeded random choice")
    refit: bool = Field(True, description="irt: refit the item parameters at each generation's end with "
                        "the population's anchor scores (anchors stay fixed)")

    @model_validator(mode="after")
    def _irt_only(self) -> FitnessConfig:
        if self.estimator == "mean":
            given = [k for k in ("anchors",) if getattr(self, k) is not None]
            if given or self.anchor_choice != "cluster" or not self.refit:
                raise ValueError("anchors, anchor_choice and refit apply to estimator: irt")
        return self

    @property
    def irt(self) -> bool:
        return self.estimator == "irt"

    @property
    def n_anchors(self) -> int:
        return self.anchors if self.anchors is not None else DEFAULT_ANCHORS


def irt_requested(data) -> bool:
    """Whether a raw config dict asks for the IRT estimator (no default racing then)."""
    f = data.get("fitness") if isinstance(data, dict) else None
    return isinstance(f, dict) and f.get("estimator") == "irt"


def check_fitness(cfg) -> None:
    """Cross-field checks of a SearchConfig with ``fitness: {estimator: irt}`` (ValueError)."""
    f = cfg.fitness
    if not f.irt:
        return
    for i, t in enumerate(cfg.tasks):  # IRT fits per-item scores as Bernoulli targets
        rng = metric_range(t.metric)
        if rng is None or not (0.0 <= rng[0] and rng[1] <= 1.0):
            known = "an unknown range" if rng is None else f"values in [{rng[0]:g}, {rng[1]:g}]"
            raise ValueError(f"tasks.{i}.metric: fitness.estimator irt needs a metric in [0, 1] (acc, acc_norm, "
                             f"exact_match, f1, ...); {t.metric!r} has {known}: use estimator: mean")
    limited = [i for i, t in enumerate(cfg.tasks) if t.limit is not None]
    if limited:
        raise ValueError(f"tasks.{limited[0]}.limit: with fitness.estimator irt the anchors decide which "
                         "items a candidate is scored on; remove limit")
    if cfg.racing is not None:
        small = [n for n in cfg.racing.stages if n is not None and n <= f.n_anchors]
        if small:
            raise ValueError(f"racing.stages: with fitness.estimator irt the anchors ({f.n_anchors} items per "
                             f"task) are the race's first stage and the stages follow them; every stage "
                             f"must be larger than the anchors (got {small[0]})")
