"""Shared fixtures: offline environment, and one session-scoped zoo cached outside the repo.

The zoo cache lives in ``$EVOMERGE_CACHE`` (default ``~/.cache/evomerge``) under
``zoo/<key>``, where the key hashes the builder's source, its parameters and the torch version:
the first run builds it (about 3.5 minutes on 2 cores), later runs reuse it. The CPU-kernel pins
below are the zoo's too (evomerge/zoo/kernels.py), so the fixture builds it in this process.
"""

from __future__ import annotations

import collections
import fcntl
import os
import tempfile
from pathlib import Path

import pytest
from cpu_kernels import pin_cpu_kernels

# Before anything imports torch: the parity goldens' CPU kernels (tests/cpu_kernels.py).
pin_cpu_kernels()
os.environ.update({
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "RAY_AUTH_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
    "TQDM_DISABLE": "1",
})
# datasets and the hub cache write under HF_HOME: keep them out of the user's home.
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="evomerge-hf-")

REPO = Path(__file__).resolve().parent.parent


def cache_root() -> Path:
    return Path(os.environ.get("EVOMERGE_CACHE", Path.home() / ".cache" / "evomerge"))


@pytest.fixture(scope="session")
def zoo_dir() -> Path:
    import torch

    from evomerge.zoo.build import ZooParams, build_zoo, cache_key

    params = ZooParams()
    out = cache_root() / "zoo" / cache_key(params)
    out.parent.mkdir(parents=True, exist_ok=True)
    # A lock, so that two test runs sharing the cache do not build the same zoo at once.
    with open(out.parent / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        threads = torch.get_num_threads()
        try:
            build_zoo(out, params)
        finally:
            torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="session")
def zoo_test_scores(zoo_dir):
    """Test-split scores of every zoo model, computed once for the session."""
    from evomerge.evaluation.evaluator import LmEvalEvaluator
    from evomerge.models.folders import load_causal_lm, load_tokenizer
    from evomerge.zoo.build import read_manifest

    manifest = read_manifest(zoo_dir)
    evaluator = LmEvalEvaluator(list(manifest["tasks"].values()), split="test", batch_size=64)
    tok = load_tokenizer(zoo_dir / "base")
    return {name: evaluator.evaluate(load_causal_lm(zoo_dir / m["path"]), tok)
            for name, m in manifest["models"].items()}


# The groups that take longest (alone on 2 cores: the Ray modules about 290 s, test_readme 160,
# test_search 135, test_dataflow_search 55, test_vllm and test_study about 45), handed out first:
# xdist's own order (by number of tests) put these few-test groups last, and the worker that drew
# one at the end ran it while the other idled.
LONGEST_FIRST = ("ray", "test_readme", "test_search", "test_dataflow_search", "test_vllm", "test_study")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order set below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """Groups for pytest-xdist (`make test` runs `-n 2 --dist loadgroup`): a module's tests stay on
    one worker, so its module-scoped fixtures (a shared search, a Ray cluster) are built once, and
    every module that starts Ray shares one worker, so two Ray instances never compete. Groups go
    out longest first (LONGEST_FIRST, then by number of tests, as xdist would), each in one piece."""
    ray_modules = {item.module.__name__ for item in items if item.get_closest_marker("ray")}
    group = {}
    for item in items:
        module = item.module.__name__
        group[item] = "ray" if module in ray_modules else module
        item.add_marker(pytest.mark.xdist_group(group[item]))
    size = collections.Counter(group.values())
    first_seen = {g: i for i, g in reversed(list(enumerate(group.values())))}

    def rank(item):
        g = group[item]
        known = LONGEST_FIRST.index(g) if g in LONGEST_FIRST else len(LONGEST_FIRST)
        return known, -size[g], first_seen[g]

    items.sort(key=rank)
