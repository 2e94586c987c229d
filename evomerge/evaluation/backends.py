"""Evaluator backends, chosen per search (``evaluator: {backend: hf | vllm, ...}``) and by
``evomerge eval --backend``: one place that builds an evaluator of either kind for one task.

- ``hf``: lm-eval's Hugging Face backend over the in-memory candidate (evaluator.py).
- ``vllm``: one resident vLLM engine per process; each candidate's merged weights are written
  into it in place (vllm_engine.py). Parameter-space searches only: a data-flow candidate has
  its own layer count, which a resident engine cannot take.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

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
    prefix_caching: bool = Field(True, description="vllm: prompts of one candidate reuse the KV blocks of "
                                 "their shared prefixes (reset at every weight swap)")
    block_size: int | None = Field(None, ge=1, le=4096, description="vllm: KV cache block size in tokens; "
                                   "prefix caching shares whole blocks (default: vLLM's, 128 on CPU)")

    def settings(self) -> dict:
        """What enters a score's settings key (the fitness cache, per-item reuse): empty for the
        default backend, so runs made before this key existed keep their keys. Prefix caching is
        left out (it changes no score: tests/test_vllm_prefix_cache.py), and so is a default
        block size (runs made before the option keep their keys)."""
        if self.backend == "hf":
            return {}
        dump = self.model_dump(mode="json", exclude={"prefix_caching"})
        if dump["block_size"] is None:
            del dump["block_size"]
        return {"evaluator": dump}


# gen_kwargs keys lm-eval itself reads before the backend sees the rest (lm_eval.models.utils.
# normalize_gen_kwargs): the stop strings, the token budget (and its aliases), greedy or sampled.
LM_EVAL_GEN_KEYS = ("until", "max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens",
                    "do_sample", "temperature")
TOKEN_BUDGETS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")


def backend_gen_keys(backend: str) -> set[str]:
    """The generation keys a backend passes on: transformers' GenerationConfig fields (hf, given to
    ``model.generate``) or vLLM's SamplingParams fields (vllm); lm-eval's own keys on top."""
    if backend == "vllm":
        from vllm import SamplingParams

        keys = {k for k in SamplingParams.__struct_fields__ if not k.startswith("_")}
    else:
        from transformers import GenerationConfig

        keys = {k for k in GenerationConfig().to_dict() if not k.startswith("_")}
    return keys | set(LM_EVAL_GEN_KEYS)


def check_gen_kwargs(gen_kwargs: dict[str, Any] | None, backend: str, field: str) -> None:
    """A task's gen_kwargs against what the backend accepts, before any model loads: an unknown key
    (a typo reaches ``generate`` or SamplingParams only when the first candidate is scored) and
    values lm-eval would pass on unchecked (a negative token budget, a negative temperature)."""
    if not gen_kwargs:
        return
    for key in TOKEN_BUDGETS:
        v = gen_kwargs.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"{field}.{key}: the number of tokens to generate, a positive integer (got {v!r})")
    t = gen_kwargs.get("temperature")
    if t is not None and (isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t < 0):
        raise ConfigError(f"{field}.temperature: a finite number >= 0 (got {t!r})")
    until = gen_kwargs.get("until")
    if until is not None and not (isinstance(until, str) or (isinstance(until, list)
                                                              and all(isinstance(u, str) for u in until))):
        raise ConfigError(f"{field}.until: a stop string or a list of them (got {until!r})")
    if "do_sample" in gen_kwargs and not isinstance(gen_kwargs["do_sample"], bool):
        raise ConfigError(f"{field}.do_sample: true or false (got {gen_kwargs['do_sample']!r})")
    known = backend_gen_keys(backend)
    unknown = sorted(set(gen_kwargs) - known)
    if unknown:
        import difflib

        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, sorted(known), n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        what = "vLLM's SamplingParams" if backend == "vllm" else "transformers' generate()"
        raise ConfigError(f"{field}: unknown generation key {', '.join(hints)}: the {backend} backend accepts "
                          f"lm-eval's ({', '.join(LM_EVAL_GEN_KEYS)}) and those of {what}")


def memory_gib() -> float:
    """This machine's physical memory (GiB)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def check_vllm_limits(cfg: EvaluatorConfig, model_config: dict, device: str, *, min_len: int = 2) -> None:
    """The vllm settings against the model and the machine, before an engine starts: a context
    longer than the model's positions, one too short for any prompt (``min_len``: the generation
    tasks' token budget + 1), a CPU KV cache larger than the machine's memory, a KV block size
    vLLM's CPU attention does not take."""
    if cfg.backend != "vllm":
        return
    if cfg.max_model_len is not None:
        positions = next((model_config[k] for k in ("max_position_embeddings", "n_positions", "max_seq_len")
                          if isinstance(model_config.get(k), int)), None)
        if positions is not None and cfg.max_model_len > positions:
            raise ConfigError(f"evaluator.max_model_len: {cfg.max_model_len} is longer than the model's "
                              f"{positions} positions (max_position_embeddings); give at most {positions}, "
                              "or leave it out (the model's)")
        if cfg.max_model_len < min_len:
            raise ConfigError(f"evaluator.max_model_len: {cfg.max_model_len} leaves no room for a prompt: at "
                              f"least {min_len} (the tokens a generation task may generate, plus one)")
    if not device.startswith("cuda"):
        from evomerge.evaluation.vllm_engine import cpu_block_multiple

        multiple = cpu_block_multiple() if cfg.block_size is not None else None
        if multiple and cfg.block_size % multiple:
            raise ConfigError(f"evaluator.block_size: {cfg.block_size} tokens, but vLLM's CPU attention takes "
                              f"multiples of {multiple} only; give {multiple}, {2 * multiple}, ... or leave it out")
        total = memory_gib()
        if cfg.kv_cache_gib >= total:
            raise ConfigError(f"evaluator.kv_cache_gib: {cfg.kv_cache_gib} GiB of KV cache, but this machine "
                              f"has {total:.1f} GiB of memory in all; give less than {int(total)}")


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
                         kv_cache_gib=cfg.kv_cache_gib, enforce_eager=cfg.enforce_eager,
                         prefix_caching=cfg.prefix_caching, block_size=cfg.block_size, **kwargs)


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
