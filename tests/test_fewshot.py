"""Few-shot prompts are fixed per item: the same evaluator, a fresh one, two Ray workers and a
killed-and-resumed search all give an item the same examples (zoo_rev_2shot: two examples each)."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time

import cli_process
import pytest
import yaml
from ray_helpers import REPO, assert_gone, tiny_config, worker_pids

from evomerge.evaluation.evaluator import LmEvalEvaluator
from evomerge.evaluation.fitness import item_values
from evomerge.models.folders import load_causal_lm, load_tokenizer
from evomerge.runs.folder import LOG, RunFolder, history
from evomerge.runs.start import run_search
from evomerge.search.config import SearchConfig

TASK = "zoo_rev_2shot"


def _prompts(result) -> dict[int, tuple]:
    return {s["doc_id"]: tuple(map(tuple, s["arguments"])) for s in result.samples}


def _only(cols: dict[str, list], docs: list[int]) -> dict[str, list]:
    keep = [j for j, d in enumerate(cols["doc"]) if d in docs]
    return {m: [v[j] for j in keep] for m, v in cols.items()}


def test_an_items_prompt_does_not_depend_on_what_was_scored_before(zoo_dir):
    model = load_causal_lm(zoo_dir / "spec_rev")
    tok = load_tokenizer(zoo_dir / "spec_rev")
    a, b = list(range(0, 10)), list(range(10, 20))
    ev = LmEvalEvaluator([TASK], split="dev", batch_size=16, log_samples=True)
    ev.evaluate(model, tok, samples={TASK: a})
    b_after_a = ev.evaluate(model, tok, samples={TASK: b})[TASK]
    fresh = LmEvalEvaluator([TASK], split="dev", batch_size=16, log_samples=True)
    b_alone = fresh.evaluate(model, tok, samples={TASK: b})[TASK]
    both = fresh.evaluate(model, tok, samples={TASK: a + b})[TASK]
    assert _prompts(b_after_a) == _prompts(b_alone) == {d: p for d, p in _prompts(both).items() if d in b}
    assert item_values(b_after_a.samples) == item_values(b_alone.samples) == _only(item_values(both.samples), b)
    # two examples from the fewshot split, and they differ between items
    ctx = [p[0][0] for p in _prompts(b_alone).values()]
    assert all(c.count("</s>\n") == 2 for c in ctx) and len({c.split("\n")[0] for c in ctx}) > 1


def _config(zoo_dir, **over) -> dict:
    # limit 6: every candidate and every generation sees other items; one re-scoring of 500 items
    return tiny_config(zoo_dir, tasks=[{"name": TASK, "metric": "ll", "limit": 6}], **over)


@pytest.fixture(scope="module")
def in_process(zoo_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fewshot") / "run"
    run_search(SearchConfig.from_dict(_config(zoo_dir)), run_dir=run_dir, quiet=True, workers=0)
    return run_dir


@pytest.mark.slow
@pytest.mark.ray
def test_two_ray_workers_give_the_in_process_history(zoo_dir, in_process, tmp_path):
    import ray

    tmp = tempfile.mkdtemp(prefix="r8f", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=tmp,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        run_search(SearchConfig.from_dict(_config(zoo_dir)), run_dir=tmp_path / "ray2", quiet=True, workers=2)
    finally:
        ray.shutdown()
    assert_gone(worker_pids(tmp_path / "ray2"), tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    got = RunFolder.open(tmp_path / "ray2").records()
    assert {r.worker.split("@")[0] for r in got if r.type == "candidate"} == {"w0", "w1"}
    assert history(got) == history(RunFolder.open(in_process).records())


@pytest.mark.slow
def test_a_killed_and_resumed_search_gives_the_same_history(zoo_dir, in_process, tmp_path):
    expected = history(RunFolder.open(in_process).records())
    cfg = tmp_path / "search.yml"
    cfg.write_text(yaml.safe_dump(_config(zoo_dir)))
    run_dir = tmp_path / "run"
    p = cli_process.start("search", "--quiet", cfg, "--run-dir", run_dir)
    deadline = time.monotonic() + 300
    # killed inside the first generation: the resumed process's evaluator has built no prompt yet
    while p.poll() is None and time.monotonic() < deadline:
        if (run_dir / LOG).is_file() and (run_dir / LOG).read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, f"the search exited ({p.returncode}) before the kill"
    r = cli_process.run("search", "--quiet", "--resume", run_dir, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    got = RunFolder.open(run_dir).records()
    keys = [(r.generation, r.index) for r in got if r.type == "candidate"]
    assert len(keys) == len(set(keys)) == 8
    assert history(got) == expected
