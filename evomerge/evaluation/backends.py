"""Evaluator backends, chosen per search (``evaluator: {backend: hf | vllm, ...}``) and by
``evomerge eval --backend``: one place that builds an evaluator of either kind for one task.

- ``hf``: lm-eval's Hugging Face backend over the in-memory candidate (evaluator.py).
- ``vllm``: one resident vLLM engine per process; each candidate's merged weights are written
  into it in place (vllm_engine.py). Parameter-space searches only: a data-flow candidate has
  its own layer count, which a resident engine cannot take.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from evomerge.core.errors import ConfigError
from evomerge.evaluation import BACKENDS
from evomerge.evaluation.evaluator import LmEvalEvaluator
from evomerge.evaluation.tasks import TaskConfig


class EvaluatorConfig(BaseModel):
    """The search config's ``evaluator:`` key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal[BACKENDS] = Field("hf", description="hf: lm-eval's Hugging Face backend; vllm: a "
                                           "resident vLLM engine, weights swapped in place per candidate")
    kv_cache_gib: int = Field(1, ge=1, le=4096, description="vllm on CPU: KV cache size (GiB)")
    max_model_len: int | None = Field(None, ge=1, description="vllm: context length (default: the model's)")
    enforce_eager: bool = Field(True, description="vllm: no CUDA graphs / compilation (faster start)")

    def settings(self) -> dict:
        """What enters a score's settings key (the fitness cache, per-item reuse): empty for the
        default backend, so runs made before this key existed keep their keys."""
        return {} if self.backend == "hf" else {"evaluator": self.model_dump(mode="json")}


def make_evaluator(cfg: EvaluatorConfig | None, task: TaskConfig, *, split: str | None, batch_size: int,
                   model_dir: str | Path | None = None, dtype: str = "float32",
                   log_samples: bool = False) -> LmEvalEvaluator:
    """The evaluator of one task, with the task's lm-eval options (``TaskConfig.lm_eval_options``).
    ``model_dir``: a folder of the candidates' architecture that the vLLM engine starts from."""
    kwargs = dict(split=split, batch_size=batch_size, log_samples=log_samples, **task.lm_eval_options())
    if cfg is None or cfg.backend == "hf":
        return LmEvalEvaluator([task.name], **kwargs)
    from evomerge.evaluation.vllm_engine import VllmEvaluator, vllm_available

    if reason := vllm_available():  # refused when the config is checked, before any weights load
        raise ConfigError(f"evaluator backend 'vllm' needs vLLM (pip install 'evomerge[vllm]'): {reason}")
    if model_dir is None:
        raise ValueError("the vllm backend needs a model folder to start its engine from")
    return VllmEvaluator([task.name], model_dir=model_dir, dtype=dtype, max_model_len=cfg.max_model_len,
                         kv_cache_gib=cfg.kv_cache_gib, enforce_eager=cfg.enforce_eager, **kwargs)


def evaluate_folder(model_dir: str | Path, tasks: list[str], *, backend: str = "hf", **kwargs):
    """``evomerge eval --backend``: a model folder scored by either backend (vllm: an engine
    started from the folder, or the process's resident one with the folder's weights put back)."""
    from evomerge.evaluation.evaluator import evaluate_model_dir
    from evomerge.models.folders import check_model_dir

    if backend == "hf":
        return evaluate_model_dir(model_dir, tasks, **kwargs)
    if backend != "vllm":
        raise ConfigError(f"unknown evaluator backend {backend!r} (hf or vllm)")
    limit = kwargs.pop("limit", None)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer (got {limit!r})")
    check_model_dir(model_dir, allow_pickle=kwargs.get("allow_pickle", False),
                    trust_remote_code=kwargs.get("trust_remote_code", False))
    from evomerge.evaluation.vllm_engine import VllmEvaluator, vllm_available

    if reason := vllm_available():
        raise ConfigError(f"--backend vllm needs vLLM (pip install 'evomerge[vllm]'): {reason}")
    ev = VllmEvaluator(tasks, split=kwargs.get("split"), batch_size=kwargs.get("batch_size", 32),
                       model_dir=model_dir, dtype=kwargs.get("dtype", "float32"))
    return ev.evaluate(None, limit=limit)
