"""Taking recipes out of a run folder: ranking, evomerge and mergekit YAML."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from evomerge.recipes.mergekit import mergekit_yaml  # noqa: F401  (re-exported)
from evomerge.recipes.parameter_space import Recipe


def ranked_candidates(records: list[dict]) -> list[dict]:
    """Distinct successful recipes, best first: those re-scored on the full dev split (by that
    score; the winner first), then the others by their search (subset) fitness (with racing: by
    the last stage reached, then that stage's score)."""
    rescored = {r["recipe_hash"]: r for r in records if r["type"] == "rescore" and r["status"] == "ok"}
    best_by_hash: dict[str, dict] = {}

    def depth(r: dict) -> int:  # racing: a later stage's score (more items) outranks an earlier one
        return r.get("stage") or 0

    for r in records:
        if r["type"] == "candidate" and r["status"] == "ok":
            h = r["recipe_hash"]
            if h not in best_by_hash or (depth(r), r["fitness"]) > (depth(best_by_hash[h]), best_by_hash[h]["fitness"]):
                best_by_hash[h] = r
    top = sorted(rescored.values(), key=lambda r: (-r["fitness"], r["generation"], r["index"]))
    # The winner is the best of the *final* top-k; background work may have re-scored recipes that
    # left the top-k later (docs/ray.md), which rank after it.
    final = next((r for r in reversed(records) if r["type"] == "final"), None)
    if final is not None:
        top.sort(key=lambda r: r["recipe_hash"] != final["recipe_hash"])
    rest = sorted((r for h, r in best_by_hash.items() if h not in rescored),
                  key=lambda r: (-depth(r), -r["fitness"], r["generation"], r["index"]))
    return top + rest


def recipe_from_run(run_dir: str | Path, rank: int = 1) -> tuple[Recipe, dict]:
    """The rank-th best recipe of a run (1 = the winner) and the log record that scored it."""
    from evomerge.runs.folder import RunFolder, RunFolderError
    from evomerge.search.codecs.parameter import make_codec
    from evomerge.search.config import SearchConfig

    run = RunFolder.open(run_dir)
    ranked = ranked_candidates(run.records())
    if not ranked:
        raise RunFolderError(f"run {str(run_dir)!r} has no successful evaluations yet: nothing to export")
    if not 1 <= rank <= len(ranked):
        raise ValueError(f"--rank must be between 1 and {len(ranked)} (the run's distinct recipes), got {rank}")
    cfg = SearchConfig.from_dict(run.config_dict(), source=str(Path(run_dir) / "config.yaml"))
    record = ranked[rank - 1]
    recipe = make_codec(cfg).to_recipe(np.array(record["genome"]))
    if recipe.hash() != record["recipe_hash"]:
        raise RunFolderError(f"the genome of generation {record['generation']}, candidate {record['index']} no "
                             "longer decodes to its logged recipe (the code or the source models changed)")
    return recipe, record


def parse_weights(text: str) -> dict[str, float]:
    """``zoo_add=1,zoo_rev=0.5`` -> {"zoo_add": 1.0, "zoo_rev": 0.5}."""
    out: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, eq, value = part.partition("=")
        try:
            if not eq:
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--weights: {part!r} is not TASK=NUMBER (e.g. --weights zoo_add=1,zoo_rev=0.5)") from None
    if not out:
        raise ValueError("--weights: give at least one TASK=NUMBER")
    return out


def pick_from_front(run_dir: str | Path, weights: dict[str, float]) -> tuple[Recipe, dict]:
    """The Pareto-front member (pareto.json) with the largest weighted sum of its task metrics
    (tasks not named weigh 0; ties: the earliest candidate), and its front entry."""
    import json

    from evomerge.runs.folder import PARETO, RunFolder, RunFolderError
    from evomerge.search.codecs.parameter import make_codec
    from evomerge.search.config import SearchConfig

    run = RunFolder.open(run_dir)
    cfg = SearchConfig.from_dict(run.config_dict(), source=str(Path(run_dir) / "config.yaml"))
    tasks = [t.name for t in cfg.tasks]
    if cfg.optimizer.name != "nsga2":
        raise ValueError(f"--weights picks from a Pareto front; run {str(run_dir)!r} is single-objective "
                         f"(optimizer {cfg.optimizer.name}): use --rank")
    unknown = [w for w in weights if w not in tasks]
    if unknown:
        raise ValueError(f"--weights: unknown task {', '.join(map(repr, unknown))}; the run's tasks are "
                         f"{', '.join(tasks)}")
    path = run.path / PARETO
    if not path.is_file():
        raise RunFolderError(f"run {str(run_dir)!r} has no Pareto front yet (no generation finished)")
    front = json.loads(path.read_text())["front"]
    if not front:
        raise RunFolderError(f"run {str(run_dir)!r}: the Pareto front is empty (every candidate failed)")
    w = [weights.get(t, 0.0) for t in tasks]
    member = max(front, key=lambda m: (sum(a * b for a, b in zip(w, m["objectives"], strict=True)),
                                       -m["generation"], -m["index"]))
    recipe = make_codec(cfg).to_recipe(np.array(member["genome"]))
    if recipe.hash() != member["recipe_hash"]:
        raise RunFolderError(f"the genome of generation {member['generation']}, candidate {member['index']} no "
                             "longer decodes to its logged recipe (the code or the source models changed)")
    member = dict(member, weighted=sum(a * b for a, b in zip(w, member["objectives"], strict=True)))
    return recipe, member


def describe(record: dict) -> str:
    if "objectives" in record:
        objs = ", ".join(f"{v:.4f}" for v in record["objectives"])
        return (f"generation {record['generation']}, candidate {record['index']}, Pareto member with objectives "
                f"({objs}), weighted sum {record['weighted']:.4f}")
    kind = "full-dev fitness" if record["type"] == "rescore" else "search fitness"
    return f"generation {record['generation']}, candidate {record['index']}, {kind} {record['fitness']:.4f}"
