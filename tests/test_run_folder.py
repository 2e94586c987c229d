"""The run folder: a log torn at any byte reads back as its complete records; one search per folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from evomerge.runs.folder import LOG, RunFolder, RunFolderError, history, read_records

RECORDS = [{"type": "candidate", "generation": 0, "index": i, "genome": [0.1 * i, 1 / 3],
            "fitness": 0.5 + i / 7, "metrics": {"zoo_add": {"acc": 0.25}}, "time": 1.5 + i} for i in range(4)]


def test_log_torn_at_every_byte_reads_only_complete_records(tmp_path):
    run = RunFolder.create(tmp_path / "run", "x: 1\n")
    for r in RECORDS:
        run.append(r)
    run.close()
    data = (tmp_path / "run" / LOG).read_bytes()
    ends = [i + 1 for i, b in enumerate(data) if b == ord("\n")]
    for cut in range(len(data) + 1):
        records, end = read_records(data[:cut])
        n_complete = sum(1 for e in ends if e <= cut)
        assert records == RECORDS[:n_complete], cut
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
    run.append({"type": "candidate", "genome": genome})
    run.close()
    assert RunFolder.open(tmp_path / "run").records()[0]["genome"] == genome


def test_history_drops_volatile_fields():
    a = [dict(r, time=1.0, worker="w1", host="h") for r in RECORDS]
    b = [dict(r, time=2.0, worker="w2", host="k") for r in RECORDS]
    assert history(a) == history(b) and a != b


def test_history_orders_evaluations_between_barriers():
    def cand(g, i):
        return {"type": "candidate", "generation": g, "index": i, "fitness": i}

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
    run.append({"type": "reference"})
    run.close()
    with pytest.raises(RunFolderError, match="already holds a search"):
        RunFolder.create(tmp_path / "run", "x: 1\n")
    with pytest.raises(RunFolderError, match="not a run folder"):
        RunFolder.open(tmp_path)
    json.dumps(RECORDS)


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
    run.append({"type": "reference"})
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
