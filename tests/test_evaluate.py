"""The evaluator: in memory equals `evomerge eval` on a saved folder; clear errors; no RNG side effects."""

from __future__ import annotations

import json
import random
from pathlib import Path

import cli_process
import numpy as np
import pytest
import torch

from evomerge.evaluation.evaluator import LmEvalEvaluator, evaluate_model_dir
from evomerge.models.folders import ModelFolderError, load_causal_lm, load_tokenizer
from evomerge.zoo.skills import Item
from evomerge.zoo.train import exact_match

REPO = Path(__file__).resolve().parent.parent
TASKS = ["zoo_add", "zoo_rev", "zoo_sub"]


def _task_arithmetic(zoo_dir: Path, weight: float) -> torch.nn.Module:
    """An in-memory model that exists in no folder: base + weight * sum of task vectors."""
    base = load_causal_lm(zoo_dir / "base")
    specs = [load_causal_lm(zoo_dir / f"spec_{s}").state_dict() for s in ("add", "rev", "sub")]
    with torch.no_grad():
        for name, p in base.named_parameters():
            p.add_(weight * sum(sd[name] - p for sd in specs))
    return base


def test_in_memory_scores_equal_evomerge_eval_on_the_saved_folder(zoo_dir, tmp_path):
    model = _task_arithmetic(zoo_dir, 0.7)
    tok = load_tokenizer(zoo_dir / "base")
    in_memory = LmEvalEvaluator(TASKS, split="test", batch_size=16).evaluate(model, tok, limit=150)
    model.save_pretrained(tmp_path / "merged")
    tok.save_pretrained(tmp_path / "merged")
    out = cli_process.run("eval", tmp_path / "merged", "--split", "test", "--limit", "150", "--batch-size", "16",
                          "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    from_cli = json.loads(out.stdout.strip().splitlines()[-1])
    assert {t: r.metrics for t, r in in_memory.items()} == {t: v["metrics"] for t, v in from_cli.items()}
    assert all(v["n"] == 150 for v in from_cli.values())
    # the merge is a real, distinct model (not a copy of a zoo member)
    assert 0.0 < in_memory["zoo_rev"].metrics["acc"] < 1.0


def test_lm_eval_acc_is_teacher_forced_exact_match(zoo_dir):
    model = load_causal_lm(zoo_dir / "spec_rev")
    tok = load_tokenizer(zoo_dir / "spec_rev")
    ev = LmEvalEvaluator(["zoo_rev", "zoo_add"], split="dev", batch_size=32)
    res = ev.evaluate(model, tok, limit=200)
    for task, skill in (("zoo_rev", "rev"), ("zoo_add", "add")):
        rows = [json.loads(x) for x in (REPO / f"evals/data/{skill}/dev.jsonl").read_text().splitlines()[:200]]
        fast = exact_match(model, tok, [Item(**r) for r in rows], seq_len=16)
        assert res[task].metrics["acc"] == pytest.approx(fast, abs=1e-12)


def test_evaluation_leaves_global_generators_alone(zoo_dir):
    model = load_causal_lm(zoo_dir / "base")
    tok = load_tokenizer(zoo_dir / "base")
    ev = LmEvalEvaluator(["zoo_add"], split="dev")
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    ev.evaluate(model, tok, limit=20)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_evaluate_twice_gives_the_same_scores(zoo_dir):
    model = load_causal_lm(zoo_dir / "spec_sub")
    tok = load_tokenizer(zoo_dir / "spec_sub")
    ev = LmEvalEvaluator(TASKS, split="dev", batch_size=8)
    assert ev.evaluate(model, tok, limit=40) == ev.evaluate(model, tok, limit=40)


# ------------------------------------------------------------------ bad inputs
def _cli(*args, cwd=None):
    return cli_process.run(*args, cwd=cwd)


def test_missing_model_folder(tmp_path):
    with pytest.raises(ModelFolderError, match="does not exist"):
        evaluate_model_dir(tmp_path / "nope", ["zoo_add"])
    r = _cli("eval", str(tmp_path / "nope"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_folder_without_config(tmp_path):
    r = _cli("eval", str(tmp_path))
    assert r.returncode == 2 and "no config.json" in r.stderr and "Traceback" not in r.stderr


def test_folder_that_is_not_a_causal_lm(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", "architectures": ["ViTModel"]}))
    with pytest.raises(ModelFolderError, match="not a causal language model"):
        evaluate_model_dir(tmp_path, ["zoo_add"])


def test_pickled_weights_are_refused_unless_allowed(zoo_dir, tmp_path):
    model = load_causal_lm(zoo_dir / "base")
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelFolderError, match="pickled"):
        evaluate_model_dir(tmp_path, ["zoo_add"])
    # allowed: the same scores as the safetensors folder it came from
    tok = load_tokenizer(zoo_dir / "base")
    tok.save_pretrained(tmp_path)
    allowed = evaluate_model_dir(tmp_path, ["zoo_add"], split="dev", limit=40, allow_pickle=True)
    expected = LmEvalEvaluator(["zoo_add"], split="dev").evaluate(model, tok, limit=40)
    assert {t: r.metrics for t, r in allowed.items()} == {t: r.metrics for t, r in expected.items()}
    r = _cli("eval", str(tmp_path), "--tasks", "zoo_add", "--limit", "40", "--split", "dev", "--allow-pickle", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["zoo_add"]["metrics"] == expected["zoo_add"].metrics


def test_loaders_are_not_reached_for_a_bad_task(zoo_dir, monkeypatch):
    import evomerge.evaluation.evaluator as ev_mod

    def boom(*a, **k):
        raise AssertionError("model loaded before the task names were checked")

    monkeypatch.setattr(ev_mod, "load_causal_lm", boom)
    monkeypatch.setattr(ev_mod, "load_tokenizer", boom)
    with pytest.raises(ValueError, match="unknown lm-eval task 'zoo_mul'"):
        evaluate_model_dir(zoo_dir / "base", ["zoo_mul"])


@pytest.mark.parametrize(("args", "message"), [
    (["--limit", "-3"], "argument --limit: must be a positive integer (got -3)"),
    (["--limit", "0"], "argument --limit: must be a positive integer (got 0)"),
    (["--limit", "ten"], "argument --limit: must be a positive integer (got 'ten')"),
    (["--batch-size", "0"], "argument --batch-size: must be a positive integer (got 0)"),
    (["--threads", "-1"], "argument --threads: must be a positive integer (got -1)"),
    (["--split", "validation"], "task 'zoo_add' has no split 'validation' (it has dev, test)"),
])
def test_cli_bad_eval_arguments(zoo_dir, args, message):
    r = _cli("eval", str(zoo_dir / "base"), "--tasks", "zoo_add", *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_eval_help_says_task_folders_are_trusted_code():
    r = _cli("eval", "--help")
    assert r.returncode == 0 and "trusted code" in " ".join(r.stdout.split())


def test_bad_limit_in_python():
    with pytest.raises(ValueError, match="limit must be a positive integer"):
        evaluate_model_dir("nowhere", ["zoo_add"], limit=-3)


def test_cli_unknown_task(zoo_dir):
    r = _cli("eval", str(zoo_dir / "base"), "--tasks", "zoo_addd")
    assert r.returncode == 2 and "did you mean zoo_add" in r.stderr and "Traceback" not in r.stderr
