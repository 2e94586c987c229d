"""Pareto dominance over maximized objectives (NSGA-II's front, `pareto.json`)."""

from __future__ import annotations


def dominates(a: list[float], b: list[float]) -> bool:
    """``a`` is at least as good as ``b`` in every objective and better in one (maximized)."""
    return all(x >= y for x, y in zip(a, b, strict=True)) and any(x > y for x, y in zip(a, b, strict=True))


def pareto_front(members: list[dict]) -> list[dict]:
    """The members (each with ``objectives``) that no other member dominates; of members with equal
    objectives only the first is kept."""
    front, seen = [], set()
    for m in members:
        v = tuple(m["objectives"])
        if v in seen or any(dominates(o["objectives"], m["objectives"]) for o in members):
            continue
        seen.add(v)
        front.append(m)
    return front
