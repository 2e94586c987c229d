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
