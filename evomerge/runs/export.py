"""Taking recipes out of a run folder: ranking, evomerge and mergekit YAML."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evomerge.core.errors import UsageError
from evomerge.evaluation.floors import floored_fitness
from evomerge.recipes.mergekit import mergekit_yaml  # noqa: F401  (re-exported)
from evomerge.recipes.parameter_space import Recipe
from evomerge.search import ranking
from evomerge.search.records import EvalRecord, RecordKind


@dataclass(frozen=True)
class FrontMember:
    """A Pareto-front member (pareto.json) picked by ``--weights``, with its weighted sum."""

    generation: int
    index: int
    recipe_hash: str
    genome: list[float]
    objectives: list[float]
    fitness: float
    metrics: dict[str, dict[str, float]]
    weighted: float


def ranked_candidates(records: list) -> list[EvalRecord]:
    """Distinct successful recipes of a run's records, best first (search.ranking)."""
    final = next((r for r in reversed(records) if r.type == RecordKind.FINAL), None)
    return ranking.ranked_candidates(records, final.recipe_hash if final else None)


def recipe_from_run(run_dir: str | Path, rank: int = 1) -> tuple[Recipe, EvalRecord]:
    """The rank-th best recipe of a run (1 = the winner) and the log record that scored it."""
    from evomerge.runs.folder import RunFolder, RunFolderError
    from evomerge.search.codecs.parameter import make_codec
    from evomerge.search.config import SearchConfig

    run = RunFolder.open(run_dir)
    ranked = ranked_candidates(run.records())
    if not ranked:
        raise RunFolderError(f"run {str(run_dir)!r} has no successful evaluations yet: nothing to export")
    if not 1 <= rank <= len(ranked):
        raise UsageError(f"--rank must be between 1 and {len(ranked)} (the run's distinct recipes), got {rank}")
    cfg = SearchConfig.from_dict(run.config_dict(), source=str(Path(run_dir) / "config.yaml"))
    record = ranked[rank - 1]
    recipe = make_codec(cfg).to_recipe(np.array(record.genome))
    if recipe.hash() != record.recipe_hash:
        raise RunFolderError(f"the genome of generation {record.generation}, candidate {record.index} no "
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
            raise UsageError(f"--weights: {part!r} is not TASK=NUMBER (e.g. --weights zoo_add=1,zoo_rev=0.5)") from None
    if not out:
        raise UsageError("--weights: give at least one TASK=NUMBER")
    return out


def pick_from_front(run_dir: str | Path, weights: dict[str, float]) -> tuple[Recipe, FrontMember]:
    """The Pareto-front member (pareto.json) with the largest weighted sum of its task metrics
    (tasks not named weigh 0; with `floors:` in the run's config, minus the floors' term; ties:
    the earliest candidate), and its front entry."""
    import json

    from evomerge.runs.folder import PARETO, RunFolder, RunFolderError
    from evomerge.search.codecs.parameter import make_codec
    from evomerge.search.config import SearchConfig

    run = RunFolder.open(run_dir)
    cfg = SearchConfig.from_dict(run.config_dict(), source=str(Path(run_dir) / "config.yaml"))
    tasks = [t.name for t in cfg.tasks]
    if not cfg.optimizer.multi_objective:
        raise UsageError(f"--weights picks from a Pareto front; run {str(run_dir)!r} is single-objective "
                         f"(optimizer {cfg.optimizer.name}): use --rank")
    unknown = [w for w in weights if w not in tasks]
    if unknown:
        raise UsageError(f"--weights: unknown task {', '.join(map(repr, unknown))}; the run's tasks are "
                         f"{', '.join(tasks)}")
    path = run.path / PARETO
    if not path.is_file():
        raise RunFolderError(f"run {str(run_dir)!r} has no Pareto front yet (no generation finished)")
    front = json.loads(path.read_text())["front"]
    if not front:
        raise RunFolderError(f"run {str(run_dir)!r}: the Pareto front is empty (every candidate failed)")
    w = [weights.get(t, 0.0) for t in tasks]
    # with floors in the config, a member below a floor pays for it (evaluation/floors.py)
    member = max(front, key=lambda m: (
        floored_fitness(sum(a * b for a, b in zip(w, m["objectives"], strict=True)), m["metrics"] or {},
                        cfg.tasks, cfg.floors), -m["generation"], -m["index"]))
    recipe = make_codec(cfg).to_recipe(np.array(member["genome"]))
    if recipe.hash() != member["recipe_hash"]:
        raise RunFolderError(f"the genome of generation {member['generation']}, candidate {member['index']} no "
                             "longer decodes to its logged recipe (the code or the source models changed)")
    weighted = sum(a * b for a, b in zip(w, member["objectives"], strict=True))
    return recipe, FrontMember(member["generation"], member["index"], member["recipe_hash"], member["genome"],
                               member["objectives"], member["fitness"], member["metrics"], weighted)


def describe(record: EvalRecord | FrontMember) -> str:
    if isinstance(record, FrontMember):
        objs = ", ".join(f"{v:.4f}" for v in record.objectives)
        return (f"generation {record.generation}, candidate {record.index}, Pareto member with objectives "
                f"({objs}), weighted sum {record.weighted:.4f}")
    kind = "full-dev fitness" if record.type == RecordKind.RESCORE else "search fitness"
    return f"generation {record.generation}, candidate {record.index}, {kind} {record.fitness:.4f}"
