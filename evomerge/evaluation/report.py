"""Result tables: rich for the terminal, Markdown for the README."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from evomerge.evaluation.evaluator import TaskResult


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]

    def print(self) -> None:
        from rich.console import Console
        from rich.table import Table as RichTable

        key_value = not any(self.columns)  # a two-column list of facts: no header, left-aligned
        t = RichTable(title=self.title, show_header=not key_value)
        for i, c in enumerate(self.columns):
            t.add_column(c, justify="left" if i == 0 or key_value else "right")
        for r in self.rows:
            t.add_row(*r)
        Console(width=max(100, 12 * len(self.columns) + 30)).print(t)

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines)


def results_table(results: Mapping[str, Mapping[str, TaskResult]], title: str = "",
                  metric: str = "acc") -> Table:
    """One row per model, one column per task (``metric``; a generation task without it shows its
    ``exact_match``), plus the mean over tasks."""
    tasks: list[str] = []
    for per_task in results.values():
        tasks += [t for t in per_task if t not in tasks]
    rows = []
    for name, per_task in results.items():
        vals = [per_task[t].metrics.get(metric, per_task[t].metrics.get("exact_match")) if t in per_task else None
                for t in tasks]
        cells = [f"{v:.3f}" if v is not None else "-" for v in vals]
        present = [v for v in vals if v is not None]
        mean = f"{sum(present) / len(present):.3f}" if present else "-"
        rows.append([name, *cells, mean] if len(tasks) > 1 else [name, *cells])
    columns = ["model", *tasks, "mean"] if len(tasks) > 1 else ["model", *tasks]
    return Table(title, columns, rows)
