"""--quiet lines: one line per message, never wrapped at the console's width, brackets kept."""

from __future__ import annotations

from types import SimpleNamespace

from evomerge.runs.progress import Display


def test_quiet_lines_are_not_wrapped(capsys):
    d = Display(quiet=True, tasks=["zoo_add", "zoo_rev"])
    d.start(3, 8, [])
    best = SimpleNamespace(fitness=0.5, metrics={"zoo_add": {"acc": 0.25}, "zoo_rev": {"acc": 0.75}})
    d.generation(SimpleNamespace(generation=0, evaluations=8, median=0.125, max=0.5), best)
    d.message("racing stages [30, 100, None] " + "x" * 150)
    d.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("generation 0: evaluations 8, median 0.1250, max 0.5000, best 0.5000 (zoo_add 0.250")
    assert lines[0].endswith("zoo_rev 0.750)")
    assert lines[1] == "racing stages [30, 100, None] " + "x" * 150
    assert len(lines) == 2
