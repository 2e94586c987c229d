"""The zoo's block-expanded specialists (evomerge/zoo/blocks.py): the expanded base computes what
the base computes, a build trains the new blocks and nothing else and is cached by its key, and a
layer path runs several specialists' blocks in turn. The builds here are short (a few steps):
what the full build measures is in docs/dataflow.md (scripts/dfs_table.py --case blocks)."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from evomerge.core.errors import ZooError
from evomerge.merge.dataflow import assemble
from evomerge.models.folders import load_causal_lm, load_tokenizer
from evomerge.recipes.layer_path import PathRecipe
from evomerge.zoo.blocks import (
    BlockZooParams,
    blocks_cache_key,
    blocks_paths,
    build_block_zoo,
    expand,
    read_blocks_manifest,
)
from evomerge.zoo.skills import sample_items
from evomerge.zoo.train import encode

SHORT = BlockZooParams(threads=1, max_steps=6, eval_every=3, val_items=20, batch=16)


def _ids(zoo: Path) -> torch.Tensor:
    tok = load_tokenizer(zoo / "base")
    items = sample_items("rev", 8, seed=1) + sample_items("add", 8, seed=2)
    return encode(tok, items, 16)[0]


@pytest.fixture(scope="module")
def small_zoo(zoo_dir, tmp_path_factory) -> Path:
    """A copy of the zoo's manifest and base (the specialists are not needed) with a short block
    build in it."""
    zoo = tmp_path_factory.mktemp("zoo")
    shutil.copy(zoo_dir / "zoo.json", zoo / "zoo.json")
    shutil.copytree(zoo_dir / "base", zoo / "base")
    threads = torch.get_num_threads()
    try:
        build_block_zoo(zoo, SHORT, log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    return zoo


def test_the_expanded_base_computes_what_the_base_computes(zoo_dir):
    base = load_causal_lm(zoo_dir / "base")
    model = expand(base, at=2, n_blocks=2)
    assert model.config.num_hidden_layers == len(model.model.layers) == base.config.num_hidden_layers + 2
    assert [la.self_attn.layer_idx for la in model.model.layers] == list(range(6))
    ids = _ids(zoo_dir)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits,
                                   rtol=0, atol=1e-5)
    assert base.config.num_hidden_layers == 4  # the source model is untouched
    with pytest.raises(ZooError, match="at must be in 1..4"):
        expand(base, at=0, n_blocks=1)


def test_a_build_trains_only_the_new_blocks_and_is_cached(small_zoo):
    manifest = read_blocks_manifest(small_zoo)
    assert manifest["key"] == blocks_cache_key(small_zoo, SHORT)
    assert manifest["blocks"] == [3, 4]
    paths = blocks_paths(small_zoo)
    base = load_causal_lm(paths["base"]).state_dict()
    for name in ("spec_add", "spec_rev", "spec_sub"):
        spec = load_causal_lm(paths[name]).state_dict()
        assert spec.keys() == base.keys()
        changed = {k.split(".")[2] for k in spec if k.startswith("model.layers.")
                   and not torch.equal(spec[k], base[k])}
        assert changed == {"3", "4"}, name  # every other tensor is the base's, bit for bit
        assert all(torch.equal(spec[k], base[k]) for k in spec if not k.startswith("model.layers."))
        assert manifest["models"][name]["steps"] > 0
    stamp = (small_zoo / "blocks" / "blocks.json").stat().st_mtime_ns
    said: list[str] = []
    build_block_zoo(small_zoo, SHORT, log=said.append)
    assert "up to date" in said[0]
    assert (small_zoo / "blocks" / "blocks.json").stat().st_mtime_ns == stamp


def _blocks_change(model, ids: torch.Tensor) -> float:
    """|h_out - h_in| / |h_in| across the new blocks (layers 3-4)."""
    seen = {}
    model.model.layers[3].register_forward_pre_hook(
        lambda m, a, kw: seen.__setitem__("in", a[0] if a else kw["hidden_states"]), with_kwargs=True)
    model.model.layers[4].register_forward_hook(
        lambda m, a, kw, out: seen.__setitem__("out", out[0] if isinstance(out, tuple) else out),
        with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids)
    return float((seen["out"] - seen["in"]).norm() / seen["in"].norm())


def test_the_identity_penalty_keeps_the_blocks_closer_to_the_identity(small_zoo, tmp_path):
    """On the base's own corpus, the blocks trained with the penalty change the hidden state less
    than blocks trained the same way without it."""
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    shutil.copy(small_zoo / "zoo.json", zoo / "zoo.json")
    (zoo / "base").symlink_to(small_zoo / "base")
    free = BlockZooParams(threads=1, max_steps=30, eval_every=100, val_items=20, batch=16, identity=0.0)
    held = replace(free, identity=5.0)
    tok = load_tokenizer(small_zoo / "base")
    items = sample_items("rev", 32, seed=3, restricted=True) + sample_items("add", 32, seed=4, restricted=True)
    ids = encode(tok, items, 16)[0]
    change = {}
    for params in (free, held):
        build_block_zoo(zoo, params, log=lambda *_: None)
        change[params.identity] = _blocks_change(load_causal_lm(blocks_paths(zoo)["spec_sub"]), ids)
    assert change[5.0] < change[0.0]


def test_a_layer_path_runs_every_specialists_blocks_in_turn(small_zoo):
    paths = blocks_paths(small_zoo)
    names = [str(paths[n]) for n in ("spec_add", "spec_rev", "spec_sub")]
    models = {n: load_causal_lm(n) for n in names}
    steps = [(names[0], i) for i in range(5)] + [(names[1], 3), (names[1], 4)] + \
            [(names[2], i) for i in (3, 4, 5)]
    recipe = PathRecipe.from_dict({"path": [{"model": m, "layer": i} for m, i in steps]})
    path_model = assemble(recipe, models)
    by_hand = load_causal_lm(small_zoo / "base")  # the stack, assembled by hand
    by_hand.model.layers = torch.nn.ModuleList([models[m].model.layers[i] for m, i in steps])
    by_hand.config.num_hidden_layers = len(steps)
    if getattr(by_hand.config, "layer_types", None) is not None:
        by_hand.config.layer_types = by_hand.config.layer_types[:1] * len(steps)
    ids = _ids(small_zoo)
    with torch.no_grad():
        torch.testing.assert_close(path_model(input_ids=ids).logits,  # no cache: the hand-built stack
                                   by_hand(input_ids=ids, use_cache=False).logits)  # repeats layer_idx
    assert path_model.config.num_hidden_layers == len(steps)


def test_a_zoo_without_blocks_names_the_command_that_builds_them(tmp_path):
    (tmp_path / "zoo.json").write_text('{"key": "x"}')
    with pytest.raises(ZooError, match="evomerge zoo --out .* --blocks"):
        read_blocks_manifest(tmp_path)
