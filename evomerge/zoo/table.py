"""The zoo table: every zoo model and the plain merges, scored on one split.

Plain merges are built by evomerge's merge engine from mergekit-style recipes (the same code path
as ``evomerge merge``), and scored in memory by the same evaluator as ``evomerge eval``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from evomerge.evaluation.evaluator import LmEvalEvaluator, TaskResult
from evomerge.models.folders import load_causal_lm, load_tokenizer
from evomerge.zoo.build import read_manifest


def plain_merge_recipes(zoo_dir: str | Path) -> dict[str, dict]:
    """mergekit-format recipes of the plain merges that a search must beat."""
    zoo_dir = Path(zoo_dir)
    m = read_manifest(zoo_dir)
    base = str(zoo_dir / m["base"])
    specs = [str(zoo_dir / m["models"][s]["path"]) for s in m["specialists"]]

    def with_base(method: str, **params) -> dict:
        return {"merge_method": method, "base_model": base, "dtype": "float32", "mask_seed": 0,
                "models": [{"model": s, "parameters": dict(params)} for s in specs]}

    recipes = {"uniform average": {"merge_method": "linear", "dtype": "float32",
                                   "models": [{"model": s, "parameters": {"weight": 1.0}} for s in specs]}}
    for w in (0.5, 0.7, 1.0):
        recipes[f"task arithmetic w={w}"] = with_base("task_arithmetic", weight=w)
    recipes["TIES w=1 d=0.5"] = with_base("ties", weight=1.0, density=0.5)
    recipes["DARE w=1 drop=0.5"] = with_base("dare_linear", weight=1.0, density=0.5)
    return recipes


def method_merge_recipes(zoo_dir: str | Path) -> dict[str, dict]:
    """The zoo table's rows for the spherical and geometric methods (mergekit's defaults unless
    named): slerp and nuslerp of spec_rev and spec_sub, model stock, SCE, the Karcher mean, and
    evomerge's TSV-Merge, Iso-C and Iso-CTS with their papers' defaults."""
    zoo_dir = Path(zoo_dir)
    m = read_manifest(zoo_dir)
    base = str(zoo_dir / m["base"])
    specs = [str(zoo_dir / m["models"][s]["path"]) for s in m["specialists"]]
    rev, sub = (str(zoo_dir / m["models"][s]["path"]) for s in ("spec_rev", "spec_sub"))
    every = {"base_model": base, "dtype": "float32", "models": [{"model": s} for s in specs]}
    return {
        "SLERP spec_rev-spec_sub t=0.5": {
            "merge_method": "slerp", "base_model": rev, "dtype": "float32",
            "models": [{"model": sub}], "parameters": {"t": 0.5}},
        "NuSLERP spec_rev-spec_sub task vectors": {
            "merge_method": "nuslerp", "base_model": base, "dtype": "float32",
            "models": [{"model": s, "parameters": {"weight": 1.0}} for s in (rev, sub)]},
        "model stock": {"merge_method": "model_stock", **every},
        "SCE topk=1": {"merge_method": "sce", **every},
        "Karcher mean of the specialists": {
            "merge_method": "karcher", "dtype": "float32", "models": every["models"]},
        # evomerge's spectral methods with their papers' defaults (rank 1/T each, alpha 1;
        # Iso-CTS: 0.8 of the rank common)
        "TSV-Merge": {"merge_method": "tsv", **every},
        "Iso-C": {"merge_method": "iso_c", **every},
        "Iso-CTS": {"merge_method": "iso_cts", **every},
    }


def merged_model(recipe: dict, template: torch.nn.Module) -> torch.nn.Module:
    """Loads the merged tensors of ``recipe`` into ``template`` (a model of the same architecture)."""
    from evomerge.merge.engine import merge_state_dict
    from evomerge.recipes.parameter_space import Recipe

    state = merge_state_dict(Recipe.model_validate(recipe), device="cpu")
    template.load_state_dict(state, strict=True)
    return template


def zoo_scores(zoo_dir: str | Path, split: str = "test", batch_size: int = 64,
               limit: int | None = None, plain_merges: bool = True,
               evaluator: LmEvalEvaluator | None = None,
               rows: list[str] | None = None,
               lora: bool = False) -> dict[str, dict[str, TaskResult]]:
    """Scores of the zoo models and the plain merges; `rows`: only the rows whose name starts
    with one of these; `lora`: also the LoRA specialists and their plain merges (zoo/lora.py)."""
    zoo_dir = Path(zoo_dir)
    manifest = read_manifest(zoo_dir)
    evaluator = evaluator or LmEvalEvaluator(list(manifest["tasks"].values()), split=split, batch_size=batch_size)
    tok = load_tokenizer(zoo_dir / manifest["base"])

    def wanted(name: str) -> bool:
        return rows is None or any(name.startswith(r) for r in rows)

    scores = {}
    for name, entry in manifest["models"].items():
        if wanted(name):
            scores[name] = evaluator.evaluate(load_causal_lm(zoo_dir / entry["path"]), tok,
                                              limit=limit)
    if plain_merges:
        template = load_causal_lm(zoo_dir / manifest["base"])
        recipes = {**plain_merge_recipes(zoo_dir), **method_merge_recipes(zoo_dir)}
        if lora:
            from evomerge.zoo.lora_table import lora_table_recipes

            recipes.update(lora_table_recipes(zoo_dir))
        for name, recipe in recipes.items():
            if wanted(name):
                scores[name] = evaluator.evaluate(merged_model(recipe, template), tok,
                                                  limit=limit)
    return scores
