"""Dataset loaders for the zoo tasks, referenced from the task YAMLs with ``!function``.

lm-eval resolves ``data_files`` against the working directory, so the tasks load their JSONL
relative to this file instead: they work from any directory, offline, without a dataset cache.
"""

import json
from pathlib import Path

import datasets

DATA = Path(__file__).resolve().parent / "data"


def _load(skill: str) -> datasets.DatasetDict:
    splits = {}
    for path in sorted((DATA / skill).glob("*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        splits[path.stem] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(splits)


def load_add(**kwargs) -> datasets.DatasetDict:
    return _load("add")


def load_rev(**kwargs) -> datasets.DatasetDict:
    return _load("rev")


def load_sub(**kwargs) -> datasets.DatasetDict:
    return _load("sub")


def load_rev_2shot(**kwargs) -> datasets.DatasetDict:
    """zoo_rev's dev and test, plus the examples that the 2-shot prompts are drawn from."""
    splits = dict(_load("rev"))
    splits.update(_load("rev_2shot"))
    return datasets.DatasetDict(splits)


def acc_and_ll(doc, results) -> dict:
    """Per-item metrics of a loglikelihood task: exact match (lm-eval's ``acc``) and ``ll``, the
    answer's log-likelihood (a graded score where exact match is near 0 for every model)."""
    ll, is_greedy = results[0]
    return {"acc": int(is_greedy), "ll": float(ll)}
