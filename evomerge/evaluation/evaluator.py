"""Evaluation of causal LMs with lm-eval: the only module that imports lm-eval.

``Evaluator`` is the small interface a search calls (the vLLM backend, vllm_engine.py, is
another implementation; backends.py picks one). ``LmEvalEvaluator`` loads its tasks once and then scores any number of models, including
an in-memory ``torch.nn.Module`` whose weights change in place between calls.

Settings that make scores reproducible (see shared conventions): a fixed batch size (never "auto":
padding changes logits), ``bootstrap_iters=0``, lm-eval's response cache off, and no reseeding of
the global random generators (``lm_eval.evaluator.evaluate`` is called directly, not
``simple_evaluate``, which reseeds Python, NumPy and torch on every call).

Few-shot examples are drawn per document: lm-eval's sampler holds one ``random.Random`` that is
seeded once and advances with every prompt it builds, so an item's examples would depend on what
was evaluated before it (evaluation order, worker, resume point, item subset). Each prompt is
built from a generator seeded by (few-shot seed, the document's content) instead.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from evomerge.core.data import data_dir
from evomerge.core.errors import ConfigError, UnknownTaskError
from evomerge.models.folders import check_model_dir, load_causal_lm, load_tokenizer

REPO_EVALS = data_dir("evals")  # the repository's evals/, or a wheel's copy


def default_include_paths() -> list[Path]:
    """The zoo tasks (``evals/`` of this checkout) plus ``$EVOMERGE_TASKS`` (os.pathsep-separated)."""
    paths = [REPO_EVALS] if REPO_EVALS.is_dir() else []
    extra = os.environ.get("EVOMERGE_TASKS", "")
    paths += [Path(p) for p in extra.split(os.pathsep) if p]
    return paths


@dataclass(frozen=True)
class TaskResult:
    """Metrics of one task: ``{"acc": 0.93, ...}`` (lm-eval's ``metric,filter`` keys with the
    ``none`` filter reduced to the metric name), and the number of items scored."""

    task: str
    metrics: dict[str, float]
    n_items: int
    samples: list[dict] = field(default_factory=list, compare=False, repr=False)


class Evaluator(Protocol):
    """Scores a model on a fixed set of tasks. Implementations keep their tasks loaded."""

    tasks: Sequence[str]

    def metric_names(self, task: str) -> list[str]: ...

    def n_docs(self, task: str) -> int: ...

    def evaluate(self, model: torch.nn.Module, tokenizer, *, limit: int | None = None,
                 samples: dict[str, list[int]] | None = None) -> dict[str, TaskResult]: ...


@functools.lru_cache(maxsize=8)
def _indexed_tasks(paths: tuple[str, ...], include_defaults: bool):
    """lm-eval's task index (no task is built); indexing the built-in tasks takes about 9 s, so
    the index is made once per process and folder list."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths) or None, include_defaults=include_defaults)


def _task_manager(names: Sequence[str], include_paths: Sequence[Path]):
    paths = tuple(str(p) for p in include_paths)
    # Skipping lm-eval's built-in tasks saves that scan when only local tasks are named.
    tm = _indexed_tasks(paths, False)
    if all(tm._entry(n) for n in names):
        return tm
    tm = _indexed_tasks(paths, True)
    missing = [n for n in names if not tm._entry(n)]
    if missing:
        known = list(tm.all_tasks)
        hints = []
        for n in missing:
            close = difflib.get_close_matches(n, known, n=3)
            hints.append(f"{n!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        local = sorted(k for k in known if k.startswith("zoo_"))
        raise UnknownTaskError(f"unknown lm-eval task {', '.join(hints)}; the zoo tasks are {', '.join(local)}")
    return tm


def _metrics(raw: dict) -> dict[str, float]:
    """A metric's bare name for its value under the ``none`` filter, or under its only filter (a
    generation task's answer extraction, as per-item scores have it); ``metric,filter`` otherwise."""
    out, filters = {}, {}
    for key, value in raw.items():
        if "," not in key or "_stderr" in key or not isinstance(value, int | float):
            continue
        metric, filt = key.split(",", 1)
        filters.setdefault(metric, []).append(filt)
        out[metric if filt == "none" else key] = float(value)
    for metric, fs in filters.items():
        if len(fs) == 1 and fs[0] != "none":
            out[metric] = out.pop(f"{metric},{fs[0]}")
    return out


# Generated answers are decoded without special tokens in both backends: lm-eval's hf model
# decodes with skip_special_tokens=True, its vllm model asks vLLM for them (skip_special_tokens=
# False); the vllm backend overrides that (vllm_engine.py), so that "<s>" in an answer cannot make
# exact_match differ between backends (docs/evaluation.md).
ANSWERS_SKIP_SPECIAL_TOKENS = True


def quiet_lm_class(lm_class):
    """``lm_class`` (an lm-eval LM) without its per-call progress bars: lm-eval's backends pass
    ``disable_tqdm=False`` explicitly, so TQDM_DISABLE has no effect, and a search calls them
    thousands of times under its own display."""

    class Quiet(lm_class):
        def loglikelihood(self, requests, disable_tqdm: bool = True):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = True):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = True):
            return super().generate_until(requests, disable_tqdm=True)

    Quiet.__name__ = Quiet.__qualname__ = f"Quiet{lm_class.__name__}"
    return Quiet


def _quiet_hflm():
    from lm_eval.models.huggingface import HFLM

    return quiet_lm_class(HFLM)


class _PerDocFewshot:
    """A task's ``fewshot_context`` with the few-shot generator reseeded from (seed, document) on
    every call, so that a document's prompt does not depend on the prompts built before it."""

    def __init__(self, task, seed: int):
        self.task, self.seed, self.inner = task, seed, task.fewshot_context

    def rnd(self, doc) -> random.Random:
        key = hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()
        return random.Random(f"{self.seed}:{key}")  # str seeds hash with SHA-512: same in every process

    def __call__(self, doc, *args, **kwargs):
        rnd = self.rnd(doc)
        self.task.fewshot_rnd = rnd  # lm-eval's plain Task draws from this one
        if getattr(self.task, "sampler", None) is not None:  # ConfigurableTask's sampler
            self.task.sampler.rnd = rnd
        return self.inner(doc, *args, **kwargs)


class _MemoRequests:
    """A task's ``build_all_requests`` that builds each document's requests (its prompt, few-shot
    examples and targets rendered by the task's templates) once per evaluator and prompt settings,
    and hands every later call fresh copies: the prompts are the same for every candidate, and
    building them was about half of an evaluation's time on the zoo (scripts/bench_eval.py).
    A document's prompt depends on nothing else (few-shot examples are seeded per document)."""

    def __init__(self, task):
        self.task, self.inner = task, task.build_all_requests
        self.memo: dict[tuple, dict[int, list]] = {}

    def __call__(self, *, limit=None, samples=None, rank=0, world_size=1, **kw):
        import dataclasses

        if world_size != 1:
            return self.inner(limit=limit, samples=samples, rank=rank, world_size=world_size, **kw)
        key = tuple((k, kw.get(k)) for k in ("system_instruction", "apply_chat_template",
                                             "fewshot_as_multiturn", "tokenizer_name"))
        memo = self.memo.setdefault(key, {})
        n = len(self.task.eval_docs)
        wanted = sorted(set(samples)) if samples else list(range(min(int(limit) if limit else n, n)))
        missing = [d for d in wanted if d not in memo]
        if missing:
            self.inner(limit=None, samples=missing, rank=rank, world_size=world_size, **kw)
            for inst in self.task.instances:  # with samples, lm-eval numbers docs by position
                memo.setdefault(missing[inst.doc_id], []).append(inst)
        # doc_id as lm-eval's evaluate() reads it: the position among the samples, else the index
        self.task._instances = [
            dataclasses.replace(inst, resps=[], filtered_resps={},
                                metadata=(inst.task_name, j if samples else d, inst.repeats))
            for j, d in enumerate(wanted) for inst in memo[d]]


def _build_filters(name: str, task) -> None:
    """Builds each of the task's filters once, at load: lm-eval keeps them as factories and builds
    them when a model's answers are filtered, so a broken one (a ``regex_pattern`` that does not
    compile) would fail only after a search has started."""
    for ensemble in getattr(task, "_filters", None) or []:
        for make in ensemble.filters:
            try:
                make()
            except Exception as e:  # noqa: BLE001 - a task's filter may raise anything
                what = getattr(getattr(make, "func", None), "__name__", "filter")
                raise ConfigError(f"task {name!r}: its filter {ensemble.name!r} ({what}, "
                                  f"{getattr(make, 'keywords', {})}) cannot be built: {type(e).__name__}: {e}") from None


class LmEvalEvaluator:
    """lm-eval's HF backend over an in-memory model; tasks are loaded once at construction.

    ``split`` selects the dataset split that is scored (the zoo tasks have ``dev`` and ``test``);
    ``None`` keeps each task's own default.
    """

    def __init__(self, tasks: Sequence[str], *, split: str | None = None, batch_size: int = 32,
                 num_fewshot: int | None = None, fewshot_seed: int = 1234,
                 include_paths: Sequence[str | Path] | None = None, log_samples: bool = False,
                 apply_chat_template: bool = False, fewshot_as_multiturn: bool = False,
                 system_instruction: str | None = None, gen_kwargs: dict | None = None):
        if isinstance(batch_size, str) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer (got {batch_size!r}); 'auto' changes padding and scores")
        if not tasks:
            raise ConfigError("no tasks given")
        self.tasks = list(tasks)
        self.split = split
        self.batch_size = batch_size
        self.log_samples = log_samples
        # lm-eval's per-run prompt options (its evaluate() arguments), the same for every call
        self.prompt_options = {"apply_chat_template": apply_chat_template,
                               "fewshot_as_multiturn": fewshot_as_multiturn,
                               "system_instruction": system_instruction}
        if fewshot_as_multiturn and not apply_chat_template:
            raise ConfigError("fewshot_as_multiturn needs apply_chat_template")
        paths = [Path(p) for p in (include_paths if include_paths is not None else default_include_paths())]
        tm = _task_manager(self.tasks, paths)
        self._task_dict = tm.load(self.tasks)
        for name, task in self._task_dict["tasks"].items():
            if split:
                if split not in task.dataset:
                    raise ConfigError(f"task {name!r} has no split {split!r} (it has {', '.join(task.dataset)})")
                # The scored split is read from the config when docs are requested, so this
                # redirects the task to the chosen split.
                task.set_config(key="test_split", value=split)
            if num_fewshot is not None:
                task.set_config(key="num_fewshot", value=num_fewshot)
            if gen_kwargs:  # as lm-eval's --gen_kwargs: updates the task's generation_kwargs
                if task.get_config("output_type") != "generate_until":
                    raise ConfigError(f"task {name!r} is not a generation task: gen_kwargs do not apply")
                task.set_config(key="generation_kwargs", value=dict(gen_kwargs), update=True)
            _build_filters(name, task)
            task.set_fewshot_seed(seed=fewshot_seed)
            task.fewshot_context = _PerDocFewshot(task, fewshot_seed)
            task.build_all_requests = _MemoRequests(task)

    def metric_names(self, task: str) -> list[str]:
        """The metrics a task reports (from its config; no model needed)."""
        t = self._task_dict["tasks"][task]
        return list(t.aggregation())

    def mean_metrics(self, task: str) -> list[str]:
        """The task's metrics that lm-eval aggregates by the plain mean over items (these combine
        exactly across item subsets; others are re-scored on the whole subset)."""
        from lm_eval.api.metrics import mean

        return [m for m, fn in self._task_dict["tasks"][task].aggregation().items() if fn is mean]

    def n_docs(self, task: str) -> int:
        return len(self._task_dict["tasks"][task].eval_docs)

    def task(self, name: str):
        """The loaded lm-eval task object of ``name`` (its config and docs; for the run folder's
        record of what was scored)."""
        return self._task_dict["tasks"][name]

    def evaluate(self, model: torch.nn.Module, tokenizer, *, limit: int | None = None,
                 samples: dict[str, list[int]] | None = None) -> dict[str, TaskResult]:
        """Scores ``model``; ``limit`` takes the first N items of each task, ``samples`` the
        given item indices per task (a seeded subset)."""
        lm = _quiet_hflm()(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size,
                           device=str(model.device))
        was_training = model.training
        model.eval()
        try:
            return self.run(lm, limit=limit, samples=samples)
        finally:
            model.train(was_training)

    def run(self, lm, *, limit: int | None = None, samples: dict[str, list[int]] | None = None
            ) -> dict[str, TaskResult]:
        """lm-eval's evaluation of the loaded tasks on ``lm`` (an lm-eval LM of any backend)."""
        from lm_eval.evaluator import evaluate as lm_evaluate

        out = lm_evaluate(lm, self._task_dict, limit=limit, samples=samples, bootstrap_iters=0, cache_requests=False,
                          log_samples=self.log_samples, verbosity="WARNING", **self.prompt_options)
        results = {}
        for name in self._task_dict["tasks"]:
            raw = out["results"][name]
            n = out.get("n-samples", {}).get(name, {}).get("effective", -1)
            samples = out.get("samples", {}).get(name, []) if self.log_samples else []
            results[name] = TaskResult(name, _metrics(raw), int(n), samples)
        return results


@dataclass(frozen=True)
class Answer:
    """One item's prompt and its reference answer as token ids, split as lm-eval's
    loglikelihood splits them (``_encode_pair``): what a training objective reads (search/refine)."""

    task: str
    doc: int
    context: tuple[int, ...]
    answer: tuple[int, ...]


def answers(evaluator: LmEvalEvaluator, model: torch.nn.Module, tokenizer, samples: dict[str, list[int] | None]
            ) -> list[Answer]:
    """The items' prompts (the task's templates and few-shot examples, as scored) and reference
    answers: a loglikelihood task's continuation, a multiple-choice task's correct choice, a
    generation task's target after its delimiter."""
    lm = _quiet_hflm()(pretrained=model, tokenizer=tokenizer, batch_size=evaluator.batch_size,
                       device=str(model.device))
    if evaluator.prompt_options["apply_chat_template"]:
        raise ConfigError("refine: tasks with a chat template are not supported (their prompts "
                          "are built per model)")
    out = []
    for name, idx in samples.items():
        task = evaluator.task(name)
        docs = list(range(len(task.eval_docs))) if idx is None else sorted(set(idx))
        task.build_all_requests(samples=docs, **evaluator.prompt_options)
        kind = task.get_config("output_type")
        for inst in task.instances:
            doc = docs[inst.doc_id]
            if kind == "loglikelihood":
                context, cont = inst.args[0], inst.args[1]
            elif kind == "multiple_choice":
                target = task.doc_to_target(inst.doc)
                choices = task.doc_to_choice(inst.doc)
                right = target if isinstance(target, int) else choices.index(target)
                if inst.idx != right:
                    continue
                context, cont = inst.args[0], inst.args[1]
            elif kind == "generate_until":
                target = task.doc_to_target(inst.doc)
                target = target[0] if isinstance(target, list) else target
                context, cont = inst.args[0], task.config.target_delimiter + str(target)
            else:
                raise ConfigError(f"refine: task {name!r} has output type {kind!r}: no answer to train on")
            ctx, ans = lm._encode_pair(context, cont)
            out.append(Answer(name, doc, tuple(ctx), tuple(ans)))
    return out


def evaluate_model_dir(model_dir: str | Path, tasks: Sequence[str], *, split: str | None = None,
                       limit: int | None = None, batch_size: int = 32, device: str = "cpu",
                       dtype: str = "float32", allow_pickle: bool = False,
                       trust_remote_code: bool = False) -> dict[str, TaskResult]:
    """``evomerge eval``: loads a model folder and scores it with the same evaluator as in memory
    (the vllm backend: evaluation/backends.py ``evaluate_folder``)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer (got {limit!r})")
    check_model_dir(model_dir, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)  # fails before tasks load
    evaluator = LmEvalEvaluator(tasks, split=split, batch_size=batch_size)  # unknown tasks fail first
    tok = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    model = load_causal_lm(model_dir, device=device, dtype=dtype, allow_pickle=allow_pickle,
                           trust_remote_code=trust_remote_code)
    return evaluator.evaluate(model, tok, limit=limit)
