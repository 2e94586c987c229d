"""evomerge: evolutionary model-merge optimizer."""

__version__ = "0.1.0"


def _installed_tasks() -> None:
    """An installed wheel's zoo tasks (evomerge/_data/evals, see setup.py) join $EVOMERGE_TASKS,
    where the evaluator looks beside the repository's evals/ (absent from a wheel). The evaluator
    could read evomerge.core.data.data_dir("evals") instead; then this goes."""
    import os
    from pathlib import Path

    here = Path(__file__).resolve().parent
    evals = here / "_data" / "evals"
    if not evals.is_dir() or (here.parent / "evals").is_dir():
        return
    extra = [p for p in os.environ.get("EVOMERGE_TASKS", "").split(os.pathsep) if p]
    if str(evals) not in extra:
        os.environ["EVOMERGE_TASKS"] = os.pathsep.join([*extra, str(evals)])


_installed_tasks()
