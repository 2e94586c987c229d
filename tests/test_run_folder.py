"""The run folder: a log torn at any byte reads back as its complete records; one search per folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from evomerge.runs.folder import LOG, RunFolder, RunFolderError, history, parse_log, read_records
from evomerge.search.records import LOG_FORMAT, EvalRecord, FinalRecord, to_json


def cand(g, i, fitness=0.5, **kw) -> EvalRecord:
    base = dict(type="candidate", generation=g, index=i, genome=[0.1 * i, 1 / 3], recipe_hash=f"h{g}-{i}",
                eval_key="k", fitness=fitness, status="ok", reason=None, metrics={"zoo_add": {"acc": 0.25}},
                items={"zoo_add": 8}, items_scored={"zoo_add": 8}, cached_from=None,
                timings={"merge_s": 0.1, "eval_s": 0.2}, worker="local", time=1.5 + i)
    return EvalRecord(**{**base, **kw})


RECORDS = [cand(0, i, 0.5 + i / 7) for i in range(4)]


def test_log_torn_at_every_byte_reads_only_complete_records(tmp_path):
    run = RunFolder.create(tmp_path / "run", "x: 1\n")
    for r in RECORDS:
        run.append(r)
    run.close()
    data = (tmp_path / "run" / LOG).read_bytes()
    ends = [i + 1 for i, b in enumerate(data) if b == ord("\n")]
    assert len(ends) == 1 + len(RECORDS)  # the format header, then one line a record
    for cut in range(len(data) + 1):
        lines, end = read_records(data[:cut])
        n_complete = sum(1 for e in ends if e <= cut)
        assert parse_log(lines) == RECORDS[:max(0, n_complete - 1)], cut
        assert end == (ends[n_complete - 1] if n_complete else 0)


def test_append_after_a_torn_tail_cuts_it_off(tmp_path):
    run = RunFolder.create(tmp_path / "run", "x: 1\n")
    run.append(RECORDS[0])
    run.close()
    with open(tmp_path / "run" / LOG, "ab") as f:
        f.write(b'{"type": "candid')  # a record torn by a kill
    run = RunFolder.open(tmp_path / "run")
    run.acquire()
    run.append(RECORDS[1])
    run.close()
    assert RunFolder.open(tmp_path / "run").records() == RECORDS[:2]


def test_floats_round_trip_bit_for_bit(tmp_path):
    run = RunFolder.create(tmp_path / "run", "x: 1\n")
    genome = [0.1 + 0.2, 1 / 3, 2.0 ** -40, 0.9999999999999999]
    run.append(cand(0, 0, genome=genome, fitness=1 / 3))
    run.close()
    back = RunFolder.open(tmp_path / "run").records()[0]
    assert back.genome == genome and back.fitness == 1 / 3


def test_records_are_typed_and_their_json_is_the_first_format(tmp_path):
    """Each record type reads back as itself; the JSON keys are those of format 1 (no header)."""
    final = FinalRecord(generations=1, evaluations=4, generation=0, index=3, recipe_hash="h0-3", fitness=0.9,
                        metrics={"zoo_add": {"acc": 0.9}}, test_metrics={"zoo_add": {"acc": 0.8}}, time=9.0)
    old_log = "".join(json.dumps(to_json(r)) + "\n" for r in [*RECORDS, final])
    assert '"stage"' not in old_log and '"elapsed_s"' not in old_log  # optional fields left out when None
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.yaml").write_text("x: 1\n")
    (tmp_path / "old" / LOG).write_text(old_log)
    records = RunFolder.open(tmp_path / "old").records()
    assert records == [*RECORDS, final]
    assert isinstance(records[-1], FinalRecord) and records[-1].test_metrics["zoo_add"]["acc"] == 0.8


def test_a_log_from_a_newer_format_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("x: 1\n")
    header = {"type": "header", "format": LOG_FORMAT + 1, "evomerge": "9.0"}
    (tmp_path / "run" / LOG).write_text(json.dumps(header) + "\n" + json.dumps(to_json(RECORDS[0])) + "\n")
    with pytest.raises(RunFolderError, match="upgrade evomerge"):
        RunFolder.open(tmp_path / "run").records()


def test_a_record_missing_a_field_is_refused_with_what_to_do(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("x: 1\n")
    old = {k: v for k, v in to_json(RECORDS[0]).items() if k != "eval_key"}
    (tmp_path / "run" / LOG).write_text(json.dumps(old) + "\n")
    with pytest.raises(RunFolderError, match="lacks eval_key: .* start a new one"):
        RunFolder.open(tmp_path / "run").records()


def test_a_record_with_a_nan_is_refused_before_it_is_written(tmp_path):
    run = RunFolder.create(tmp_path / "run", "x: 1\n")
    run.append(RECORDS[0])
    with pytest.raises(ValueError):
        run.append(cand(0, 1, metrics={"zoo_add": {"ppl": float("nan")}}))
    run.close()
    assert RunFolder.open(tmp_path / "run").records() == RECORDS[:1]


def test_history_drops_volatile_fields():
    a = [replace(r, time=1.0, worker="w1") for r in RECORDS]
    b = [replace(r, time=2.0, worker="w2", timings={"merge_s": 9.0, "eval_s": 9.0}) for r in RECORDS]
    assert [to_json(r) for r in a] != [to_json(r) for r in b]  # the records differ ...
    assert history(a) == history(b)  # ... only in volatile fields
    assert history(a) != history([replace(r, fitness=0.0) for r in RECORDS])


def test_history_orders_evaluations_between_barriers():
    gen0 = {"type": "generation", "generation": 0}
    a = [cand(0, 0), cand(0, 1), cand(0, 2), gen0, cand(1, 0), cand(1, 1)]
    b = [cand(0, 2), cand(0, 0), cand(0, 1), gen0, cand(1, 1), cand(1, 0)]
    assert history(a) == history(b)
    # a record that crosses a barrier is a different history
    c = [cand(0, 0), cand(0, 1), gen0, cand(0, 2), cand(1, 0), cand(1, 1)]
    assert history(c) != history(a)


def test_a_live_search_holds_the_lock(tmp_path):
    run = RunFolder.create(tmp_path / "run", "x: 1\n")
    code = ("import sys; from evomerge.runs.folder import RunFolder\n"
            "r = RunFolder.open(sys.argv[1])\ntry:\n    r.acquire()\nexcept ValueError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True)
    assert "locked by a live search" in out.stdout
    run.close()
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True)
    assert out.stdout == ""  # released with the process / close()


def test_create_refuses_an_existing_run(tmp_path):
    run = RunFolder.create(tmp_path / "run", "x: 1\n")
    run.append(replace(RECORDS[0], type="reference", generation=-1))
    run.close()
    with pytest.raises(RunFolderError, match="already holds a search"):
        RunFolder.create(tmp_path / "run", "x: 1\n")
    with pytest.raises(RunFolderError, match="not a run folder"):
        RunFolder.open(tmp_path)


HOLD = ("import sys, time\nfrom evomerge.runs.folder import RunFolder\n"
        "RunFolder.open(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)")


def test_a_dead_holders_lock_is_taken_over(tmp_path):
    RunFolder.create(tmp_path / "run", "x: 1\n").close()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderError, match=rf"locked by a live search \(pid {holder.pid} on host"):
            RunFolder.open(tmp_path / "run").acquire()
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind
        holder.wait()
    assert f"pid={holder.pid}" in (tmp_path / "run" / "lock").read_text()
    run = RunFolder.open(tmp_path / "run")
    run.acquire()  # the dead process's lock, on this host: taken over at once
    assert f"pid={os.getpid()}" in (tmp_path / "run" / "lock").read_text()
    run.close()
    assert not (tmp_path / "run" / "lock").exists()


def test_another_hosts_lock_is_taken_over_after_its_lease(tmp_path, monkeypatch):
    import time

    monkeypatch.setenv("EVOMERGE_LOCK_LEASE_S", "1")
    RunFolder.create(tmp_path / "run", "x: 1\n").close()
    (tmp_path / "run" / "lock").write_text("filelock/2\npid=4242\nhost=elsewhere\nmode=lease\ntoken=ab\nduration=1.0\n")
    t0 = time.monotonic()
    run = RunFolder.open(tmp_path / "run")
    run.acquire()  # unrenewed for a lease: the holder on the other host is gone
    assert 1.0 <= time.monotonic() - t0 < 10
    assert not run.lock_lost
    run.close()


def test_a_lock_file_of_an_earlier_version(tmp_path):
    RunFolder.create(tmp_path / "run", "x: 1\n").close()
    (tmp_path / "run" / "lock").write_text("12345\n")  # a bare pid: flock era, nobody holds it
    run = RunFolder.open(tmp_path / "run")
    run.acquire()
    run.close()


def test_a_folder_with_a_config_but_no_records_starts_over(tmp_path):
    RunFolder.create(tmp_path / "run", "x: 1\n").close()  # e.g. a search that failed loading its models
    run = RunFolder.create(tmp_path / "run", "x: 2\n")
    assert run.config_text() == "x: 2\n"
    run.append(replace(RECORDS[0], type="reference", generation=-1))
    run.close()
    with pytest.raises(RunFolderError, match=r"already holds a search \(1 records\); resume it with .*--resume.*"
                       r"delete the folder or choose another run_dir \(--run-dir\)"):
        RunFolder.create(tmp_path / "run", "x: 2\n")


def test_a_run_dir_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(RunFolderError, match=r"run_dir \(--run-dir\) '.*f' is a file, not a folder"):
        RunFolder.create(tmp_path / "f", "x: 1\n")
    with pytest.raises(RunFolderError, match=r"run_dir \(--run-dir\) '.*f/run': cannot create it"):
        RunFolder.create(tmp_path / "f" / "run", "x: 1\n")
    with pytest.raises(RunFolderError, match=r"'.*f' is a file, not a run folder"):
        RunFolder.open(tmp_path / "f")


def test_a_folder_with_results_but_no_log_does_not_start_over(tmp_path):
    RunFolder.create(tmp_path / "run", "x: 1\n").close()
    (tmp_path / "run" / "stages").mkdir()  # a staged search keeps its results in stages/, no log
    with pytest.raises(RunFolderError, match=r"already holds a search \(stages\)"):
        RunFolder.create(tmp_path / "run", "x: 2\n")
    assert (tmp_path / "run" / "config.yaml").read_text() == "x: 1\n"
