"""Starting and resuming a search in a run folder: an executor chosen (execution/registry.py), the
search planned (``plan_search``: the config, or on resume the run folder's frozen one, checked in
one step before anything is written), the run folder created or opened, and `search.loop.Search` run.

``run_search`` is what ``evomerge search`` calls; scripts and tests call it too.
"""

from __future__ import annotations

import importlib.util
import signal
from dataclasses import dataclass
from pathlib import Path

import torch

from evomerge.core.errors import ConfigError
from evomerge.evaluation.floors import measure_base_scores
from evomerge.evaluation.items import per_item_means
from evomerge.execution.registry import default_builder, make_executor_factory
from evomerge.runs.folder import RunFolder
from evomerge.runs.frozen import (
    check_tasks_unchanged,
    load_frozen,
    record_tasks,
    tasks_recorded,
    with_inline_space,
)
from evomerge.runs.migrate import migrated
from evomerge.runs.mirror import LogMirror, Observers, local_store_problem
from evomerge.runs.progress import Display
from evomerge.runs.source_hashes import check_sources_unchanged, record_sources
from evomerge.runs.study import StudyMirror, shown, study_target
from evomerge.runs.tracking import MlflowMirror
from evomerge.search import optimizers
from evomerge.search.config import SearchConfig, StudyConfig, default_run_dir
from evomerge.search.irt_fitness import check_anchors
from evomerge.search.jobs import ExecutorFactory
from evomerge.search.loop import Search, SearchOutcome
from evomerge.search.memory_plan import with_frozen_plan, with_memory_plan
from evomerge.search.steady import check_per_item
from evomerge.search.validation import check_sources, check_tasks


def _diff_keys(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if a == b else [prefix]


def validate(cfg: SearchConfig):
    """Every check that needs no weights: sources' configs, tasks and metrics, codec sizes."""
    check_sources(cfg)
    return check_evaluation(cfg)


def check_evaluation(cfg: SearchConfig):
    """The tasks and metrics, the IRT anchors and what the optimizer needs of them; the evaluators."""
    evaluators = check_tasks(cfg)
    check_anchors(cfg, evaluators)
    check_per_item(optimizers.kind(cfg.optimizer.name), per_item_means(cfg.tasks, evaluators))
    return evaluators


def mirrors_for(cfg: SearchConfig, run: RunFolder, report) -> list[LogMirror]:
    """The mirrors a search config asks for: the Optuna study (on unless ``study: null``), MLflow."""
    out: list[LogMirror] = []
    target = study_target(run.path, cfg)
    if target is not None:
        out.append(StudyMirror(run.path, cfg, target, report, run.records))
    if cfg.tracking.mlflow is not None:
        out.append(MlflowMirror(run.path, cfg, report, run.records))
    return out


def with_mirror_settings(frozen: SearchConfig, given: SearchConfig | None,
                         study_storage: str | None = None) -> SearchConfig:
    """The frozen config with the mirrors' settings of ``given`` (the config of a resume, which may
    move them: they copy the log, they do not define the search) and ``--study-storage``."""
    update = {}
    if given is not None:
        update = {"study": given.study, "tracking": given.tracking}
    if study_storage is not None:
        study = update.get("study", frozen.study)
        update["study"] = StudyConfig(storage=study_storage, name=study.name if study else None)
    return frozen.model_copy(update=update) if update else frozen


def check_mirrors(cfg: SearchConfig) -> None:
    """The mirrors' libraries, checked before anything is written: a config that asks for MLflow,
    or for a database whose driver is missing, fails now, not later in the mirror's thread (which
    reports a storage error and retries, as it must for a database that is only down)."""
    if cfg.tracking.mlflow is not None and _missing("mlflow"):
        raise ConfigError("tracking: mlflow needs MLflow, which is not installed: "
                          "pip install 'evomerge[tracking]' (or turn tracking off)")
    if cfg.tracking.mlflow is not None and cfg.tracking.mlflow.uri:  # one that can never work
        from evomerge.runs.tracking import tracking_uri_problem

        if problem := tracking_uri_problem(cfg.tracking.mlflow.uri):
            raise ConfigError(f"tracking.mlflow.uri: {problem}")
    if cfg.study is not None and cfg.study.storage and (problem := local_store_problem(cfg.study.storage)):
        raise ConfigError(f"study.storage (--study-storage) {shown(cfg.study.storage)}: {problem}")
    if cfg.study is not None and cfg.study.storage:
        from sqlalchemy.engine import make_url

        try:
            make_url(cfg.study.storage).get_dialect().import_dbapi()
        except Exception as e:  # sqlalchemy's NoSuchModuleError, or the driver's ImportError
            raise ConfigError(f"the study storage {shown(cfg.study.storage)} cannot be used: {e} "
                              "(PostgreSQL's driver: pip install 'evomerge[tracking]')") from None


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ValueError:  # in sys.modules as None: imports of it fail
        return True


def with_base_scores(cfg: SearchConfig, evaluators) -> SearchConfig:
    """The config with its floors' base scores measured (the base model on each task's split)."""
    if cfg.floors is None or not cfg.floors.needs_base_scores():
        return cfg
    scores = measure_base_scores(cfg.base_model or cfg.models[0], cfg.tasks, evaluators,
                                 device=cfg.device, dtype=cfg.dtype, allow_pickle=cfg.allow_pickle,
                                 trust_remote_code=cfg.trust_remote_code)
    floors = cfg.floors.model_copy(update={"base_scores": scores})
    try:
        floors.check_base_scores(cfg.tasks)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return cfg.model_copy(update={"floors": floors})


def with_frozen_base_scores(cfg: SearchConfig | None, frozen: SearchConfig) -> SearchConfig | None:
    """A resume's config with the base scores its run measured when it started."""
    if cfg is None or cfg.floors is None or frozen.floors is None or not cfg.floors.needs_base_scores():
        return cfg
    return cfg.model_copy(update={"floors": cfg.floors.model_copy(
        update={"base_scores": frozen.floors.base_scores})})


@dataclass(frozen=True)
class SearchPlan:
    """A search, checked and resolved in one step before its run folder is written (new) or touched
    (resumed): the config as it is frozen (the space inline, the floors' base scores measured,
    background work decided, the mirrors' settings; on resume, the frozen one with the budget,
    threads and mirrors given) with the task evaluators, and where its run folder is."""

    cfg: SearchConfig
    evaluators: dict
    run_dir: Path
    resume: bool = False
    rewrite_config: bool = False  # resume: config.yaml changes (budget, threads, mirrors, an older format)
    record_tasks: bool = True  # tasks.json is written (a new run, or a run folder from before it)


def plan_search(cfg: SearchConfig | None, *, run_dir: str | Path | None = None, config_path: str | None = None,
                study_storage: str | None = None, executor: ExecutorFactory, resume: bool = False) -> SearchPlan:
    """Every check of a search that needs no write (a bad config leaves nothing behind, a bad
    resume leaves its run folder as it was): the mirrors, the executor's own (Ray: its address and
    CPUs), the sources, tasks and IRT anchors; on resume also the frozen config against ``cfg``
    and the tasks and sources against those the search started with."""
    if resume:
        return _plan_resume(cfg, run_dir, study_storage, executor)
    if cfg is None:
        raise ConfigError("a config is needed to start a search")
    cfg, evaluators = _checked(with_mirror_settings(cfg, None, study_storage), executor)
    cfg = with_base_scores(cfg, evaluators)  # floors at the base's scores: measured once, frozen
    if cfg.background is None:  # decided once, frozen with the run: on with Ray workers
        cfg = cfg.model_copy(update={"background": executor.uses_ray})
    cfg = with_inline_space(cfg)  # the run folder is self-contained: see runs/frozen.py
    return SearchPlan(cfg, evaluators, Path(run_dir or cfg.run_dir or default_run_dir(config_path)))


def _checked(cfg: SearchConfig, executor: ExecutorFactory) -> tuple[SearchConfig, dict]:
    """The checks of every plan, new or resumed; returns the config with its memory plan (dtype and
    placement auto: decided by the sources' headers, then frozen with the run) and the evaluators."""
    check_mirrors(cfg)
    executor.check(cfg)
    check_sources(cfg)  # the memory plan reads the sources' headers: their own errors first
    cfg = with_memory_plan(cfg)
    return cfg, check_evaluation(cfg)


def _plan_resume(cfg: SearchConfig | None, run_dir, study_storage: str | None,
                 executor: ExecutorFactory) -> SearchPlan:
    if run_dir is None:
        raise ConfigError("--resume needs the run folder")
    run = RunFolder.open(run_dir)
    frozen, rewrite = migrated(load_frozen(run))  # earlier run-folder formats (runs/migrate.py)
    resumed = resumed_config(frozen, cfg, run, study_storage)
    resumed, evaluators = _checked(resumed, executor)
    check_tasks_unchanged(run, evaluators)
    check_sources_unchanged(run.path, resumed, "resume")
    return SearchPlan(resumed, evaluators, run.path, resume=True, rewrite_config=rewrite or resumed != frozen,
                      record_tasks=not tasks_recorded(run))


def resumed_config(frozen: SearchConfig, cfg: SearchConfig | None, run: RunFolder,
                   study_storage: str | None) -> SearchConfig:
    """The frozen config of a resumed search, with what ``cfg`` (the resume's config, if any) may
    change: the budget, threads and the mirrors' settings; any other difference is refused."""
    if cfg is not None and cfg.background is None:
        cfg = cfg.model_copy(update={"background": frozen.background})
    cfg = with_frozen_plan(with_frozen_base_scores(cfg, frozen), frozen)
    if cfg is not None:
        diff = _diff_keys(frozen.search_key(), cfg.search_key())
        if diff:
            if not run.records():
                what = (f"it has no evaluations yet, so `evomerge search CONFIG --run-dir {run.path}` (without "
                        "--resume) starts it over with this config")
            else:
                what = (f"to search with this config, choose another run_dir (--run-dir), or delete {run.path} "
                        "to start over")
            raise ConfigError(f"the config differs from the run's frozen config in {', '.join(diff)}; "
                              f"only the budget (and threads) may change on resume: {what}")
        if (cfg.budget, cfg.threads) != (frozen.budget, frozen.threads):
            frozen = frozen.model_copy(update={"budget": cfg.budget, "threads": cfg.threads})
    return with_mirror_settings(frozen, cfg, study_storage)


def run_search(cfg: SearchConfig | None, *, run_dir: str | Path | None = None, resume: bool = False,
               quiet: bool = False, builder_factory=default_builder, config_path: str | None = None,
               workers: int | str | None = None, ray_address: str | None = None, sources: str = "path",
               executor: str | None = None, executor_factory: ExecutorFactory | None = None,
               study_storage: str | None = None) -> SearchOutcome:
    """``evomerge search``: a new search, or ``resume=True`` to continue the one in ``run_dir``.
    ``executor`` (a name of execution/registry.py), ``workers``/``ray_address``: score on Ray
    workers (evomerge.execution.ray); default in-process. ``executor_factory``: an executor
    factory of one's own (tests, scripts). ``study_storage``: the Optuna study's storage URL
    (runs/study.py), frozen with the run."""
    factory = executor_factory or make_executor_factory(workers, ray_address, executor=executor, sources=sources,
                                                        builder_factory=builder_factory)
    plan = plan_search(cfg, run_dir=run_dir, config_path=config_path, study_storage=study_storage,
                       executor=factory, resume=resume)
    cfg, evaluators = plan.cfg, plan.evaluators
    if plan.resume:
        run = RunFolder.open(plan.run_dir)
        run.acquire()
    else:
        run = RunFolder.create(plan.run_dir, cfg.to_yaml())
    try:
        if plan.rewrite_config:
            run.write_text("config.yaml", cfg.to_yaml())
        if plan.record_tasks:
            record_tasks(run, evaluators)
        if not plan.resume:
            record_sources(run, cfg)
    except BaseException:
        run.close()
        raise
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    display = Display(quiet=quiet, tasks=[t.name for t in cfg.tasks])
    # the Optuna study and MLflow: copies of the log, written off the search's thread (runs/mirror.py)
    mirrors = mirrors_for(cfg, run, display.message)
    search = Search(cfg, run, Observers(display, *mirrors), factory)

    def _on_signal(signum, frame):
        search.stop_signal = signum  # the search stops at its next record (SearchStopped)

    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return search.run_loop(evaluators)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for m in mirrors:
            m.close()
        display.close()
        run.close()
