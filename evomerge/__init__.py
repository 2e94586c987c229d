"""evomerge: evolutionary model-merge optimizer.

The names a script needs, in data-flow order (each imported on first use, so that
``import evomerge`` stays fast and loads no torch or lm-eval until a name is used)::

    import evomerge as em

    cfg = em.SearchConfig.load("configs/quickstart.yaml")      # config -> search space, tasks
    outcome = em.run_search(cfg, run_dir="runs/quickstart")      # genome -> recipe -> merge -> fitness
    status = em.read_status("runs/quickstart")                   # the run folder's records
    recipe, record = em.recipe_from_run("runs/quickstart")       # the winner's recipe
    em.materialize("runs/quickstart", "winner")                  # a Hugging Face folder
    em.write_model(em.load_recipe("best.yaml"), "merged")        # any recipe, built
    em.evaluate_model_dir("winner", ["zoo_add"], split="test")   # lm-eval scores

Every error a user's input can cause is an `EvomergeError`. The layers and where each concept
lives: docs/architecture.md.
"""

from __future__ import annotations

import importlib
from typing import Any

from evomerge.core.version import __version__

# public name -> the module that defines it
_API = {
    "EvomergeError": "evomerge.core.errors",
    "ConfigError": "evomerge.core.errors",
    "Recipe": "evomerge.recipes.parameter_space",
    "PathRecipe": "evomerge.recipes.layer_path",
    "load_recipe": "evomerge.recipes.layer_path",
    "write_model": "evomerge.merge.writer",
    "evaluate_model_dir": "evomerge.evaluation.evaluator",
    "SearchConfig": "evomerge.search.config",
    "SearchOutcome": "evomerge.search.loop",
    "run_search": "evomerge.runs.start",
    "read_status": "evomerge.runs.status",
    "recipe_from_run": "evomerge.runs.export",
    "materialize": "evomerge.runs.materialize",
    "RunFolder": "evomerge.runs.folder",
}

__all__ = ["__version__", *_API]

def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'evomerge' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
