"""`dtype: auto` / `placement: auto` in a search config: the in-place merger's memory plan decides
them when the search starts (float32 before bfloat16, resident before stream), the choice is
frozen with the run, and a search that no plan fits is refused, naming the shortfall, before its
run folder exists. The machine's memory is the one thing set here (a smaller machine)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evomerge.core.errors import ConfigError
from evomerge.execution.registry import local_factory
from evomerge.merge.inplace import memory
from evomerge.runs.start import plan_search, run_search
from evomerge.search.config import SearchConfig
from evomerge.search.memory_plan import with_frozen_plan

SOURCES = ("add", "rev", "sub")


def _config(zoo_dir: Path, tmp: Path, **over) -> SearchConfig:
    data = {"models": [str(zoo_dir / f"spec_{s}") for s in SOURCES],
            "base_model": str(zoo_dir / "base"), "search_space": "ps_task_arithmetic",
            "tasks": [{"name": "zoo_add", "limit": 4}], "optimizer": {"popsize": 4},
            "budget": {"generations": 1}, "rescore_top_k": 1, "threads": 1,
            "run_dir": str(tmp / "run"), **over}
    return SearchConfig.from_dict(data)


def _needs(zoo_dir: Path, dtype: torch.dtype) -> int:
    """Host bytes of the resident plan on CPU at `dtype` (the formula under test's input)."""
    models = [str(zoo_dir / f"spec_{s}") for s in SOURCES]
    return memory.plan(models, str(zoo_dir / "base"), "task_arithmetic", dtype=dtype,
                       device="cpu").host_bytes


def _machine(monkeypatch, room: float) -> None:
    monkeypatch.setattr(memory, "memory_capacity", lambda device: room)


def test_placement_defaults_to_auto_and_dtype_auto_is_accepted(zoo_dir, tmp_path):
    cfg = _config(zoo_dir, tmp_path)
    assert (cfg.dtype, cfg.placement) == ("float32", "auto")
    with pytest.raises(ConfigError, match="placement"):
        _config(zoo_dir, tmp_path, placement="everywhere")
    assert _config(zoo_dir, tmp_path, dtype="auto").dtype == "auto"


@pytest.mark.parametrize("room, want", [
    ("float32", ("float32", "resident")),  # room for float32: the exact deltas
    ("between", ("bfloat16", "resident")),  # a byte short of float32: bfloat16
])
def test_auto_dtype_and_placement_are_the_plans_choice_at_search_start(zoo_dir, tmp_path, monkeypatch,
                                                                         room, want):
    f32, bf16 = _needs(zoo_dir, torch.float32), _needs(zoo_dir, torch.bfloat16)
    assert bf16 < f32
    _machine(monkeypatch, f32 if room == "float32" else f32 - 1)
    plan = plan_search(_config(zoo_dir, tmp_path, dtype="auto"), executor=local_factory())
    assert (plan.cfg.dtype, plan.cfg.placement) == want
    assert f"dtype: {want[0]}" in plan.cfg.to_yaml() and f"placement: {want[1]}" in plan.cfg.to_yaml()
    assert not (tmp_path / "run").exists()


def test_a_search_no_plan_fits_is_refused_naming_the_shortfall_before_its_run_folder(
        zoo_dir, tmp_path, monkeypatch, capsys):
    bf16 = _needs(zoo_dir, torch.bfloat16)
    room = bf16 // 2
    _machine(monkeypatch, room)
    with pytest.raises(ConfigError) as err:
        run_search(_config(zoo_dir, tmp_path, dtype="auto"), quiet=True)
    text = str(err.value)
    assert text.startswith("dtype/placement: no memory plan fits task_arithmetic over 3 inputs")
    assert "(bfloat16, resident)" in text and "on the CPU" in text
    assert f"{bf16 / 1e9:.1f} GB of host memory of {room / 1e9:.1f} GB" in text
    assert not (tmp_path / "run").exists()
    # a dtype the config fixes is the only one tried: float32 is refused where bfloat16 would fit
    _machine(monkeypatch, bf16)
    with pytest.raises(ConfigError, match=r"\(float32, resident\)"):
        run_search(_config(zoo_dir, tmp_path, dtype="float32"), quiet=True)
    assert not (tmp_path / "run").exists()


def test_the_in_place_merger_left_open_builds_with_the_plans_choice(zoo_dir, monkeypatch):
    from evomerge.merge.inplace.merger import InPlaceMerger

    models = [str(zoo_dir / f"spec_{s}") for s in SOURCES]
    _machine(monkeypatch, _needs(zoo_dir, torch.float32) - 1)
    merger = InPlaceMerger(models, str(zoo_dir / "base"), "task_arithmetic", dtype=None, placement=None)
    assert (merger.dtype, merger.placement) == (torch.bfloat16, "resident")
    assert next(merger.model.parameters()).dtype == torch.bfloat16
    _machine(monkeypatch, 1e3)
    with pytest.raises(ValueError, match="no memory plan fits"):
        InPlaceMerger(models, str(zoo_dir / "base"), "task_arithmetic", dtype=None, placement=None)


def test_a_resumed_config_left_open_takes_the_frozen_choice(zoo_dir, tmp_path):
    frozen = _config(zoo_dir, tmp_path, dtype="bfloat16", placement="resident")
    again = with_frozen_plan(_config(zoo_dir, tmp_path, dtype="auto"), frozen)
    assert again is not None and again.search_key() == frozen.search_key()
    fixed = with_frozen_plan(_config(zoo_dir, tmp_path, dtype="float32"), frozen)
    assert fixed is not None and fixed.dtype == "float32"  # a different choice stays: resume refuses it
