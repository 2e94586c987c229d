"""The Optuna study that mirrors a run log: one trial per candidate, for optuna-dashboard.

    RUN_DIR/optuna.db    the default storage (SQLite); `study.storage` in the config or
                         `--study-storage` on the command line: any SQLAlchemy URL (PostgreSQL)
    RUN_DIR/study.json   the study's name and the run's id (one storage may hold many runs)

A candidate becomes a trial once it is settled (scored, or with racing: at its last stage or at
its generation's end). A trial holds the genome's named parameters with their ranges (so that the
dashboard plots them), the fitness as its value (NSGA-II: one value per task metric, the
optimizer's objectives), and as user attributes the per-task metrics, generation, index, racing
stage, items and recipe hash. With racing, a candidate eliminated before the last stage is PRUNED
and each stage's score is an intermediate value (step: the items it was scored on); a failed
candidate is FAIL. The reference, the re-scores and the winner are user attributes of the study.

Each trial carries its key (``g3/c2``); a sync adds the trials the storage lacks, so rebuilding
is idempotent, and Optuna writes a trial in one transaction, so a kill leaves no half trial.
"""

from __future__ import annotations

import json
import uuid
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from evomerge.core.errors import RunFolderError
from evomerge.core.io import atomic_write_text
from evomerge.runs.mirror import LogMirror, MirrorDisabled, new_sqlite
from evomerge.search.config import SearchConfig
from evomerge.search.records import EvalRecord, FinalRecord, Record, RecordKind

DB, STUDY_FILE = "optuna.db", "study.json"
KEY_ATTR, RUN_ATTR = "evomerge_key", "evomerge_run_id"


def default_storage(run_dir: Path) -> str:
    return f"sqlite:///{(Path(run_dir) / DB).resolve()}"


@dataclass(frozen=True)
class StudyTarget:
    storage: str
    name: str
    run_id: str


def study_target(run_dir: Path, cfg: SearchConfig, storage: str | None = None) -> StudyTarget | None:
    """Where the run's study lives: ``storage`` (the command line), the config's, or optuna.db;
    its name and the run's id from study.json (written at the first sync). None: no study."""
    run_dir = Path(run_dir)
    if cfg.study is None and storage is None:
        return None
    study = cfg.study
    saved = {}
    p = run_dir / STUDY_FILE
    if p.is_file():
        try:
            saved = json.loads(p.read_text())
        except ValueError:
            saved = {}
    name = saved.get("name") or (study.name if study and study.name else run_dir.resolve().name)
    url = storage or (study.storage if study and study.storage else default_storage(run_dir))
    return StudyTarget(url, name, saved.get("run_id") or uuid.uuid4().hex)


@dataclass(frozen=True)
class Param:
    """One named genome parameter: its range, and how a gene's position maps into it."""

    name: str
    low: float
    high: float
    log: bool = False

    def value(self, x: float) -> float:
        x = min(max(float(x), 0.0), 1.0)  # the codecs clip genes into the cube
        v = self.low * (self.high / self.low) ** x if self.log else self.low + x * (self.high - self.low)
        return min(max(v, self.low), self.high)


def genome_params(cfg: SearchConfig) -> list[Param]:
    """The genome's parameters, named after the codec's genes (source model, parameter, layer
    group; data-flow: slots and scales). Reads config.json and tensor names only; when the source
    models cannot be read (a run folder moved elsewhere), the genes' positions x0, x1, ..."""
    from evomerge.search.codecs.parameter import Codec, make_codec

    try:
        codec = make_codec(cfg)
    except Exception:  # noqa: BLE001  (names are a nicety: the positions do)
        return []
    if isinstance(codec, Codec):
        labels = [Path(m).name for m in codec.models]
        if len(set(labels)) < len(labels):
            labels = list(codec.models)
        label = dict(zip(codec.models, labels, strict=True))
        return [Param(f"{label[g.model]}.{g.param}[{g.group}]" if g.model else f"{g.param}[global]",
                      g.low, g.high) for g in codec.genes]
    out = [Param(f"slot {i}: {Path(codec.models[nd.model]).name} layer {nd.layer}", 0.0, 1.0)
           for i, nd in enumerate(codec.slots)]
    s = codec.space.scale
    out += [Param(f"scale {k}", s.low, s.high, log=True) for k in range(codec.n_scale_genes)]
    return out


def _key(r) -> str:
    return f"g{r.generation}/c{r.index}"


def settled(records: list[Record]) -> dict[str, list[EvalRecord]]:
    """Candidates whose trial can be written: their records (racing: one a stage), by key."""
    done_gens = {r.generation for r in records if r.type == RecordKind.GENERATION}
    by_key: dict[str, list[EvalRecord]] = {}
    for r in records:
        if r.type == RecordKind.CANDIDATE:
            by_key.setdefault(_key(r), []).append(r)
    out = {}
    for k, recs in by_key.items():
        recs.sort(key=lambda r: r.depth)
        if recs[-1].last_stage or recs[-1].generation in done_gens:
            out[k] = recs
    return out


def make_trial(recs: list[EvalRecord], cfg: SearchConfig, params: list[Param]):
    """The trial of one settled candidate (its records, stage by stage)."""
    from optuna.distributions import FloatDistribution
    from optuna.trial import FrozenTrial, TrialState

    last = recs[-1]
    multi = cfg.optimizer.multi_objective
    if not last.ok:
        state, values = TrialState.FAIL, None
    elif not last.last_stage:
        state, values = TrialState.PRUNED, None
    elif multi:
        state, values = TrialState.COMPLETE, [last.metric(t.name, t.metric, cfg.penalty_fitness) for t in cfg.tasks]
    else:
        state, values = TrialState.COMPLETE, [last.fitness]
    if params and len(params) == len(last.genome):
        ps = {p.name: p.value(x) for p, x in zip(params, last.genome, strict=True)}
        dists = {p.name: FloatDistribution(p.low, p.high, log=p.log) for p in params}
    else:
        ps = {f"x{i}": min(max(float(x), 0.0), 1.0) for i, x in enumerate(last.genome)}
        dists = {k: FloatDistribution(0.0, 1.0) for k in ps}
    attrs = {KEY_ATTR: _key(last), "generation": last.generation, "index": last.index, "status": last.status,
             "fitness": last.fitness, "recipe_hash": last.recipe_hash, "items": sum(last.items.values())}
    attrs.update({f"{t}:{m}": v for t, ms in last.metrics.items() for m, v in ms.items()})
    if last.reason:
        attrs["reason"] = last.reason
    if last.cached_from:
        attrs["cached_from"] = f"g{last.cached_from[0]}/c{last.cached_from[1]}"
    if last.stage is not None:
        attrs.update(stage=last.stage, stages=last.stages)
    inter = {sum(r.items.values()): r.fitness for r in recs} if last.stage is not None else {}
    first = recs[0]
    begun = first.time - sum(first.timings.values())
    return FrozenTrial(number=0, state=state, value=None, values=values,
                       datetime_start=datetime.fromtimestamp(begun), datetime_complete=datetime.fromtimestamp(last.time),
                       params=ps, distributions=dists, user_attrs=attrs, system_attrs={},
                       intermediate_values=inter, trial_id=0)


def study_attrs(records: list[Record]) -> dict:
    """The study's own user attributes: the starting point, the re-scores and the winner."""
    out = {}
    ref = next((r for r in records if r.type == RecordKind.REFERENCE), None)
    if ref is not None:
        out["reference_fitness"] = ref.fitness
    rescored = {_key(r): r.fitness for r in records if r.type == RecordKind.RESCORE}
    if rescored:
        out["rescored_fitness"] = rescored
    final: FinalRecord | None = next((r for r in reversed(records) if r.type == RecordKind.FINAL), None)
    if final is not None:
        out["winner"] = {"key": _key(final), "fitness": final.fitness, "recipe_hash": final.recipe_hash,
                         "test_metrics": final.test_metrics}
    return out


class StudyMirror(LogMirror):
    """Keeps the run's Optuna study up to date with its log (see the module docstring)."""

    name = "Optuna study"

    def __init__(self, run_dir: Path, cfg: SearchConfig, target: StudyTarget, report, records=None):
        super().__init__(report, records)
        self.run_dir, self.cfg, self.target = Path(run_dir), cfg, target
        self.study = None
        self.written: set[str] = set()
        self.attrs: dict = {}
        self.params: list[Param] | None = None

    def _open(self):
        import optuna
        from optuna.storages import RDBStorage

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        multi = self.cfg.optimizer.multi_objective
        n = len(self.cfg.tasks) if multi else 1
        new_sqlite(self.target.storage, lambda url: RDBStorage(url).engine.dispose())
        storage = RDBStorage(self.target.storage, engine_kwargs={"pool_pre_ping": True})
        study = optuna.create_study(storage=storage, study_name=self.target.name, directions=["maximize"] * n,
                                    load_if_exists=True)
        owner = study.user_attrs.get(RUN_ATTR)
        if owner is not None and owner != self.target.run_id:
            raise MirrorDisabled(f"the storage already holds a study {self.target.name!r} of another run; give this "
                                 "run's study another name (study: {name: ...} in the config)")
        if owner is None:
            if study.trials:
                raise MirrorDisabled(f"the storage already holds a study {self.target.name!r} not written by "
                                     "evomerge; give this run's study another name (study: {name: ...})")
            study.set_user_attr(RUN_ATTR, self.target.run_id)
            study.set_user_attr("run_dir", str(self.run_dir.resolve()))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # set_metric_names is marked experimental
                study.set_metric_names([f"{t.name}:{t.metric}" for t in self.cfg.tasks] if multi else ["fitness"])
        if not (self.run_dir / STUDY_FILE).is_file():
            atomic_write_text(self.run_dir / STUDY_FILE, json.dumps({"name": self.target.name,
                                                                      "run_id": self.target.run_id}) + "\n")
        self.written = {t.user_attrs.get(KEY_ATTR) for t in study.get_trials(deepcopy=False)}
        self.attrs = dict(study.user_attrs)
        return study

    def sync(self, records: list[Record]) -> None:
        if not records:
            return
        if self.study is None:
            self.study = self._open()
        if self.params is None:
            self.params = genome_params(self.cfg)
        todo = {k: recs for k, recs in settled(records).items() if k not in self.written}
        for k in sorted(todo, key=lambda k: (todo[k][0].generation, todo[k][0].index)):
            self.study.add_trial(make_trial(todo[k], self.cfg, self.params))
            self.written.add(k)
        for name, value in study_attrs(records).items():
            if self.attrs.get(name) != value:
                self.study.set_user_attr(name, value)
                self.attrs[name] = value

    def close(self, timeout: float = 30.0) -> None:
        super().close(timeout)
        if not self.writing:  # a writer whose join timed out still syncs through the study
            self.study = None


def shown(url: str) -> str:
    """A storage URL as messages show it: without its password."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return "<storage URL>"


def sync_study(run_dir: str | Path, storage: str | None = None) -> tuple[int, int]:
    """``evomerge study sync``: brings the run's study up to date with its log (taking the run
    folder's lock, so that no search writes it meanwhile). Returns (trials added, trials)."""
    from evomerge.runs.folder import RunFolder
    from evomerge.runs.frozen import load_frozen

    run = RunFolder.open(run_dir)
    cfg = load_frozen(run)
    target = study_target(run.path, cfg, storage)
    if target is None:
        raise RunFolderError(f"{run.path}: its config has `study: null` (no study); give --storage URL to write one")
    run.acquire()
    try:
        mirror = StudyMirror(run.path, cfg, target, report=lambda text: None)
        records = run.records()
        try:
            mirror.study = mirror._open()
            before = len(mirror.written)
            mirror.sync(records)
        except MirrorDisabled as e:
            raise RunFolderError(str(e)) from None
        except Exception as e:  # noqa: BLE001  (the storage's own errors: one line)
            raise RunFolderError(f"study storage {shown(target.storage)}: {type(e).__name__}: "
                                 f"{str(e).splitlines()[0]}") from None
        return len(mirror.written) - before, len(mirror.written)
    finally:
        run.close()
