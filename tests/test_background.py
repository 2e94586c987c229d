"""Background work's records: history compares them as a set; export still ranks the winner first."""

from __future__ import annotations

from evomerge.runs.export import ranked_candidates
from evomerge.runs.folder import history


def rec(kind, g, i, h, fit, **kw):
    return {"type": kind, "generation": g, "index": i, "recipe_hash": h, "fitness": fit, "status": "ok", **kw}


def test_history_puts_background_records_in_their_own_section():
    gen0 = {"type": "generation", "generation": 0}
    a = [rec("candidate", 0, 1, "b", 0.9), rec("candidate", 0, 0, "a", 0.5), gen0,
         rec("rescore", 0, 1, "b", 0.4, worker="w1"), rec("candidate", 1, 0, "c", 0.95),
         rec("test", 0, 1, "b", 0.3), {"type": "final", "recipe_hash": "c"}]
    b = [rec("candidate", 0, 0, "a", 0.5), rec("candidate", 0, 1, "b", 0.9), rec("rescore", 0, 1, "b", 0.4, worker="w0"),
         gen0, rec("test", 0, 1, "b", 0.3), rec("candidate", 1, 0, "c", 0.95), {"type": "final", "recipe_hash": "c"}]
    assert history(a) == history(b)
    assert [r["type"] for r in history(a)] == ["candidate", "candidate", "generation", "candidate", "final",
                                               "rescore", "test"]
    # a candidate in another generation's block is a different history
    c = [b[0], b[1], b[2], b[5], gen0, b[4], b[6]]
    assert history(c) != history(a)


def test_export_ranks_the_winner_first_among_background_rescores(tmp_path):
    """A recipe re-scored in the background that later left the top-k does not outrank the winner."""

    def rec(kind, g, i, h, fit):
        return {"type": kind, "generation": g, "index": i, "recipe_hash": h, "fitness": fit, "status": "ok"}

    records = [rec("candidate", 0, 0, "a", 0.5), rec("candidate", 0, 1, "b", 0.9), rec("rescore", 0, 0, "a", 0.7),
               rec("candidate", 1, 0, "c", 0.95), rec("rescore", 0, 1, "b", 0.4), rec("rescore", 1, 0, "c", 0.6),
               {"type": "final", "recipe_hash": "c", "fitness": 0.6, "generation": 1, "index": 0}]
    assert [r["recipe_hash"] for r in ranked_candidates(records)] == ["c", "a", "b"]
