"""A task of the fitness: which lm-eval task, which metric, its weight and how it is scored."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_serializer

# Options added after run folders existed: left out of a dump while at their defaults, so the
# settings keys (fitness cache, per-item reuse) and frozen configs of older runs stay as they were.
_LATER_DEFAULTS = {"fewshot_as_multiturn": False, "system_instruction": None, "gen_kwargs": None}


# The ranges of lm-eval's common metrics (per item and aggregated), for the checks that need one:
# floors within the metric's range, IRT only on a metric in [0, 1]. A metric not named here has no
# known range: only finiteness is checked, and IRT refuses it.
METRIC_RANGES: dict[str, tuple[float, float]] = {
    **dict.fromkeys(("acc", "acc_norm", "acc_mutual_info", "exact_match", "f1", "em", "brier_score",
                     "likelihood_ratio", "contains"), (0.0, 1.0)),
    "mcc": (-1.0, 1.0),
    **dict.fromkeys(("bleu", "chrf", "rouge1", "rouge2", "rougeL"), (0.0, 100.0)),
}


def metric_range(metric: str) -> tuple[float, float] | None:
    """The range of a metric's values (lm-eval's name, before any ``,filter``), None if unknown."""
    return METRIC_RANGES.get(metric.split(",", 1)[0])


class TaskConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="lm-eval task name (zoo tasks: zoo_add, zoo_rev, zoo_sub; generation: "
                      "zoo_add_gen, zoo_rev_gen, zoo_sub_gen, zoo_rev_gen_2shot)")
    metric: str = Field("acc", description="metric of the task that enters the fitness (generation tasks: "
                        "exact_match)")
    weight: float = Field(1.0, description="weight of this metric in the fitness (weighted sum)")
    split: str | None = Field("dev", description="dataset split scored during the search")
    limit: int | None = Field(None, ge=1, description="items per evaluation: a subset chosen by seed "
                              "per generation; null scores the whole split")
    # lm-eval's options, passed through as `lm_eval` takes them (its --num_fewshot, ...)
    num_fewshot: int | None = Field(None, ge=0)
    apply_chat_template: bool = Field(False, description="format prompts with the tokenizer's chat template")
    fewshot_as_multiturn: bool = Field(False, description="few-shot examples as chat turns (with "
                                       "apply_chat_template)")
    system_instruction: str | None = Field(None, description="a system prompt before each prompt")
    gen_kwargs: dict[str, Any] | None = Field(None, description="generation tasks: updates the task's "
                                              "generation_kwargs (until, max_gen_toks, ...)")
    lm_eval_task_overrides: dict[str, Any] = Field(default_factory=dict,
                                                   description="task config keys set on the loaded task")

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        data = handler(self)
        for key, default in _LATER_DEFAULTS.items():
            if key in data and data[key] == default:
                del data[key]
        return data

    def lm_eval_options(self) -> dict[str, Any]:
        """The keyword arguments of ``LmEvalEvaluator`` that this task's lm-eval options set."""
        return {"num_fewshot": self.num_fewshot, "apply_chat_template": self.apply_chat_template,
                "fewshot_as_multiturn": self.fewshot_as_multiturn,
                "system_instruction": self.system_instruction, "gen_kwargs": self.gen_kwargs}
