"""`evomerge merge` end to end on the zoo specialists."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evomerge.cli.main import main


def evomerge(*argv: str) -> int:
    return main(list(argv))


def ties_yaml(zoo: Path, path: Path) -> Path:
    path.write_text(f"""\
merge_method: ties
base_model: {zoo / 'base'}
models:
  - model: {zoo / 'spec_add'}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {zoo / 'spec_rev'}
    parameters: {{weight: [0.5, 1.0], density: 0.5}}
  - model: {zoo / 'spec_sub'}
    parameters: {{weight: 1.0, density: 0.5}}
dtype: float32
""")
    return path


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_merge_zoo_reloads_and_is_byte_identical(tmp_path, zoo_dir, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = ties_yaml(zoo_dir, tmp_path / "ties.yml")
    assert evomerge("merge", str(cfg), str(tmp_path / "a"), "--max-shard-size", "1MB") == 0
    assert evomerge("merge", str(cfg), str(tmp_path / "b"), "--max-shard-size", "1MB") == 0
    a, b = files(tmp_path / "a"), files(tmp_path / "b")
    assert a == b
    assert "model.safetensors.index.json" in a and "model-00001-of-00003.safetensors" in a
    for name in ("config.json", "tokenizer.json", "generation_config.json", "README.md"):
        assert name in a
    card = a["README.md"].decode()
    assert "merge_method: ties" in card and "| model.safetensors |" in card
    assert "- torch " in card and "- transformers " in card and "- safetensors " in card
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    tok = AutoTokenizer.from_pretrained(tmp_path / "a")
    ids = tok("12+34=", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_merged_folder_has_the_mode_of_mkdir(tmp_path, zoo_dir, capsys):
    import os
    import stat

    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - {{model: {zoo_dir / 'spec_add'}, parameters: {{weight: 1.0}}}}\n")
    old = os.umask(0o022)
    try:
        assert main(["merge", str(recipe), str(tmp_path / "out")]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "out" / "config.json").stat().st_mode) == 0o644


def test_existing_out_dir_refused_without_force(tmp_path, zoo_dir, capsys):
    cfg = ties_yaml(zoo_dir, tmp_path / "ties.yml")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    assert evomerge("merge", str(cfg), str(out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "exists" in err and "--force" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert (out / "keep.txt").read_text() == "old"
    assert evomerge("merge", str(cfg), str(out), "--force") == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_finite_check_passes_a_sum_that_overflows_and_refuses_nan_and_inf(dtype):
    """The check's one-pass sum: finite elements whose sum overflows still pass; a NaN, an
    infinity, or infinities of both signs (a NaN sum) anywhere are refused."""
    from evomerge.merge.engine import _check_finite
    from evomerge.models.sources import MergeError

    big = torch.finfo(dtype).max
    ok = torch.full((1000,), big, dtype=dtype)
    _check_finite("w", ok)
    _check_finite("w", -ok)
    for bad in ([float("nan")], [float("inf")], [float("-inf")], [float("inf"), float("-inf")]):
        t = ok.clone()
        t[500:500 + len(bad)] = torch.tensor(bad, dtype=dtype)
        with pytest.raises(MergeError, match="non-finite"):
            _check_finite("w", t)


@pytest.mark.parametrize("existing", [False, True])
def test_non_finite_merge_is_refused_naming_the_tensor(tmp_path, zoo_dir, capsys, existing):
    """A recipe that overflows one tensor (float32 max is 3.4e38): an error naming that tensor,
    and nothing written, neither a partial folder nor a staging folder; a previous folder stays."""
    bad = "model.layers.1.post_attention_layernorm.weight"  # weights near 1: 2 * 3e38 overflows
    cfg = tmp_path / "overflow.yml"
    cfg.write_text(f"""\
merge_method: linear
models:
  - model: {zoo_dir / 'spec_add'}
    parameters:
      weight: [{{filter: {bad}, value: 3.0e+38}}, {{value: 0.5}}]
  - model: {zoo_dir / 'spec_rev'}
    parameters:
      weight: [{{filter: {bad}, value: 3.0e+38}}, {{value: 0.5}}]
parameters: {{normalize: false}}
dtype: float32
""")
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "keep.txt").write_text("old")
    args = ("merge", str(cfg), str(out), *(["--force"] if existing else []))
    assert evomerge(*args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: the merged tensor has non-finite values")
    assert "Traceback" not in err and err.count("\n") == 1
    if existing:
        assert files(out) == {"keep.txt": b"old"}
    else:
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["overflow.yml", *(["out"] if existing else [])])


def test_failed_merge_keeps_the_old_folder(tmp_path, zoo_dir, monkeypatch, capsys):
    from evomerge.merge import engine

    cfg = ties_yaml(zoo_dir, tmp_path / "ties.yml")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")

    def broken(*args, **kwargs):
        yield "model.embed_tokens.weight", torch.zeros(2)
        raise ValueError("disk on fire")

    monkeypatch.setattr(engine, "iter_merged", broken)
    assert evomerge("merge", str(cfg), str(out), "--force") == 2
    assert "disk on fire" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "ties.yml"]


@pytest.mark.parametrize("text,message", [
    ("merge_method: nope\nmodels: [{model: x}]", "merge_method: unknown merge_method 'nope'"),
    ("merge_method: linear\nmodels: [{model: /no/such/model, parameters: {weight: 1}}]",
     "model folder '/no/such/model' does not exist"),
])
def test_errors_are_one_line(tmp_path, capsys, text, message):
    cfg = tmp_path / "r.yml"
    cfg.write_text(text)
    assert evomerge("merge", str(cfg), str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_help_mentions_usage(capsys):
    with pytest.raises(SystemExit):
        evomerge("merge", "--help")
    out = capsys.readouterr().out
    assert "CONFIG.yml" in out and "--force" in out and "--dtype" in out and "example" in out


def test_merged_zoo_folder_scores_with_evomerge_eval(zoo_dir, tmp_path, capsys):
    """`evomerge merge` -> `evomerge eval` gives the scores of the same merge built in memory."""
    import json

    import yaml

    from evomerge.evaluation.evaluator import LmEvalEvaluator
    from evomerge.models.folders import load_causal_lm, load_tokenizer
    from evomerge.zoo.table import merged_model, plain_merge_recipes

    recipe = plain_merge_recipes(zoo_dir)["task arithmetic w=0.7"]
    cfg = tmp_path / "ta.yml"
    cfg.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "merged"
    assert evomerge("merge", str(cfg), str(out)) == 0
    capsys.readouterr()
    assert evomerge("eval", str(out), "--limit", "100", "--batch-size", "16", "--json") == 0
    from_cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    in_memory = LmEvalEvaluator(["zoo_add", "zoo_rev", "zoo_sub"], split="test", batch_size=16).evaluate(
        merged_model(recipe, load_causal_lm(zoo_dir / "base")), load_tokenizer(zoo_dir / "base"), limit=100)
    assert {t: v["metrics"] for t, v in from_cli.items()} == {t: r.metrics for t, r in in_memory.items()}
    assert 0.3 < from_cli["zoo_rev"]["metrics"]["acc"] < 0.95  # a real merge, not a copy of a source
