"""Print the architecture matrix (docs/architectures.md) from the tests' results.

    python scripts/architecture_matrix.py            # runs the matrix tests, prints markdown
    python scripts/architecture_matrix.py --junit results.xml   # from a pytest --junitxml file

Runs tests/test_families_matrix.py, tests/test_families_dfs.py and tests/test_families_defects.py
(and tests/test_families_vllm.py with --vllm) with pytest's JUnit XML report and prints one row per
family of tests/families.py: each cell is what its tests gave (passed, skipped with the reason,
failed), so the table says only what ran. Everything here runs on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO)]
TESTS = ["tests/test_families_matrix.py", "tests/test_families_dfs.py",
         "tests/test_families_defects.py"]


def run_tests(junit: Path, vllm: bool) -> None:
    files = TESTS + (["tests/test_families_vllm.py"] if vllm else [])
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p",
                    "no:cacheprovider", f"--junitxml={junit}", *files], cwd=REPO, env=env,
                   check=False)


def outcomes(junits: list[Path]) -> dict[str, dict[str, tuple[str, str]]]:
    """test function -> parameter id -> (passed | skipped | failed, message)."""
    out: dict[str, dict[str, tuple[str, str]]] = defaultdict(dict)
    cases = [c for j in junits for c in ET.parse(j).getroot().iter("testcase")]
    for case in cases:
        m = re.match(r"(\w+)(?:\[(.*)\])?$", case.get("name", ""))
        if not m:
            continue
        status, msg = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                status = "skipped" if tag == "skipped" else "failed"
                msg = (el.get("message") or "").replace("\n", " ")
        out[m[1]][m[2] or ""] = (status, msg)
    return out


def cell(results: list[tuple[str, str]], ok: str = "yes") -> str:
    if not results:
        return "not run"
    failed = [m for s, m in results if s == "failed"]
    if failed:
        return f"**FAILS** ({len(failed)}/{len(results)})"
    skipped = [m for s, m in results if s == "skipped"]
    if skipped:
        return f"{ok} ({len(results) - len(skipped)}/{len(results)}; rest skipped)"
    return ok


def matrix(res) -> str:
    from families import FAMILIES
    from test_families_dfs import REFUSED
    from test_families_matrix import DEVIATIONS, GOLDENS, KINDS

    rows = ["| family | merges = mergekit 0.1.5 | in-place = engine | LoRA = peft | "
            "search, resume, export, materialize | data-flow (DFS) | vLLM swap = fresh engine |",
            "|---|---|---|---|---|---|---|"]
    for f in sorted(FAMILIES):
        merge = [res["test_merge_equals_mergekit"].get(f"{f}-{k}") for k in KINDS]
        merge = [r for r in merge if r]
        equal = [k for k in KINDS if res["test_merge_equals_mergekit"].get(f"{f}-{k}", ("",))[0]
                 == "passed" and (f, k) not in DEVIATIONS and "error" not in GOLDENS[f]["recipes"][k]]
        if any(s == "failed" for s, _ in merge):
            mcell = cell(merge)
        elif any("error" in r for r in GOLDENS[f]["recipes"].values()):
            mcell = ("mergekit refuses the folders; task_arithmetic, linear = their formulas"
                     if all(s != "failed" for s, _ in merge) else cell(merge))
        else:
            dev = [k for k in KINDS if (f, k) in DEVIATIONS]
            mcell = f"bit-equal: {', '.join(equal)}" + (
                f"; differs by design: {', '.join(dev)} (below)" if dev else "")
        inplace = [r for k, r in res["test_inplace_merger_equals_the_engine"].items()
                   if k.startswith(f + "-")]
        lora = [res["test_lora_adapter_equals_peft"].get(f)] if f in \
            res["test_lora_adapter_equals_peft"] else []
        lora_cell = cell(lora, "all-linear and short names")
        if lora and lora[0][0] == "skipped":
            lora_cell = "skipped: " + lora[0][1].removeprefix("Skipped: ")
        elif f in ("mixtral", "qwen2_moe") and lora and lora[0][0] == "passed":
            lora_cell = "short names; all-linear's target_parameters (fused experts) refused"
        search = [res["test_search_resume_export_materialize"].get(f)] if f in \
            res["test_search_resume_export_materialize"] else []
        if f in REFUSED:
            r = res["test_non_folding_family_is_refused_with_its_reason"].get(f)
            dfs = f"refused ({REFUSED[f].replace(chr(92), '')}...)" if r and r[0] == "passed" \
                else cell([r] if r else [])
        else:
            r = res["test_folded_model_equals_the_scaled_path"].get(f)
            dfs = "folds = path" if r and r[0] == "passed" else cell([r] if r else [])
        swap = res["test_swap_scores_as_a_fresh_engine"].get(f)
        vcell = cell([swap]) if swap else "not run"
        rows.append(f"| {f} | {mcell} | {cell(inplace)} | {lora_cell} | {cell(search)} | {dfs} "
                    f"| {vcell} |")
    notes = ["", "Differences from mergekit 0.1.5 (with transformers 5.19), by design:", ""]
    for (f, k), (why, _) in sorted(DEVIATIONS.items()):
        notes.append(f"- {f}, {k}: {why}.")
    for f, e in sorted(GOLDENS.items()):
        errs = {r["error"] for r in e["recipes"].values() if "error" in r}
        if errs:
            notes.append(f"- {f}: mergekit 0.1.5's architecture definition expects tensors these "
                         f"folders do not have (\"{sorted(errs)[0][:100]}...\").")
    return "\n".join(rows + notes)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--junit", type=Path, action="append",
                    help="a pytest --junitxml report of the matrix tests (repeatable)")
    ap.add_argument("--vllm", action="store_true", help="also run the vLLM swap tests (slow)")
    args = ap.parse_args()
    if not args.junit:
        args.junit = [Path(tempfile.mkdtemp()) / "matrix.xml"]
        run_tests(args.junit[0], args.vllm)
    print(matrix(outcomes(args.junit)))
    gen = json.loads((REPO / "tests/golden/families.json").read_text())["generator"]
    print(f"\nGoldens: mergekit {gen['mergekit']}, torch {gen['torch']}, transformers "
          f"{gen['transformers']}, CPU ({gen['cpu_capability']} kernels). Checked on CPU only.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
