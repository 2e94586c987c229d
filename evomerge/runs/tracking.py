"""MLflow tracking of a search (``tracking: mlflow`` or ``{mlflow: {uri, experiment}}``): one MLflow run per search.

    RUN_DIR/mlflow.db       the default tracking store (SQLite: works offline)
    RUN_DIR/mlartifacts/    its artifacts
    RUN_DIR/mlflow.json     the MLflow run's id: a resumed search logs on into the same MLflow run

Params: the settings that define the search (flattened; the budget, which may grow, is a tag).
Metrics: each settled candidate's fitness and per-task metrics at step = its number in the search
(generation x popsize + index); each generation's best, median and max at step = generation; the
re-scores; at the end the winner's full-dev and test-split metrics. Artifacts at the end: best.yaml,
best.mergekit.yaml, fitness.png (and pareto.png for NSGA-II). Like the study (runs/study.py), a sync
logs only the steps the MLflow run lacks, so a kill, a resume or a server that was down leaves no
gap and no duplicate.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

from evomerge.core.io import atomic_write_text
from evomerge.runs.mirror import LogMirror, local_store_problem, new_sqlite
from evomerge.runs.study import settled
from evomerge.search.config import MlflowConfig, SearchConfig
from evomerge.search.records import Record, RecordKind

RUN_FILE, DB, ARTIFACTS = "mlflow.json", "mlflow.db", "mlartifacts"
FINAL_TAG, KEY_TAG = "evomerge.final_logged", "evomerge.run_key"


def tracking_uri(run_dir: Path, mc: MlflowConfig) -> str:
    return mc.uri or f"sqlite:///{(Path(run_dir) / DB).resolve()}"


def tracking_uri_problem(uri: str) -> str | None:
    """Why MLflow can never log to ``uri``, or None: a scheme it has no store for (MLflow's own
    registry of tracking stores, plugins included), or a local store under a file."""
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    try:
        _tracking_store_registry.get_store_builder(uri)
    except Exception:  # noqa: BLE001 - MLflow's UnsupportedModelRegistryStoreURIException and kin
        schemes = ", ".join(sorted(s for s in _tracking_store_registry._registry if s))
        return f"MLflow has no tracking store for {uri!r} (schemes: {schemes}, or a local path)"
    return local_store_problem(uri)


def flat_params(cfg: SearchConfig) -> dict[str, str]:
    """The search's defining settings as MLflow params: nested keys joined with dots, lists as JSON."""
    out: dict[str, str] = {}

    def walk(prefix: str, v) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), x)
        else:
            out[prefix] = (json.dumps(v) if isinstance(v, list) else str(v))[:6000]

    walk("", cfg.search_key())
    return out


def _metric_key(task: str, metric: str) -> str:
    return f"{task}/{metric}".replace(",", "_")


class MlflowMirror(LogMirror):
    name = "MLflow tracking"

    def __init__(self, run_dir: Path, cfg: SearchConfig, report, records=None):
        super().__init__(report, records)
        self.run_dir, self.cfg = Path(run_dir), cfg
        self.uri = tracking_uri(self.run_dir, cfg.tracking.mlflow)
        self.client = None
        self.run_id: str | None = None
        self.steps: dict[str, set[int]] = {}
        self.final_logged = False

    def _open(self, records: list[Record]) -> None:
        if self.uri.startswith("file:") or "://" not in self.uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # the user asked for a file store
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        for name in ("mlflow", "alembic"):  # after the import, which sets mlflow's own levels
            logging.getLogger(name).setLevel(logging.WARNING)

        def create_store(url: str) -> None:
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            SqlAlchemyStore(url, self._artifacts()).engine.dispose()

        new_sqlite(self.uri, create_store)
        client = MlflowClient(tracking_uri=self.uri)
        # The run's key is saved before the run is created, so that a kill in between finds the run
        # by its tag at the next start instead of making a second one.
        p = self.run_dir / RUN_FILE
        saved = json.loads(p.read_text()) if p.is_file() else {}
        if not saved.get("run_key"):
            saved = {**saved, "run_key": uuid.uuid4().hex}
            atomic_write_text(p, json.dumps(saved) + "\n")
        run = None
        if saved.get("run_id"):
            try:
                run = client.get_run(saved["run_id"])
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
        if run is None:  # a new search, a kill before its id was saved, or a store that lost the run
            run = self._find_or_create(client, saved["run_key"])
            saved["run_id"] = run.info.run_id
            atomic_write_text(p, json.dumps(saved) + "\n")
        elif run.info.status != "RUNNING" and run.data.tags.get(FINAL_TAG) is None:
            client.update_run(run.info.run_id, status="RUNNING")  # resumed
        self.client, self.run_id = client, run.info.run_id
        self.final_logged = run.data.tags.get(FINAL_TAG) is not None
        self.steps = {k: {m.step for m in client.get_metric_history(self.run_id, k)}
                      for k in ("fitness", "generation/best", "rescore/fitness")}

    def _artifacts(self) -> str | None:
        """Artifacts of a local SQLite store go beside it (MLflow's default is the working directory)."""
        if self.uri.startswith("sqlite:///"):
            return (Path(self.uri[len("sqlite:///"):]).parent / ARTIFACTS).resolve().as_uri()
        return None

    def _find_or_create(self, client, key: str):
        from mlflow.entities import Param

        mc = self.cfg.tracking.mlflow
        exp = client.get_experiment_by_name(mc.experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(mc.experiment,
                                                                          artifact_location=self._artifacts())
        found = client.search_runs([exp_id], filter_string=f"tags.`{KEY_TAG}` = '{key}'", max_results=1)
        run = found[0] if found else client.create_run(exp_id, run_name=self.run_dir.resolve().name, tags={
            KEY_TAG: key, "evomerge.run_dir": str(self.run_dir.resolve())})
        params = [Param(k, v) for k, v in flat_params(self.cfg).items()]  # the same values again: no change
        for i in range(0, len(params), 100):
            client.log_batch(run.info.run_id, params=params[i:i + 100])
        return run

    def _popsize(self, records: list[Record]) -> int:
        pop = next((r.popsize for r in records if r.type == RecordKind.GENERATION), None) or self.popsize
        return pop or 1 + max((r.index for r in records if r.type == RecordKind.CANDIDATE), default=0)

    def sync(self, records: list[Record]) -> None:
        if not records:
            return
        if self.client is None:
            self._open(records)
        from mlflow.entities import Metric, RunTag

        pop = self._popsize(records)
        metrics: list[Metric] = []

        def add(key: str, value: float, rec, step: int) -> None:
            metrics.append(Metric(key, float(value), int(rec.time * 1000), step))

        for recs in settled(records).values():
            r = recs[-1]
            step = r.generation * pop + r.index
            if step in self.steps["fitness"]:
                continue
            add("fitness", r.fitness, r, step)
            for t, ms in r.metrics.items():
                for m, v in ms.items():
                    add(_metric_key(t, m), v, r, step)
            add("items", sum(r.items.values()), r, step)
            self.steps["fitness"].add(step)
        for r in records:
            if r.type == RecordKind.GENERATION and r.generation not in self.steps["generation/best"]:
                add("generation/best", r.best.fitness, r, r.generation)
                add("generation/median", r.median, r, r.generation)
                add("generation/max", r.max, r, r.generation)
                self.steps["generation/best"].add(r.generation)
            elif r.type == RecordKind.RESCORE and (step := r.generation * pop + r.index) not in self.steps["rescore/fitness"]:
                add("rescore/fitness", r.fitness, r, step)
                self.steps["rescore/fitness"].add(step)
        for i in range(0, len(metrics), 500):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 500])
        final = next((r for r in reversed(records) if r.type == RecordKind.FINAL), None)
        if final is not None and not self.final_logged:
            self._log_final(final, records)
            self.client.log_batch(self.run_id, tags=[RunTag(FINAL_TAG, "1")])
            self.client.set_terminated(self.run_id, "FINISHED")
            self.final_logged = True

    def _log_final(self, final, records: list[Record]) -> None:
        from mlflow.entities import Metric

        from evomerge.runs.status import plot_fitness, plot_pareto, read_status

        t = int(final.time * 1000)
        if self.client.get_metric_history(self.run_id, "winner/fitness"):  # logged before a kill
            ms = []
        else:
            ms = [Metric("winner/fitness", final.fitness, t, 0)]
            ms += [Metric(f"winner/{_metric_key(k, m)}", v, t, 0) for k, d in final.metrics.items() for m, v in d.items()]
            ms += [Metric(f"winner/test/{_metric_key(k, m)}", v, t, 0) for k, d in final.test_metrics.items()
                   for m, v in d.items()]
        self.client.log_batch(self.run_id, metrics=ms)
        st = read_status(self.run_dir)
        files = [self.run_dir / "best.yaml", self.run_dir / "best.mergekit.yaml", plot_fitness(st), plot_pareto(st)]
        for f in files:
            if f is not None and Path(f).is_file():
                self.client.log_artifact(self.run_id, str(f))

    def close(self, timeout: float = 30.0) -> None:
        super().close(timeout)
        if self.client is not None and not self.final_logged:
            try:  # stopped or killed before its end: the resume sets it running again
                self.client.set_terminated(self.run_id, "KILLED")
            except Exception:  # noqa: BLE001
                pass
        self.client = None
