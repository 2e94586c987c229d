"""Regenerates the zoo's lm-eval tasks and data in evals/ (deterministic; committed)."""

from pathlib import Path

from evomerge.zoo.gen_tasks import write_gen_tasks
from evomerge.zoo.tasks import write_eval_data

if __name__ == "__main__":
    evals = Path(__file__).resolve().parent.parent / "evals"
    for p in write_eval_data(evals) + write_gen_tasks(evals):
        print(p.relative_to(evals.parent))
