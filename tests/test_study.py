"""The run log's mirrors: the Optuna study (optuna.db, PostgreSQL), MLflow, optuna-dashboard in a browser.

One short search on the zoo, killed three times and resumed (the kill/resume helpers of
test_search and test_dataflow_search), is shared by the tests that read its mirrors.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cli_process
import numpy as np
import pytest
import yaml
from test_dataflow_search import kill_when, lines
from test_search import cli, small_config, write_config

from evomerge.core.errors import ConfigError
from evomerge.runs import mirror
from evomerge.runs.folder import LOG, RunFolder
from evomerge.runs.start import with_mirror_settings
from evomerge.runs.study import KEY_ATTR, StudyMirror, StudyTarget, make_trial, settled, sync_study
from evomerge.search import ranking
from evomerge.search.config import SearchConfig
from evomerge.search.records import CandidateRef, EvalRecord, GenerationRecord

ENV = dict(os.environ, PYTHONUNBUFFERED="1")


def evomerge(*args: str, timeout=300) -> subprocess.CompletedProcess:
    return cli_process.run(*args, env=ENV, timeout=timeout)


def base(**over) -> dict:
    cfg = {"models": ["zoo/a"], "search_space": "ps_task_arithmetic", "budget": {"generations": 1},
           "tasks": [{"name": "zoo_add", "metric": "acc", "limit": 5}]}
    cfg.update(over)
    return cfg


@pytest.mark.parametrize("over, message", [
    ({"study": {"storage": "not a url"}}, "study.storage: 'not a url' is not a SQLAlchemy URL"),
    ({"study": {"path": "x.db"}}, "study.path"),
    ({"tracking": "wandb"}, "unknown tracker 'wandb'; the one supported is mlflow"),
    ({"tracking": {"mlflow": {"url": "x"}}}, "tracking.mlflow.url"),
])
def test_a_wrong_study_or_tracking_setting_is_refused_by_name(over, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        SearchConfig.from_dict(base(**over))


@pytest.mark.parametrize("over, missing, message", [
    ({"study": {"storage": "mysql+pymysql://me:secret@db/evomerge"}}, None, "No module named 'pymysql'"),
    ({"study": {"storage": "nosuchdb://me@db/evomerge"}}, None, "Can't load plugin: sqlalchemy.dialects:nosuchdb"),
    ({"tracking": "mlflow"}, "mlflow", "tracking: mlflow needs MLflow, which is not installed"),
])
def test_a_mirror_without_its_library_fails_before_the_run_folder_exists(tmp_path, monkeypatch, over, missing,
                                                                          message):
    from evomerge.runs.start import run_search

    if missing:
        monkeypatch.setitem(sys.modules, missing, None)  # as if not installed
    cfg = SearchConfig.from_dict(base(**over))
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        run_search(cfg, run_dir=tmp_path / "run", quiet=True)
    assert "secret" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_the_mirrors_settings_are_not_part_of_the_search():
    plain = SearchConfig.from_dict(base())
    moved = SearchConfig.from_dict(base(study={"storage": "sqlite:///elsewhere.db"}, tracking="mlflow"))
    assert plain.study is not None and plain.tracking.mlflow is None  # the study is on by default
    assert moved.tracking.mlflow.experiment == "evomerge"
    assert SearchConfig.from_dict(base(study=False)).study is None
    assert plain.search_key() == moved.search_key()  # a resume may move them


def _record(g: int, i: int, fitness: float, stage=None, items=5, status="ok", metrics=None) -> EvalRecord:
    return EvalRecord("candidate", g, i, [0.5, 0.5], f"h{g}{i}", "k", fitness, status, None if status == "ok" else "oom",
                      metrics or {"zoo_add": {"acc": fitness}}, {"zoo_add": items}, {"zoo_add": items}, None,
                      {"eval_s": 0.1}, None, time.time(), stage=stage, stages=None if stage is None else 2)


def test_racing_trials_are_settled_at_their_last_stage_or_generation_end():
    cfg = SearchConfig.from_dict(base(tasks=[{"name": "zoo_add", "metric": "acc"}], racing={"stages": [5, 20]}))
    out, promoted = _record(0, 0, 0.2, stage=0), [_record(0, 1, 0.6, stage=0), _record(0, 1, 0.5, stage=1, items=20)]
    failed = _record(0, 2, -1.0, stage=0, status="failed")
    assert set(settled([out, failed, promoted[0]])) == set()  # the race may still promote them
    assert set(settled([out, *promoted])) == {"g0/c1"}  # its last stage: settled
    gen = GenerationRecord(0, 3, 3, CandidateRef(0, 1, 0.5), 0.2, 0.5, 30, time.time())
    trials = {k: make_trial(recs, cfg, []) for k, recs in settled([out, failed, *promoted, gen]).items()}
    assert {k: t.state.name for k, t in trials.items()} == {"g0/c0": "PRUNED", "g0/c1": "COMPLETE", "g0/c2": "FAIL"}
    assert trials["g0/c1"].value == 0.5 and trials["g0/c1"].intermediate_values == {5: 0.6, 20: 0.5}
    assert trials["g0/c0"].intermediate_values == {5: 0.2} and trials["g0/c2"].user_attrs["reason"] == "oom"


def test_nsga2_trials_hold_one_value_per_task():
    tasks = [{"name": t, "metric": "acc", "limit": 5} for t in ("zoo_add", "zoo_rev")]
    cfg = SearchConfig.from_dict(base(tasks=tasks, optimizer={"name": "nsga2", "popsize": 4}))
    rec = _record(0, 0, 0.4, metrics={"zoo_add": {"acc": 0.7}, "zoo_rev": {"acc": 0.1}})
    trial = make_trial(settled([rec])["g0/c0"], cfg, [])
    assert trial.values == [0.7, 0.1] and trial.user_attrs["fitness"] == 0.4


def test_a_storage_that_is_down_is_reported_once_and_retried(tmp_path, monkeypatch):
    monkeypatch.setattr(mirror, "RETRY_S", (0.05,))
    cfg = SearchConfig.from_dict(base())
    missing = tmp_path / "not-yet"  # SQLite cannot open a file in a folder that does not exist
    target = StudyTarget(f"sqlite:///{missing / 'study.db'}", "s", "run-1")
    said: list[str] = []
    m = StudyMirror(tmp_path, cfg, target, said.append)
    m.start(1, 2, [])
    m.logged(_record(0, 0, 0.25))
    m.logged(_record(0, 1, 0.5))
    deadline = time.monotonic() + 60
    while m.failures < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert m.failures >= 3 and len(said) == 1 and "cannot write" in said[0]  # told once, tried again
    missing.mkdir()  # the storage is back
    while m.behind and time.monotonic() < deadline:
        time.sleep(0.02)
    m.close()
    import optuna

    trials = optuna.load_study(study_name="s", storage=target.storage).get_trials()
    assert sorted((t.user_attrs[KEY_ATTR], t.value) for t in trials) == [("g0/c0", 0.25), ("g0/c1", 0.5)]
    assert len(said) == 2 and "up to date" in said[1]


# ------------------------------------------------------------------ a search, killed three times


@pytest.fixture(scope="module")
def killed_run(zoo_dir, tmp_path_factory):
    """A search with the study and MLflow on, SIGKILLed three times at random points and resumed."""
    tmp = tmp_path_factory.mktemp("study")
    tasks = [{"name": t, "metric": "acc", "weight": 1 / 3, "limit": 8} for t in ("zoo_add", "zoo_rev", "zoo_sub")]
    cfg = write_config(tmp, small_config(zoo_dir, tasks=tasks, budget={"generations": 2}, rescore_top_k=1,
                                         tracking="mlflow"))
    run_dir = tmp / "run"
    rng = np.random.default_rng(7)
    # header, reference, 8 candidates, 2 generation records: kill after 3..11 lines
    for k, target in enumerate(sorted(rng.choice(np.arange(3, 12), size=3, replace=False))):
        p = cli(str(cfg), "--run-dir", str(run_dir)) if k == 0 else cli("--resume", str(run_dir))
        kill_when(p, lambda t=target: lines(run_dir / LOG) >= t, rng)
        assert p.returncode < 0, p.communicate()[0]  # killed mid-run
    p = cli("--resume", str(run_dir))
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    return run_dir


def _candidates(run_dir: Path) -> list[EvalRecord]:
    return [r for r in RunFolder.open(run_dir).records() if r.type == "candidate"]


def _trials(storage: str, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=storage).get_trials()


def _same_trials(trials, cands) -> None:
    keys = [t.user_attrs[KEY_ATTR] for t in trials]
    assert len(keys) == len(set(keys)) == len(cands) == 8  # no duplicate, no gap
    assert all(t.state.name == "COMPLETE" for t in trials)
    got = {t.user_attrs[KEY_ATTR]: (t.value, t.user_attrs["zoo_rev:acc"]) for t in trials}
    assert got == {f"g{r.generation}/c{r.index}": (r.fitness, r.metrics["zoo_rev"]["acc"]) for r in cands}


@pytest.mark.slow
def test_the_study_holds_one_trial_per_candidate_after_three_kills(killed_run):
    trials = _trials(f"sqlite:///{killed_run / 'optuna.db'}", "run")
    cands = _candidates(killed_run)
    _same_trials(trials, cands)
    names = set(trials[0].params)
    assert "spec_add.weight[layers 0-1]" in names and len(names) == len(cands[0].genome)
    final = RunFolder.open(killed_run).records()[-1]
    import optuna

    study = optuna.load_study(study_name="run", storage=f"sqlite:///{killed_run / 'optuna.db'}")
    assert study.user_attrs["winner"]["fitness"] == final.fitness
    assert study.best_value == ranking.best_of(cands).fitness


@pytest.mark.slow
def test_mlflow_has_one_run_with_every_candidate(killed_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{killed_run / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("evomerge").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == json.loads((killed_run / "mlflow.json").read_text())["run_id"]
    assert runs[0].info.status == "FINISHED"
    history = client.get_metric_history(runs[0].info.run_id, "fitness")
    cands = _candidates(killed_run)
    assert sorted((m.step, m.value) for m in history) == sorted((r.generation * 4 + r.index, r.fitness) for r in cands)
    assert {a.path for a in client.list_artifacts(runs[0].info.run_id)} >= {"best.yaml", "best.mergekit.yaml",
                                                                          "fitness.png"}
    assert runs[0].data.params["optimizer.name"] == "cma"


@pytest.mark.slow
def test_study_sync_rebuilds_a_missing_study_once(killed_run, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(killed_run, run_dir)
    (run_dir / "optuna.db").unlink()
    r = evomerge("study", "sync", str(run_dir))
    assert r.returncode == 0 and "8 trials added, 8 in all" in r.stdout, r.stderr
    assert sync_study(run_dir) == (0, 8)  # again: nothing to add
    _same_trials(_trials(f"sqlite:///{run_dir / 'optuna.db'}", "run"), _candidates(run_dir))


# ------------------------------------------------------------------ PostgreSQL


def _pg_bin(name: str) -> str | None:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(found[-1]) if found else shutil.which(name)


@pytest.fixture
def postgres():
    """A throwaway PostgreSQL server (Debian's package) on a unix socket in a temporary folder, run
    as the postgres user when the tests run as root (PostgreSQL refuses root)."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL is not installed (make install puts Debian's postgresql package in)")
    folder = Path(tempfile.mkdtemp(prefix="evomerge-pg-", dir="/tmp"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        import pwd

        pw = pwd.getpwnam("postgres")
        os.chown(folder, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data = folder / "data"
    subprocess.run([*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"], check=True,
                   capture_output=True)
    opts = f"-k {folder} -c listen_addresses='' -c fsync=off"
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-o", opts, "-l", str(folder / "log"), "-w", "start"],
                   check=True, capture_output=True)
    try:
        import psycopg

        with psycopg.connect(host=str(folder), user="postgres", dbname="postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE evomerge")
        yield f"postgresql+psycopg://postgres@/evomerge?host={folder}"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_a_postgresql_url_holds_the_study(killed_run, postgres):
    assert sync_study(killed_run, postgres) == (8, 8)  # (added, in all)
    _same_trials(_trials(postgres, "run"), _candidates(killed_run))
    assert sync_study(killed_run, postgres) == (0, 8)


def test_a_storage_from_the_command_line_is_frozen_with_the_run():
    cfg = SearchConfig.from_dict(base(study={"name": "mine"}))
    moved = with_mirror_settings(cfg, None, "postgresql+psycopg://me@/evomerge?host=/tmp")
    assert moved.study.storage == "postgresql+psycopg://me@/evomerge?host=/tmp" and moved.study.name == "mine"
    assert SearchConfig.from_dict(yaml.safe_load(moved.to_yaml())).study == moved.study  # as config.yaml keeps it
    r = evomerge("search", "--resume", "nowhere", "--study-storage", "not a url")
    assert r.returncode == 2 and "not a SQLAlchemy URL" in r.stderr


# ------------------------------------------------------------------ optuna-dashboard in Chromium


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chromium():
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("Debian's chromium and chromium-driver are not installed (make install puts them in)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              f"--user-data-dir={tempfile.mkdtemp(prefix='evomerge-chromium-')}", "--window-size=1280,900"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)


def _text_when(driver, pattern: str, timeout=60) -> re.Match:
    from selenium.webdriver.support.ui import WebDriverWait

    found: list[re.Match] = []

    def seen(d):
        m = re.search(pattern, d.find_element("tag name", "body").text)
        found.extend([m] if m else [])
        return bool(m)

    WebDriverWait(driver, timeout, poll_frequency=0.2).until(seen)
    return found[-1]


@pytest.mark.slow
def test_the_dashboard_shows_the_run_logs_trials_and_best(killed_run, tmp_path):
    import optuna

    port = _free_port()
    dash = subprocess.Popen([sys.executable, "-m", "evomerge.cli", "dashboard", str(killed_run), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    out: list[str] = []
    threading.Thread(target=lambda: out.extend(dash.stdout), daemon=True).start()
    driver = None
    try:
        deadline = time.monotonic() + 120
        while not any("Listening on" in line for line in out):
            assert dash.poll() is None and time.monotonic() < deadline, "".join(out)
            time.sleep(0.1)
        assert any(f"http://127.0.0.1:{port}/" in line for line in out)  # bound to localhost by default
        storage = optuna.storages.RDBStorage(f"sqlite:///{killed_run / 'optuna.db'}")
        study_id = storage.get_study_id_from_name("run")
        driver = _chromium()
        driver.get(f"http://127.0.0.1:{port}/dashboard/studies/{study_id}")
        best = float(_text_when(driver, r"Best Trial \(number=\d+\)\s+([-0-9.e]+)").group(1))
        driver.save_screenshot(str(tmp_path / "dashboard.png"))
        driver.get(f"http://127.0.0.1:{port}/dashboard/studies/{study_id}/trials")
        shown = int(_text_when(driver, r"(\d+) Trials\s+Trial \d+").group(1))  # the list has loaded
    finally:
        if driver is not None:
            driver.quit()
        dash.terminate()
        dash.wait(30)
    cands = _candidates(killed_run)
    assert shown == len(cands) == 8
    assert best == ranking.best_of(cands).fitness
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
