"""The model zoo: loads with transformers, is deterministic, cached, and leaves room to merge."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evomerge.core.errors import ZooError
from evomerge.zoo.build import ZooParams, build_zoo, cache_key, read_manifest, weight_hashes
from evomerge.zoo.kernels import KERNEL_PINS, X86_64
from evomerge.zoo.train import ModelShape

REPO = Path(__file__).resolve().parent.parent


def test_zoo_reloads_with_auto_classes(zoo_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = read_manifest(zoo_dir)
    assert manifest["base"] == "base"
    assert len(manifest["specialists"]) >= 3
    for name, entry in manifest["models"].items():
        folder = zoo_dir / entry["path"]
        assert (folder / "model.safetensors").is_file(), name
        assert not list(folder.glob("*.bin")), "weights must be safetensors only"
        model = AutoModelForCausalLM.from_pretrained(folder)
        tok = AutoTokenizer.from_pretrained(folder)
        ids = tok("12+34=", return_tensors="pt", add_special_tokens=False).input_ids
        assert tok.decode(ids[0]) == "12+34="
        logits = model(input_ids=ids).logits
        assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()
    chat = tok.apply_chat_template([{"role": "user", "content": "1+2="}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == "<|user|>1+2=<|assistant|>"
    for spec in manifest["specialists"]:
        entry = manifest["models"][spec]
        assert manifest["tasks"][entry["skill"]] == entry["task"]


def test_zoo_meets_the_skill_table(zoo_test_scores):
    """Each specialist >= 0.90 on its skill; others and the base at least 0.40 below it."""
    skills = {"add": "zoo_add", "rev": "zoo_rev", "sub": "zoo_sub"}
    for skill, task in skills.items():
        s_i = zoo_test_scores[f"spec_{skill}"][task].metrics["acc"]
        assert s_i >= 0.90, (skill, s_i)
        for other, scores in zoo_test_scores.items():
            if other != f"spec_{skill}":
                assert scores[task].metrics["acc"] <= s_i - 0.40, (skill, other, scores[task].metrics)


TINY = ZooParams(shape=ModelShape(layers=2, hidden=32, intermediate=64, heads=2),
                 base_steps=40, spec_max_steps=30, val_items=40)
BUILD_SNIPPET = """
import sys
import torch
torch.set_num_threads(int(sys.argv[2]))
from evomerge.zoo.build import ZooParams, build_zoo
from evomerge.zoo.train import ModelShape
p = ZooParams(shape=ModelShape(layers=2, hidden=32, intermediate=64, heads=2),
              base_steps=40, spec_max_steps=30, val_items=40)
build_zoo(sys.argv[1], p, log=lambda *a: None)
"""
GOLDEN_HASHES = json.loads((REPO / "tests" / "golden" / "zoo_hashes.json").read_text())
x86_64_only = pytest.mark.skipif(not X86_64, reason="the committed hashes are x86-64's (pinned AVX2 kernels); "
                                 "on another architecture a zoo is its own, with its own key")


@x86_64_only
def test_two_builds_with_other_thread_counts_give_the_committed_hashes(tmp_path):
    """One build with the pins in its environment and 1 thread; one with torch imported unpinned
    (it trains in a pinned child process) and 2 threads: the same bytes, the committed ones."""
    import os

    from cpu_kernels import PINNED

    outs = [tmp_path / "a", tmp_path / "b"]
    unpinned = {k: v for k, v in os.environ.items() if k not in PINNED}
    for out, threads, env in ((outs[0], 1, {**os.environ, **PINNED}), (outs[1], 2, unpinned)):
        subprocess.run([sys.executable, "-c", BUILD_SNIPPET, str(out), str(threads)], check=True, cwd=tmp_path,
                       env=env)
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*.safetensors"))
    assert len(files) == 4
    for rel in files:
        assert (outs[0] / rel).read_bytes() == (outs[1] / rel).read_bytes(), rel
    # zoo.json differs only in the measured build time
    a, b = (json.loads((o / "zoo.json").read_text()) for o in outs)
    a["build"].pop("seconds"), b["build"].pop("seconds")
    assert a == b
    assert a["weights_sha256"] == weight_hashes(outs[0])
    assert a["weights_sha256"] == GOLDEN_HASHES[cache_key(TINY)]["weights_sha256"]


@x86_64_only
def test_the_test_zoo_has_the_committed_hashes(zoo_dir):
    manifest = read_manifest(zoo_dir)
    # zoo.json tells the truth about the zoo's own models (other tests add lora/ and blocks/ beside them)
    own = {f"{m['path']}/model.safetensors" for m in manifest["models"].values()}
    assert manifest["weights_sha256"] == {f: h for f, h in weight_hashes(zoo_dir).items() if f in own}
    assert manifest["weights_sha256"] == GOLDEN_HASHES[manifest["key"]]["weights_sha256"]


def test_the_zoos_kernel_pins_are_the_goldens():
    from cpu_kernels import PINNED

    assert KERNEL_PINS == PINNED


def test_second_build_does_nothing_and_other_params_are_refused(tmp_path):
    out = tmp_path / "zoo"
    build_zoo(out, TINY, log=lambda *a: None)
    stamp = (out / "base" / "model.safetensors").stat().st_mtime_ns
    said = []
    build_zoo(out, TINY, log=said.append)
    assert "up to date" in said[0]
    assert (out / "base" / "model.safetensors").stat().st_mtime_ns == stamp
    other = ZooParams(shape=TINY.shape, base_steps=41, spec_max_steps=30, val_items=40)
    with pytest.raises(ZooError, match="other parameters"):
        build_zoo(out, other, log=lambda *a: None)
    assert (out / "base" / "model.safetensors").stat().st_mtime_ns == stamp  # nothing lost


def test_zoo_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(ZooError, match="not a zoo folder"):
        build_zoo(tmp_path, TINY, log=lambda *a: None)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_training_reports_every_step_for_the_progress_bar(capsys):
    """The zoo build's bar (evomerge zoo) follows train()'s per-step callback."""
    from evomerge.zoo.build import _base_batch, _steps_bar
    from evomerge.zoo.tokenizer import build_tokenizer
    from evomerge.zoo.train import TrainConfig, new_model, train

    tok = build_tokenizer()
    shape = ModelShape(layers=1, hidden=16, intermediate=32, heads=2)
    steps: list[int] = []
    train(new_model(tok, shape, 0), tok, TrainConfig(steps=3, lr=1e-3, batch=4, warmup=1), shape.seq_len,
          _base_batch((1, 1, 1, 1)), seed=0, on_step=steps.append)
    assert steps == [1, 2, 3]
    lines: list[str] = []
    with _steps_bar(False, "base", 30, lines.append) as off:  # no terminal: lines in the log
        for s in range(1, 31):
            off(s)
    assert [ln.split(",")[0] for ln in lines] == [f"  base: step {s}/30" for s in range(3, 30, 3)]
    with _steps_bar(True, "base", 3) as on:
        for s in (1, 2, 3):
            on(s)
