"""The catalogue of bad inputs: each is answered through the CLI with its message, never a traceback.

Every case runs `evomerge ...` through the CLI entry point and checks the exit code, the message
on standard error, and that nothing was left behind or lost where that matters.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from merge_helpers import save_model, tiny_config

from evomerge.cli.main import main

pytestmark = pytest.mark.slow
REPO_EVALS_DIR = Path(__file__).resolve().parent.parent / "evals"


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


def search_config(zoo_dir: Path, tmp: Path, **over) -> dict:
    cfg = {"models": [str(zoo_dir / f"spec_{s}") for s in ("add", "rev", "sub")],
           "base_model": str(zoo_dir / "base"), "search_space": "ps_task_arithmetic",
           "tasks": [{"name": "zoo_add", "limit": 12}, {"name": "zoo_rev", "limit": 12}],
           "optimizer": {"popsize": 4}, "budget": {"generations": 1}, "rescore_top_k": 1, "threads": 1,
           "run_dir": str(tmp / "run")}
    cfg.update(over)
    return cfg


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


@pytest.fixture(scope="module")
def finished(zoo_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finished")
    cfg = write_yaml(tmp / "c.yml", search_config(zoo_dir, tmp))
    assert main(["search", str(cfg), "--quiet"]) == 0
    return tmp / "run"


# ------------------------------------------------------------------ search configs
def test_config_not_yaml(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "search", write_yaml(tmp_path / "c.yml", "models: [a\n"))
    assert rc == 2 and "not valid YAML" in err


def test_unknown_key_suggests_nearest(zoo_dir, tmp_path, capsys):
    cfg = search_config(zoo_dir, tmp_path)
    cfg["bugdet"] = cfg.pop("budget")
    rc, _, err = run_cli(capsys, "search", write_yaml(tmp_path / "c.yml", cfg))
    assert rc == 2 and "bugdet: unknown key (did you mean 'budget'?)" in err


def test_missing_model_folder(zoo_dir, tmp_path, capsys):
    cfg = search_config(zoo_dir, tmp_path, models=[str(zoo_dir / "spec_add"), str(tmp_path / "gone")])
    rc, _, err = run_cli(capsys, "search", write_yaml(tmp_path / "c.yml", cfg))
    assert rc == 2 and f"models.1: model folder '{tmp_path / 'gone'}' does not exist" in err
    assert not (tmp_path / "run").exists()


def test_no_base_model_for_task_arithmetic(zoo_dir, tmp_path, capsys):
    cfg = search_config(zoo_dir, tmp_path)
    del cfg["base_model"]
    rc, _, err = run_cli(capsys, "search", write_yaml(tmp_path / "c.yml", cfg))
    assert rc == 2 and "base_model: method 'task_arithmetic' (search_space) needs a base model" in err


def test_unknown_task_and_metric(zoo_dir, tmp_path, capsys):
    cfg = search_config(zoo_dir, tmp_path, tasks=[{"name": "zoo_ad"}])
    rc, _, err = run_cli(capsys, "search", write_yaml(tmp_path / "c.yml", cfg))
    assert rc == 2 and "unknown lm-eval task 'zoo_ad' (did you mean zoo_add" in err
    cfg = search_config(zoo_dir, tmp_path, tasks=[{"name": "zoo_add", "metric": "exact_match"}])
    rc, _, err = run_cli(capsys, "search", write_yaml(tmp_path / "c.yml", cfg))
    assert rc == 2 and "task 'zoo_add' has no metric 'exact_match' (it has acc" in err


def test_trust_remote_code_needed_but_not_allowed(zoo_dir, tmp_path, capsys):
    custom = tmp_path / "custom"
    shutil.copytree(zoo_dir / "spec_add", custom)
    config = json.loads((custom / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomLM"}
    (custom / "config.json").write_text(json.dumps(config))
    cfg = search_config(zoo_dir, tmp_path, models=[str(custom), str(zoo_dir / "spec_rev")])
    rc, _, err = run_cli(capsys, "search", write_yaml(tmp_path / "c.yml", cfg))
    assert rc == 2 and "needs its own Python code (auto_map in config.json); set trust_remote_code" in err
    rc, _, err = run_cli(capsys, "eval", custom, "--limit", "2")
    assert rc == 2 and "pass --trust-remote-code only if you trust that code" in err


def test_weights_that_make_every_candidate_nan(zoo_dir, tmp_path, capsys):
    nan_model = tmp_path / "nan"
    shutil.copytree(zoo_dir / "spec_add", nan_model)
    from safetensors.torch import load_file, save_file

    st = load_file(nan_model / "model.safetensors")
    st["model.norm.weight"] = torch.full_like(st["model.norm.weight"], float("nan"))
    save_file(st, nan_model / "model.safetensors", metadata={"format": "pt"})
    cfg = search_config(zoo_dir, tmp_path, models=[str(nan_model), str(zoo_dir / "spec_rev")])
    rc, _, err = run_cli(capsys, "search", write_yaml(tmp_path / "c.yml", cfg), "--quiet")
    assert rc == 2 and "every candidate failed" in err
    reasons = {json.loads(line)["reason"] for line in (tmp_path / "run/log.jsonl").read_text().splitlines()
               if json.loads(line)["type"] == "candidate"}
    assert reasons == {"non-finite merged weights in model.norm.weight"}


# ------------------------------------------------------------------ model folders
def test_pickled_weights_only(zoo_dir, tmp_path, capsys):
    pickled = tmp_path / "pickled"
    shutil.copytree(zoo_dir / "spec_add", pickled)
    from safetensors.torch import load_file

    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    rc, _, err = run_cli(capsys, "eval", pickled, "--limit", "2")
    assert rc == 2 and "only pickled weights" in err and "--allow-pickle" in err
    recipe = write_yaml(tmp_path / "r.yml", {"merge_method": "linear", "models": [
        {"model": str(pickled), "parameters": {"weight": 1.0}}, {"model": str(zoo_dir / "spec_rev"),
                                                                 "parameters": {"weight": 1.0}}]})
    rc, _, err = run_cli(capsys, "merge", recipe, tmp_path / "out")
    assert rc == 2 and "pickled weights" in err and "--allow-pickle" in err


def broken_weights(zoo_dir: Path, folder: Path, kind: str) -> Path:
    """A copy of spec_add whose model.safetensors is cut in half, or not safetensors at all."""
    shutil.copytree(zoo_dir / "spec_add", folder)
    weights = folder / "model.safetensors"
    if kind == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    else:
        weights.write_bytes(b"<html>404 Not Found</html>\n" * 40)
    return weights


BROKEN = {"truncated": r"is truncated: its tensors need \d+ bytes, the file has \d+",
          "garbage": "is not a safetensors file"}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_safetensors_in_a_merge_recipe(zoo_dir, tmp_path, capsys, kind):
    weights = broken_weights(zoo_dir, tmp_path / "broken", kind)
    recipe = write_yaml(tmp_path / "r.yml", {"merge_method": "task_arithmetic",
                                             "base_model": str(zoo_dir / "base"), "models": [
        {"model": str(tmp_path / "broken"), "parameters": {"weight": 1.0}}]})
    rc, _, err = run_cli(capsys, "merge", recipe, tmp_path / "out")
    assert rc == 2 and re.search(f"^error: {re.escape(str(weights))} {BROKEN[kind]}", err), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_safetensors_in_a_search_config(zoo_dir, tmp_path, capsys, kind):
    weights = broken_weights(zoo_dir, tmp_path / "broken", kind)
    cfg = search_config(zoo_dir, tmp_path, models=[str(zoo_dir / "spec_rev"), str(tmp_path / "broken")])
    rc, _, err = run_cli(capsys, "search", write_yaml(tmp_path / "c.yml", cfg))
    assert rc == 2 and re.search(f"models\\.1: {re.escape(str(weights))} {BROKEN[kind]}", err), err
    assert not (tmp_path / "run").exists()


def test_not_a_causal_lm(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", "architectures": ["ViTModel"]}))
    rc, _, err = run_cli(capsys, "eval", tmp_path)
    assert rc == 2 and "is not a causal language model" in err


@pytest.mark.parametrize("other,message", [
    (dict(arch="qwen2"), "different architectures"),
    (dict(layers=3), "different layer counts"),
    (dict(hidden=32), "different hidden sizes"),
])
def test_mismatched_models(tmp_path, capsys, other, message):
    a = save_model(tmp_path / "a", tiny_config("llama"), seed=1)
    b = save_model(tmp_path / "b", tiny_config(**{"arch": "llama", **other}), seed=2)
    recipe = write_yaml(tmp_path / "r.yml", {"merge_method": "task_arithmetic", "base_model": str(a),
                                             "models": [{"model": str(b), "parameters": {"weight": 1.0}}]})
    rc, _, err = run_cli(capsys, "merge", recipe, tmp_path / "out")
    assert rc == 2 and message in err and not (tmp_path / "out").exists()


def test_mismatched_tokenizers(tmp_path, capsys):
    from evomerge.zoo.tokenizer import build_tokenizer

    a = save_model(tmp_path / "a", tiny_config("llama"), seed=1)
    tok = build_tokenizer()
    tok.eos_token = "<|assistant|>"
    b = save_model(tmp_path / "b", tiny_config("llama"), seed=2, tokenizer=tok)
    recipe = write_yaml(tmp_path / "r.yml", {"merge_method": "task_arithmetic", "base_model": str(a),
                                             "models": [{"model": str(b), "parameters": {"weight": 1.0}}]})
    rc, _, err = run_cli(capsys, "merge", recipe, tmp_path / "out")
    assert rc == 2 and "different tokenizers" in err and "tokenizer_source" in err


def test_no_base_model_in_a_recipe(zoo_dir, tmp_path, capsys):
    recipe = write_yaml(tmp_path / "r.yml", {"merge_method": "ties", "models": [
        {"model": str(zoo_dir / "spec_add"), "parameters": {"weight": 1.0, "density": 0.5}}]})
    rc, _, err = run_cli(capsys, "merge", recipe, tmp_path / "out")
    assert rc == 2 and "needs a base_model" in err


def test_existing_output_folder_without_force(zoo_dir, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    recipe = write_yaml(tmp_path / "r.yml", {"merge_method": "linear", "models": [
        {"model": str(zoo_dir / "spec_add"), "parameters": {"weight": 1.0}}]})
    rc, _, err = run_cli(capsys, "merge", recipe, tmp_path / "out")
    assert rc == 2 and "exists; pass --force" in err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


# ------------------------------------------------------------------ run folders
def test_not_a_run_folder(tmp_path, capsys):
    for cmd in (["status", tmp_path], ["export", tmp_path], ["search", "--resume", tmp_path],
                ["materialize", tmp_path, "--out", tmp_path / "m"]):
        rc, _, err = run_cli(capsys, *cmd)
        assert rc == 2 and "is not a run folder (no config.yaml)" in err, cmd
    (tmp_path / "plain").write_text("")
    for cmd in (["status", tmp_path / "plain"], ["export", tmp_path / "plain"],
                ["search", "--resume", tmp_path / "plain"], ["materialize", tmp_path / "plain", "--out", tmp_path / "m"]):
        rc, _, err = run_cli(capsys, *cmd)
        assert rc == 2 and f"'{tmp_path / 'plain'}' is a file, not a run folder" in err, cmd
        assert "does not exist" not in err


def test_materialized_folder_has_the_modes_of_mkdir(finished, tmp_path, capsys):
    import os
    import stat

    old = os.umask(0o022)
    try:
        rc, _, _ = run_cli(capsys, "materialize", finished, "--out", tmp_path / "m", "--no-test")
    finally:
        os.umask(old)
    assert rc == 0
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "m").iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes


def test_run_folder_locked_by_a_live_search(finished, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom evomerge.runs.folder import RunFolder\n"
                               "RunFolder.open(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)",
                               str(finished)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        rc, _, err = run_cli(capsys, "search", "--resume", finished)
        assert rc == 2 and "is locked by a live search (pid" in err
    finally:
        holder.kill()
        holder.wait()


def test_resume_of_a_finished_run_says_so(finished, capsys):
    n = len((finished / "log.jsonl").read_text().splitlines())
    rc, _, err = run_cli(capsys, "search", "--resume", finished, "--quiet")
    assert rc == 0 and "this run is finished" in err
    assert len((finished / "log.jsonl").read_text().splitlines()) == n


def test_export_of_a_run_with_no_evaluations(finished, tmp_path, capsys):
    from evomerge.runs.folder import RunFolder

    RunFolder.create(tmp_path / "fresh", (finished / "config.yaml").read_text()).close()
    rc, _, err = run_cli(capsys, "export", tmp_path / "fresh")
    assert rc == 2 and "has no successful evaluations yet: nothing to export" in err


def test_materialize_refuses_an_existing_folder(finished, tmp_path, capsys):
    (tmp_path / "m").mkdir()
    rc, _, err = run_cli(capsys, "materialize", finished, "--out", tmp_path / "m")
    assert rc == 2 and "exists; pass --force" in err


def test_disk_full_during_materialize_leaves_nothing_partial(finished, tmp_path, capsys, monkeypatch):
    import evomerge.merge.engine as engine

    old = tmp_path / "m"
    old.mkdir()
    (old / "keep.txt").write_text("previous model")

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "m.partial"))

    monkeypatch.setattr(engine, "write_durable", full_disk)
    rc, _, err = run_cli(capsys, "materialize", finished, "--out", old, "--force", "--no-test")
    assert rc == 1 and "No space left on device" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"], "no staging or partial folder left behind"
    assert (old / "keep.txt").read_text() == "previous model"


# ------------------------------------------------------------------ search: retries, hints, run_dir
def test_a_search_that_failed_loading_models_can_be_retried(zoo_dir, tmp_path, capsys, monkeypatch):
    import evomerge.evaluation.trial as trial
    from evomerge.core.errors import MergeError

    def fail_loading(cfg):  # the config checks pass; loading the sources fails (a full disk, say)
        raise MergeError(f"{cfg.models[0]}: cannot read the weights")

    monkeypatch.setattr(trial, "make_builder", fail_loading)
    cfg = write_yaml(tmp_path / "c.yml", search_config(zoo_dir, tmp_path))
    rc, _, first = run_cli(capsys, "search", cfg, "--quiet")
    assert rc == 2 and "cannot read the weights" in first and (tmp_path / "run" / "config.yaml").is_file()
    assert not (tmp_path / "run" / "lock").exists()
    rc, _, err = run_cli(capsys, "search", cfg, "--quiet")  # the same config: starts over, fails the same way
    assert rc == 2 and "already holds a search" not in err and err == first
    other = write_yaml(tmp_path / "d.yml", search_config(zoo_dir, tmp_path, models=[str(zoo_dir / "spec_add"),
                                                                                    str(zoo_dir / "spec_sub")]))
    rc, _, err = run_cli(capsys, "search", other, "--resume", tmp_path / "run")
    assert rc == 2 and "differs from the run's frozen config in models;" in err
    assert f"it has no evaluations yet, so `evomerge search CONFIG --run-dir {tmp_path / 'run'}`" in err
    rc, _, err = run_cli(capsys, "search", other, "--quiet")  # another config, nothing evaluated: starts over
    assert rc == 2 and "already holds a search" not in err
    assert str(zoo_dir / "spec_sub") in (tmp_path / "run" / "config.yaml").read_text()


def test_resume_with_another_config_says_what_to_do(finished, zoo_dir, tmp_path, capsys):
    cfg = search_config(zoo_dir, tmp_path, seed=7)
    rc, _, err = run_cli(capsys, "search", write_yaml(tmp_path / "c.yml", cfg), "--resume", finished)
    assert rc == 2 and "differs from the run's frozen config in seed" in err
    assert "choose another run_dir (--run-dir), or delete" in err
    rc, _, err = run_cli(capsys, "search", write_yaml(tmp_path / "c.yml", dict(cfg, run_dir=str(finished))))
    assert rc == 2 and "already holds a search" in err and f"evomerge search --resume {finished}" in err
    assert "delete the folder or choose another run_dir (--run-dir)" in err


def test_search_hints_name_config_keys(zoo_dir, tmp_path, capsys):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    pickled = tmp_path / "pickled"
    shutil.copytree(zoo_dir / "spec_add", pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    cfg = search_config(zoo_dir, tmp_path, models=[str(pickled), str(zoo_dir / "spec_rev")])
    rc, _, err = run_cli(capsys, "search", write_yaml(tmp_path / "c.yml", cfg))
    assert rc == 2 and "models.0:" in err and "set allow_pickle: true in the search config" in err
    assert "--allow-pickle" not in err and not (tmp_path / "run").exists()

    other_tok = tmp_path / "other_tok"
    shutil.copytree(zoo_dir / "spec_rev", other_tok)
    tok = AutoTokenizer.from_pretrained(other_tok)
    tok.eos_token = "<|assistant|>"
    tok.save_pretrained(other_tok)
    cfg = search_config(zoo_dir, tmp_path, models=[str(zoo_dir / "spec_add"), str(other_tok)])
    rc, _, err = run_cli(capsys, "search", write_yaml(tmp_path / "c.yml", cfg))
    assert rc == 2 and "models.1:" in err and "different tokenizers" in err
    assert "in the recipe" not in err and "has no tokenizer_source" in err and not (tmp_path / "run").exists()


def test_run_dir_that_is_a_file(zoo_dir, tmp_path, capsys):
    (tmp_path / "f").write_text("")
    cfg = write_yaml(tmp_path / "c.yml", search_config(zoo_dir, tmp_path, run_dir=str(tmp_path / "f")))
    rc, _, err = run_cli(capsys, "search", cfg)
    assert rc == 2 and f"run_dir (--run-dir) '{tmp_path / 'f'}' is a file, not a folder" in err
    rc, _, err = run_cli(capsys, "search", cfg, "--run-dir", tmp_path / "f" / "sub")
    assert rc == 2 and f"run_dir (--run-dir) '{tmp_path / 'f' / 'sub'}': cannot create it" in err


# ------------------------------------------------------------------ refused before the run folder (#33)
# Each case below was, before #33, a traceback, a failure only after the run folder existed, a
# silent acceptance or a hang. Tiny models with the zoo's tokenizer: no zoo build needed.
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    from merge_helpers import model_family

    base, ft1, ft2 = model_family(tmp_path_factory.mktemp("tiny"), n=2)
    return {"base": base, "ft1": ft1, "ft2": ft2}


@pytest.fixture(scope="module")
def vllm_tiny(tmp_path_factory) -> dict[str, Path]:
    """As ``tiny``, with a head size vLLM's CPU build runs (32): its own refusal of head size 8
    would otherwise come first (tests/test_families_defects.py tests that one)."""
    from merge_helpers import model_family

    base, ft1, ft2 = model_family(tmp_path_factory.mktemp("vllm_tiny"), n=2, hidden=64)
    return {"base": base, "ft1": ft1, "ft2": ft2}


def tiny_config_dict(tiny, tmp: Path, **over) -> dict:
    cfg = {"models": [str(tiny["ft1"]), str(tiny["ft2"])], "base_model": str(tiny["base"]),
           "search_space": "ps_task_arithmetic", "tasks": [{"name": "zoo_add", "limit": 4}],
           "optimizer": {"popsize": 2}, "budget": {"generations": 1}, "rescore_top_k": 1, "threads": 1,
           "study": None, "run_dir": str(tmp / "run")}
    cfg.update(over)
    return cfg


def refused(capsys, tmp: Path, cfg: dict, *extra: str) -> str:
    """`evomerge search` on ``cfg``: exit code 2, one error line, no run folder; the message."""
    rc, _, err = run_cli(capsys, "search", write_yaml(tmp / "c.yml", cfg), "--quiet", *extra)
    assert rc == 2, err
    assert not (tmp / "run").exists(), "refused after the run folder was created"
    return err


def test_task_filter_that_does_not_compile(tiny, tmp_path, capsys, monkeypatch):
    tasks = tmp_path / "tasks"
    shutil.copytree(REPO_EVALS_DIR, tasks, ignore=shutil.ignore_patterns("*.yaml"))
    text = (REPO_EVALS_DIR / "zoo_add_gen.yaml").read_text().replace("task: zoo_add_gen", "task: my_gen")
    (tasks / "my_gen.yaml").write_text(re.sub(r"regex_pattern: .*", 'regex_pattern: "([0-9"', text))
    monkeypatch.setenv("EVOMERGE_TASKS", str(tasks))
    err = refused(capsys, tmp_path, tiny_config_dict(tiny, tmp_path, tasks=[{"name": "my_gen", "metric": "exact_match",
                                                                             "limit": 4}]))
    assert "tasks.0: task 'my_gen': its filter 'extract'" in err and "regex_pattern" in err
    assert "unterminated character set" in err


@pytest.mark.parametrize("evaluator,message", [
    ({"max_model_len": 1}, "evaluator.max_model_len: 1 leaves no room for a prompt: at least 2"),
    ({"max_model_len": 1_000_000_000}, "evaluator.max_model_len: 1000000000 is longer than the model's 32 positions"),
    ({"kv_cache_gib": 4000}, "evaluator.kv_cache_gib: 4000 GiB of KV cache, but this machine has"),
    ({"block_size": 16}, "evaluator.block_size: 16 tokens, but vLLM's CPU attention takes multiples of 32 only"),
])
def test_vllm_limits_against_the_model_and_the_machine(vllm_tiny, tmp_path, capsys, evaluator, message):
    pytest.importorskip("vllm")
    err = refused(capsys, tmp_path, tiny_config_dict(vllm_tiny, tmp_path, evaluator={"backend": "vllm", **evaluator}))
    assert message in err


def test_vllm_context_shorter_than_a_generation_budget(vllm_tiny, tmp_path, capsys):
    pytest.importorskip("vllm")
    cfg = tiny_config_dict(vllm_tiny, tmp_path, evaluator={"backend": "vllm", "max_model_len": 8},
                           tasks=[{"name": "zoo_add_gen", "metric": "exact_match", "limit": 4}])
    assert "evaluator.max_model_len: 8 leaves no room for a prompt: at least 9" in refused(capsys, tmp_path, cfg)


@pytest.mark.parametrize("gen_kwargs,message", [
    ({"max_gen_tokz": 4}, "tasks.0.gen_kwargs: unknown generation key 'max_gen_tokz' (did you mean 'max_gen_toks'?)"),
    ({"max_gen_toks": -3}, "tasks.0.gen_kwargs.max_gen_toks: the number of tokens to generate, a positive integer "
                           "(got -3)"),
    ({"temperature": -1.0}, "tasks.0.gen_kwargs.temperature: a finite number >= 0 (got -1.0)"),
])
def test_gen_kwargs_checked_against_the_backend(tiny, tmp_path, capsys, gen_kwargs, message):
    cfg = tiny_config_dict(tiny, tmp_path, tasks=[{"name": "zoo_add_gen", "metric": "exact_match", "limit": 4,
                                                   "gen_kwargs": gen_kwargs}])
    assert message in refused(capsys, tmp_path, cfg)


def test_the_same_model_listed_twice(tiny, tmp_path, capsys):
    cfg = tiny_config_dict(tiny, tmp_path, models=[str(tiny["ft1"]), str(tiny["ft2"]), str(tiny["ft1"]) + "/"])
    assert f"models.2: '{tiny['ft1']}/' is listed twice (also models.0)" in refused(capsys, tmp_path, cfg)


def test_an_infinite_space_bound_is_one_short_line(tiny, tmp_path, capsys):
    space = {"method": "task_arithmetic", "parameters": {"weight": {"low": 0.0, "high": float("inf")}}}
    err = refused(capsys, tmp_path, tiny_config_dict(tiny, tmp_path, search_space=space))
    assert "search_space.parameters.weight.high: Input should be a finite number" in err
    assert "nan" not in err and len(err.splitlines()) == 1 and len(err) < 200, err


def test_search_space_errors_are_the_spaces_own(tiny, tmp_path, capsys):
    space = {"method": "task_arithmetic", "parameters": {"weight": {"low": 0.0, "high": 1.0}}, "sigma": 0.1}
    err = refused(capsys, tmp_path, tiny_config_dict(tiny, tmp_path, search_space=space))
    assert "search_space.sigma: unknown key (did you mean 'sigma0'?)" in err
    assert "valid string" not in err


def test_irt_on_a_metric_outside_the_unit_interval(tiny, tmp_path, capsys):
    cfg = tiny_config_dict(tiny, tmp_path, tasks=[{"name": "zoo_add", "metric": "bleu"}], racing=None,
                           fitness={"estimator": "irt", "anchors": 4})
    assert ("tasks.0.metric: fitness.estimator irt needs a metric in [0, 1]" in refused(capsys, tmp_path, cfg))


@pytest.mark.parametrize("floors,message", [
    ({"values": {"zoo_add": 1.5}}, "floors.values.zoo_add: 1.5 lies outside the range [0, 1] of its metric acc"),
    ({"margin": float("nan")}, "floors.margin: Input should be a finite number"),
    ({"margin": 5.0}, "floors.margin: 5.0 is as wide as the whole range [0, 1] of the metric acc"),
    ({"base_scores": {"zoo_add": 0.3}}, "floors.base_scores: not set by hand"),
])
def test_floors_within_the_metrics_range(tiny, tmp_path, capsys, floors, message):
    assert message in refused(capsys, tmp_path, tiny_config_dict(tiny, tmp_path, floors=floors))


def test_base_scores_written_in_a_staged_config(tiny, tmp_path, capsys):
    # the staged (PS+DFS) config refuses the filled-in key as a single-stage one does: at the top
    # level (every stage's default) and in a stage
    stage = {k: v for k, v in tiny_config_dict(tiny, tmp_path).items() if k != "run_dir"}
    for where, cfg in (("", {"run_dir": str(tmp_path / "run"), "floors": {"base_scores": {"zoo_add": 0.3}},
                             "stages": [dict(stage, name="a")]}),
                       ("stages.1: ", {"run_dir": str(tmp_path / "run"),
                                       "stages": [dict(stage, name="a"),
                                                  dict(stage, name="b", floors={"base_scores": {"zoo_add": 0.3}})]})):
        assert f"{where}floors.base_scores: not set by hand" in refused(capsys, tmp_path, cfg)


def test_base_score_plus_margin_outside_the_metrics_range(tiny, tmp_path, capsys):
    # the tiny random models score below 0.5 on zoo_add: with a margin of -0.5 the floor lies below
    # 0 and every candidate meets it; refused once the base's scores are measured, before the run folder
    err = refused(capsys, tmp_path, tiny_config_dict(tiny, tmp_path, floors={"margin": -0.5}))
    assert re.search(r"floors.margin: -0.5 on the base model's score [0-9.]+ on task 'zoo_add' gives the floor "
                     r"-?[0-9.]+, outside the range \[0, 1\] of its metric acc", err), err


def test_unknown_field_in_adapter_config(tiny, tmp_path, capsys):
    from lora_helpers import edit_config, make_adapter

    adapter = make_adapter(tiny["base"], tmp_path / "adapter", seed=1, targets=("q_proj", "v_proj"))
    edit_config(adapter, lora_scale_boost=4.0)
    cfg = tiny_config_dict(tiny, tmp_path, models=[str(adapter), str(tiny["ft1"])])
    err = refused(capsys, tmp_path, cfg)
    assert "models.0:" in err and "has field(s) lora_scale_boost that peft" in err


def test_adapter_folder_without_its_config(tiny, tmp_path, capsys):
    from lora_helpers import make_adapter

    adapter = make_adapter(tiny["base"], tmp_path / "adapter", seed=1, targets=("q_proj",))
    (adapter / "adapter_config.json").unlink()
    err = refused(capsys, tmp_path, tiny_config_dict(tiny, tmp_path, models=[str(adapter), str(tiny["ft1"])]))
    assert "holds a PEFT adapter (adapter_model.safetensors) but has no adapter_config.json" in err


def test_more_workers_than_cpus(tiny, tmp_path, capsys):
    import os

    err = refused(capsys, tmp_path, tiny_config_dict(tiny, tmp_path), "--workers", "1000")
    assert f"--workers 1000: each worker takes 1 CPU (threads: 1), and the Ray started here has this machine's " \
           f"{os.cpu_count()}" in err
    import ray

    assert not ray.is_initialized()


def test_unreachable_ray_address(tiny, tmp_path, capsys):
    err = refused(capsys, tmp_path, tiny_config_dict(tiny, tmp_path), "--ray-address", "127.0.0.1:1")
    assert "--ray-address 127.0.0.1:1: nothing answers at 127.0.0.1:1 within 10 s" in err


def test_mirrors_that_can_never_work(tiny, tmp_path, capsys):
    pytest.importorskip("mlflow")
    (tmp_path / "file").write_text("")
    storage = f"sqlite:///{tmp_path / 'file' / 'optuna.db'}"
    err = refused(capsys, tmp_path, tiny_config_dict(tiny, tmp_path, study={"storage": storage}))
    assert f"study.storage (--study-storage) {storage}: {tmp_path / 'file'} is a file" in err
    err = refused(capsys, tmp_path, tiny_config_dict(tiny, tmp_path, tracking={"mlflow": {"uri": "bogus://x/y"}}))
    assert "tracking.mlflow.uri: MLflow has no tracking store for 'bogus://x/y'" in err


def test_dashboard_arguments(tmp_path, capsys):
    pytest.importorskip("optuna_dashboard")
    with pytest.raises(SystemExit) as e:
        main(["dashboard", str(tmp_path), "--port", "99999"])
    assert e.value.code == 2 and "99999 is not a TCP port (1 to 65535)" in capsys.readouterr().err
    rc, _, err = run_cli(capsys, "dashboard", tmp_path, "--storage", "not a url")
    assert rc == 2 and "--storage: 'not a url' is not a SQLAlchemy URL" in err


def test_dashboard_port_in_use_names_it(tiny, tmp_path, capsys):
    pytest.importorskip("optuna_dashboard")
    import socket

    from evomerge.runs.folder import RunFolder

    cfg = yaml.safe_dump(tiny_config_dict(tiny, tmp_path, study={}))
    RunFolder.create(tmp_path / "run", cfg).close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        rc, _, err = run_cli(capsys, "dashboard", tmp_path / "run", "--port", port)
    assert rc == 2 and f"cannot serve on 127.0.0.1:{port}: Address already in use" in err


# ------------------------------------------------------------------ integrity of the sources (#33)
@pytest.fixture(scope="module")
def lora_run(tiny, tmp_path_factory) -> dict[str, Path]:
    from lora_helpers import make_adapter

    tmp = tmp_path_factory.mktemp("lora_run")
    a1 = make_adapter(tiny["base"], tmp / "a1", seed=1, targets=("q_proj", "v_proj"), alpha=16)
    a2 = make_adapter(tiny["base"], tmp / "a2", seed=2, targets=("q_proj", "v_proj"), alpha=16)
    cfg = write_yaml(tmp / "c.yml", tiny_config_dict(tiny, tmp, models=[str(a1), str(a2)]))
    assert main(["search", str(cfg), "--quiet"]) == 0
    return {"run": tmp / "run", "a1": a1}


def test_a_changed_adapter_config_is_refused_by_materialize_and_resume(lora_run, tmp_path, capsys):
    config = lora_run["a1"] / "adapter_config.json"
    before = config.read_text()
    rc, _, _ = run_cli(capsys, "materialize", lora_run["run"], "--out", tmp_path / "m", "--no-test")
    assert rc == 0 and "adapter_config.json" in (tmp_path / "m" / "README.md").read_text()  # in the card's hashes
    config.write_text(before.replace('"lora_alpha": 16', '"lora_alpha": 64'))
    try:
        assert before != config.read_text()
        for cmd in (["materialize", lora_run["run"], "--out", tmp_path / "m2", "--no-test"],
                    ["search", "--resume", lora_run["run"], "--quiet"]):
            rc, _, err = run_cli(capsys, *cmd)
            assert rc == 2 and f"source models.0 '{lora_run['a1']}' is not the one the search scored: " \
                               f"{config} (changed)" in err, (cmd, err)
        assert not (tmp_path / "m2").exists()
    finally:
        config.write_text(before)


def test_materialize_hashes_each_source_file_once(lora_run, tmp_path, capsys, monkeypatch):
    """The check against sources.json hashes every source file; the card reuses those hashes
    instead of reading the sources a second time beside the merge."""
    from evomerge.merge import card
    from evomerge.models import fingerprint

    hashed: list[Path] = []
    sha256_file = fingerprint.sha256_file

    def counting(path, stop=None):
        hashed.append(Path(path))
        return sha256_file(path, stop)

    monkeypatch.setattr(fingerprint, "sha256_file", counting)
    monkeypatch.setattr(card, "sha256_file", counting)
    rc, _, _ = run_cli(capsys, "materialize", lora_run["run"], "--out", tmp_path / "m", "--no-test")
    monkeypatch.undo()
    recorded = {Path(f): h for files in json.loads((lora_run["run"] / "sources.json").read_text()).values()
                for f, h in files.items()}
    assert rc == 0 and sorted(hashed) == sorted(recorded)  # each once
    text = (tmp_path / "m" / "README.md").read_text()
    assert all(f"| {f.name} | `{h}` |" in text for f, h in recorded.items())


def test_a_changed_tokenizer_is_refused_by_resume(lora_run, tiny, capsys):
    tok = tiny["base"] / "tokenizer_config.json"
    before = tok.read_text()
    tok.write_text(before.replace("{", '{"model_max_length": 7, ', 1))
    try:
        rc, _, err = run_cli(capsys, "search", "--resume", lora_run["run"], "--quiet")
        assert rc == 2 and f"source base_model '{tiny['base']}'" in err and f"{tok} (changed)" in err
    finally:
        tok.write_text(before)


def test_materialize_removes_the_staging_folders_of_dead_runs(lora_run, tmp_path, capsys):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f".old.materializing-{int(done.stdout)}"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"partial")
    live_proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".other.materializing-{live_proc.pid}"
        live.mkdir()
        rc, _, _ = run_cli(capsys, "materialize", lora_run["run"], "--out", tmp_path / "m", "--no-test")
        assert rc == 0 and not dead.exists() and live.is_dir()
    finally:
        live_proc.kill()
        live_proc.wait()


def test_study_sync_storage_that_is_not_a_url(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "study", "sync", tmp_path, "--storage", "not a url")
    assert rc == 2 and "--storage: 'not a url' is not a SQLAlchemy URL" in err
