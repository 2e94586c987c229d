"""A task of the fitness: which lm-eval task, which metric, its weight and how it is scored."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class TaskConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="lm-eval task name (zoo tasks: zoo_add, zoo_rev, zoo_sub)")
    metric: str = Field("acc", description="metric of the task that enters the fitness")
    weight: float = Field(1.0, description="weight of this metric in the fitness (weighted sum)")
    split: str | None = Field("dev", description="dataset split scored during the search")
    limit: int | None = Field(None, ge=1, description="items per evaluation: a subset chosen by seed "
                              "per generation; null scores the whole split")
    num_fewshot: int | None = Field(None, ge=0)
    apply_chat_template: bool = Field(False, description="format prompts with the tokenizer's chat template")
    lm_eval_task_overrides: dict[str, Any] = Field(default_factory=dict,
                                                   description="task config keys set on the loaded task")
