"""scripts/gpu_check.py without CUDA (or with --dry-run): every part's plumbing on CPU with tiny
shapes, one JSON report, a table, exit 0; the parts that need CUDA say why they were skipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO


def test_the_dry_run_reports_every_part(tmp_path):
    out = tmp_path / "report.json"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--dry-run", "--out", str(out),
                        "--parts", "deps,gpu_tests,inplace_7b,methods_cpu_vs_cuda,ray", "--workdir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES=""))
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(out.read_text())
    parts = report["parts"]
    assert report["machine"]["dry_run"] is True
    assert [parts[p]["status"] for p in ("deps", "inplace_7b", "methods_cpu_vs_cuda")] == ["ok"] * 3, parts
    assert parts["gpu_tests"]["status"] == parts["ray"]["status"] == "skipped"
    assert "CUDA" in parts["gpu_tests"]["reason"]
    inplace = parts["inplace_7b"]["details"]
    assert inplace["device"] == "cpu" and set(inplace["placements"]) == {"resident", "stream"}
    assert all(p["build_s"] > 0 for p in inplace["placements"].values())
    from evomerge.methods.registry import method_names

    assert sorted(parts["methods_cpu_vs_cuda"]["details"]["methods"]) == method_names()
    assert "| inplace_7b | ok |" in r.stdout
    assert not list(tmp_path.glob("gpu-check-*"))  # the synthetic sources are removed
