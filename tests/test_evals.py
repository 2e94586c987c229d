"""The zoo's lm-eval tasks: deterministic data, offline loading from any directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from evomerge.evaluation.evaluator import LmEvalEvaluator, UnknownTaskError
from evomerge.zoo.tasks import EVAL_SPLITS, write_eval_data

REPO = Path(__file__).resolve().parent.parent


def test_committed_eval_data_is_what_the_generator_writes(tmp_path):
    for path in write_eval_data(tmp_path):
        rel = path.relative_to(tmp_path)
        assert (REPO / "evals" / rel).read_bytes() == path.read_bytes(), rel


def test_splits_are_disjoint_and_sized():
    for skill in ("add", "rev", "sub"):
        prompts = {}
        for split, n in EVAL_SPLITS.items():
            rows = [json.loads(x) for x in (REPO / "evals/data" / skill / f"{split}.jsonl").read_text().splitlines()]
            assert len(rows) == n
            prompts[split] = {r["prompt"] for r in rows}
        assert not prompts["dev"] & prompts["test"], skill
    shots = {json.loads(x)["prompt"] for x in (REPO / "evals/data/rev_2shot/fewshot.jsonl").read_text().splitlines()}
    rev = {json.loads(x)["prompt"] for s in EVAL_SPLITS for x in (REPO / f"evals/data/rev/{s}.jsonl").read_text().splitlines()}
    assert len(shots) == 50 and not shots & rev  # zoo_rev_2shot's examples are no dev or test item


@pytest.mark.parametrize("split", ["dev", "test"])
def test_tasks_load_offline_from_any_directory(tmp_path, split):
    cwd = os.getcwd()
    os.chdir(tmp_path)  # lm-eval would resolve data_files against this; the tasks must not care
    try:
        ev = LmEvalEvaluator(["zoo_add", "zoo_rev", "zoo_sub"], split=split)
    finally:
        os.chdir(cwd)
    for name, task in ev._task_dict["tasks"].items():
        docs = list(task.test_docs())
        assert len(docs) == EVAL_SPLITS[split], name
        first = json.loads((REPO / "evals/data" / name[4:] / f"{split}.jsonl").read_text().splitlines()[0])
        assert docs[0]["prompt"] == first["prompt"]


def test_unknown_task_names_the_nearest(tmp_path):
    with pytest.raises(UnknownTaskError, match=r"'zoo_addd'.*did you mean zoo_add"):
        LmEvalEvaluator(["zoo_addd"])


def test_missing_split_is_named():
    with pytest.raises(ValueError, match="no split 'validation'"):
        LmEvalEvaluator(["zoo_add"], split="validation")


def test_auto_batch_size_is_refused():
    with pytest.raises(ValueError, match="batch_size"):
        LmEvalEvaluator(["zoo_add"], batch_size="auto")
