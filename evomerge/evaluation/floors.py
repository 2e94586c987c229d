"""Per-task floors: a fitness that punishes a lost skill.

A weighted sum of task scores lets a search trade one skill away for more of another; floors
say the score below which a task counts as lost: the base model's own score on it (measured once
on each task's search split when the search starts, and frozen with the run, so a resumed or
Ray-worker search reads the same values), a value given per task, or both (a given value wins).

With ``m_t`` a task's metric on the candidate's items and ``f_t`` its floor plus ``margin``:

- ``mode: penalty`` (a soft constraint): ``fitness = sum_t w_t m_t - strength * sum_t
  max(0, f_t - m_t)``; above every floor it is the plain weighted sum.
- ``mode: min`` (a min-over-tasks term): ``fitness = sum_t w_t m_t + strength * min_t (m_t -
  f_t)``; raising the task nearest its floor always pays.

Tasks without a floor (neither given nor measured) take no part in either term.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from evomerge.evaluation.tasks import TaskConfig, metric_range


class FloorsConfig(BaseModel):
    """The ``floors:`` key of a search config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base: bool = Field(True, description="floors at the base model's scores (base_model, or the "
                       "first model), measured once when the search starts")
    values: dict[str, float] = Field(default_factory=dict, description="task name -> floor "
                                     "(wins over the base's score)")
    margin: float = Field(0.0, allow_inf_nan=False, description="added to every floor")
    mode: Literal["penalty", "min"] = "penalty"
    strength: float = Field(1.0, ge=0, allow_inf_nan=False, description="penalty per unit of shortfall, "
                            "or the weight of the min term")
    base_scores: dict[str, float] | None = Field(None, description="the base's scores, filled in "
                                                 "when the search starts (not set by hand)")

    @model_validator(mode="after")
    def _finite(self) -> FloorsConfig:
        for name, v in self.values.items():
            if not 0.0 <= v <= 1.0e9:
                raise ValueError(f"values.{name}: a floor must be a finite number >= 0 (got {v})")
        return self

    def check_tasks(self, tasks: Sequence[TaskConfig]) -> None:
        """Every floor names a task and lies in its metric's range (where lm-eval's metric has a
        known one): a floor outside it is never met, or always met, whatever the candidate."""
        names = {t.name for t in tasks}
        unknown = sorted(set(self.values) - names)
        if unknown:
            raise ValueError(f"floors.values: unknown task {', '.join(map(repr, unknown))}; the "
                             f"tasks are {', '.join(sorted(names))}")
        for t in tasks:
            rng = metric_range(t.metric)
            if rng is None:
                continue
            lo, hi = rng
            if abs(self.margin) >= hi - lo:
                raise ValueError(f"floors.margin: {self.margin} is as wide as the whole range [{lo:g}, {hi:g}] of "
                                 f"the metric {t.metric} (task {t.name!r}): no candidate could meet (or miss) the floor")
            v = self.values.get(t.name)
            if v is not None and not lo <= v + self.margin <= hi:
                with_margin = f" (with margin {self.margin:g}: {v + self.margin:g})" if self.margin else ""
                raise ValueError(f"floors.values.{t.name}: {v:g}{with_margin} lies outside the range "
                                 f"[{lo:g}, {hi:g}] of its metric {t.metric}")

    def check_base_scores(self, tasks: Sequence[TaskConfig]) -> None:
        """Once the base's scores are measured: each floor they set (a task without a given value)
        plus the margin lies in its metric's range, as check_tasks asks of a given value."""
        if not self.base:
            return
        for t in tasks:
            rng, score = metric_range(t.metric), (self.base_scores or {}).get(t.name)
            if rng is None or score is None or t.name in self.values:
                continue
            lo, hi = rng
            floor = score + self.margin
            if not lo <= floor <= hi:
                never = "no candidate can reach it" if floor > hi else "every candidate meets it"
                raise ValueError(f"floors.margin: {self.margin:g} on the base model's score {score:g} on task "
                                 f"{t.name!r} gives the floor {floor:g}, outside the range [{lo:g}, {hi:g}] of its "
                                 f"metric {t.metric}: {never}; choose a smaller margin, or set floors.values.{t.name}")

    def floor_of(self) -> dict[str, float]:
        """task -> floor + margin, for the tasks that have a floor."""
        floors = dict(self.base_scores or {}) if self.base else {}
        floors.update(self.values)
        return {k: v + self.margin for k, v in floors.items()}

    def needs_base_scores(self) -> bool:
        return self.base and self.base_scores is None


def floored_fitness(total: float, metrics: Mapping[str, Mapping[str, float]],
                    tasks: Sequence[TaskConfig], floors: FloorsConfig | None) -> float:
    """The weighted sum `total` with the floors' term (unchanged without floors, or when a task
    with a floor was not scored)."""
    if floors is None:
        return total
    limit = floors.floor_of()
    gaps = [metrics[t.name][t.metric] - limit[t.name] for t in tasks
            if t.name in limit and t.name in metrics and t.metric in metrics[t.name]]
    if not gaps:
        return total
    if floors.mode == "penalty":
        return total - floors.strength * sum(max(0.0, -g) for g in gaps)
    return total + floors.strength * min(gaps)


def measure_base_scores(model_path: str | Path, tasks: Sequence[TaskConfig], evaluators, *,
                        device: str = "cpu", dtype: str = "float32", allow_pickle: bool = False,
                        trust_remote_code: bool = False) -> dict[str, float]:
    """The base model's metric on every task's whole search split (the floors' default), loaded
    as the search loads its sources (device, dtype), so the floors compare like with like."""
    from evomerge.models.folders import load_tokenizer
    from evomerge.models.sources import load_source_lm, model_folder

    model = load_source_lm(str(model_path), device=device, dtype=dtype, allow_pickle=allow_pickle,
                           trust_remote_code=trust_remote_code)
    tok = load_tokenizer(model_folder(str(model_path)), trust_remote_code=trust_remote_code)
    out = {}
    for t in tasks:
        res = evaluators[t.name].evaluate(model, tok)[t.name]
        out[t.name] = float(res.metrics[t.metric])
    return out


__all__: Sequence[str] = ["FloorsConfig", "floored_fitness", "measure_base_scores"]
