"""The README's shell examples work as written: every ```bash block runs, in order, as a new user
would type it, in a scratch folder laid out like a checkout (with the zoo already built).

Each block runs in a real bash; its `evomerge` and `lm_eval` are the installed console scripts'
entry points, run in processes forked from a server that imported them once (tests/cli_server.py),
not a new interpreter each: the commands' imports cost the test about 6 s each."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_server import preloaded_commands

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def test_readme_has_examples_of_every_command():
    commands = " ".join(bash_blocks())
    for cmd in ("evomerge zoo", "evomerge search", "evomerge status", "evomerge export", "evomerge materialize",
                "evomerge eval", "evomerge merge", "lm_eval", "--weights"):
        assert cmd in commands, cmd


def test_readme_examples_run_as_written(zoo_dir, tmp_path):
    # The zoo is a copy of the cached one, so `evomerge zoo` finds it up to date.
    shutil.copytree(zoo_dir, tmp_path / "artifacts" / "zoo")
    for d in ("configs", "evals"):
        (tmp_path / d).symlink_to(REPO / d)
    bin_dir = Path(sys.executable).parent
    assert all((bin_dir / name).is_file() for name in ("evomerge", "lm_eval"))  # what a user's shell finds
    with preloaded_commands(dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")) as env:
        for block in bash_blocks():
            r = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=900)
            assert r.returncode == 0, (f"README block failed:\n{block}\n--- stdout\n{r.stdout[-3000:]}\n"
                                       f"--- stderr\n{r.stderr[-3000:]}")
            assert "Traceback" not in r.stderr
    assert (tmp_path / "runs/quickstart/fitness.png").is_file()
    assert (tmp_path / "runs/zoo_nsga/pareto.png").is_file()
    assert "Pareto pick" in (tmp_path / "nsga_pick.yaml").read_text()
    card = (tmp_path / "artifacts/quickstart_winner/README.md").read_text()
    assert "## Search" in card and "### Test split" in card
    assert (tmp_path / "artifacts/ties_merge/model.safetensors").is_file()

    # lm-eval's own CLI on the materialized winner (the README's lm_eval block, which writes
    # lmeval_out/) reproduces the test-split metrics that the search logged for that recipe (same
    # split, dtype and batch size), to 1e-6.
    import json

    from evomerge.runs.folder import RunFolder

    final = RunFolder.open(tmp_path / "runs/quickstart").records()[-1]
    assert final.type == "final" and set(final.test_metrics) == {"zoo_add", "zoo_rev", "zoo_sub"}
    results = json.loads(next((tmp_path / "lmeval_out").rglob("results*.json")).read_text())["results"]
    for task, metrics in final.test_metrics.items():
        assert abs(results[task]["acc,none"] - metrics["acc"]) <= 1e-6, (task, results[task], metrics)
