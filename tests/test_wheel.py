"""A wheel carries the search spaces and the zoo tasks: installed without the repository's folders,
`evomerge search` finds `ps_task_arithmetic` and the zoo tasks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the checkout's files (tracked, and untracked but not ignored)."""
    tmp = tmp_path_factory.mktemp("wheel")
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           capture_output=True, check=True).stdout.decode().split("\0")
    src = tmp / "src"
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp / "dist"), str(src)], check=True, cwd=tmp, capture_output=True)
    (whl,) = (tmp / "dist").glob("evomerge-*.whl")
    return whl


def test_the_wheel_carries_spaces_and_tasks(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("search_spaces/ps_task_arithmetic.yaml", "search_spaces/dfs.yaml", "evals/zoo_add.yaml",
                 "evals/zoo_data.py", "evals/data/rev/dev.jsonl", "evals/data/sub/test.jsonl"):
        assert f"evomerge/_data/{name}" in names, name
    assert "evomerge/runs/start.py" in names
    assert not any("__pycache__" in n for n in names)


def test_an_unpacked_wheel_runs_a_search_from_elsewhere(wheel, zoo_dir, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "work"  # cwd: neither the repository nor the unpacked wheel
    work.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site))
    env.pop("EVOMERGE_TASKS", None)
    code = ("import evomerge, sys\nfrom evomerge.search.config import REPO_SPACES, load_space\n"
            "from evomerge.evaluation.evaluator import LmEvalEvaluator\n"
            "print(evomerge.__file__); print(REPO_SPACES); load_space('ps_task_arithmetic')\n"
            "print(LmEvalEvaluator(['zoo_add', 'zoo_rev'], split='dev').n_docs('zoo_rev'))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    pkg, spaces, n = r.stdout.split()[-3:]
    assert Path(pkg).is_relative_to(site) and Path(spaces) == site / "evomerge" / "_data" / "search_spaces"
    assert int(n) > 0
    cfg = {"models": [str(zoo_dir / "spec_add"), str(zoo_dir / "spec_rev")], "base_model": str(zoo_dir / "base"),
           "search_space": "ps_task_arithmetic", "tasks": [{"name": "zoo_add", "limit": 5}, {"name": "zoo_rev", "limit": 5}],
           "optimizer": {"popsize": 2}, "budget": {"generations": 1}, "rescore_top_k": 1, "threads": 1}
    (work / "c.yml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "evomerge.cli", "search", "c.yml", "--quiet"], cwd=work, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "winner (full dev split)" in r.stderr and (work / "runs" / "c" / "best.yaml").is_file()
