"""Background work: what SearchBackground queues and logs, history's order-free section, and export's
ranking of re-scored recipes."""

from __future__ import annotations

from dataclasses import dataclass, field

from evomerge.evaluation.trial import TrialResult
from evomerge.runs.export import ranked_candidates
from evomerge.runs.folder import history
from evomerge.search.background import SearchBackground
from evomerge.search.jobs import TEST_KEY, EvalJob
from evomerge.search.ranking import top_candidates
from evomerge.search.records import EvalRecord, FinalRecord, TestRecord


def rec(kind, g, i, h, fit, **kw) -> EvalRecord:
    base = dict(type=kind, generation=g, index=i, genome=[float(g), float(i)], recipe_hash=h, eval_key="subset",
                fitness=fit, status="ok", reason=None, metrics={}, items={}, items_scored={}, cached_from=None,
                timings={}, worker="w0", time=0.0)
    return EvalRecord(**{**base, **kw})


def trec(g, i, h, fit) -> TestRecord:
    return TestRecord(g, i, [float(g), float(i)], h, fit, "ok", None, {}, {}, "w0", 0.0)


def final(h) -> FinalRecord:
    return FinalRecord(1, 3, 0, 0, h, 0.6, {}, {}, 0.0)


@dataclass
class Recipe:
    h: str

    def hash(self) -> str:
        return self.h


@dataclass
class FakeSearch:
    """The BackgroundHost side of a search: jobs name the recipe by the genome's candidate."""

    k: int = 2
    cache: dict = field(default_factory=dict)
    hashes: dict = field(default_factory=dict)  # (generation, index) -> recipe hash
    logged: list = field(default_factory=list)
    stops: int = 0

    def job(self, kind, generation, index, genome, subset_generation):
        return EvalJob(kind, generation, index, tuple(genome), Recipe(self.hashes[(generation, index)]), None,
                       "full-dev")

    def test_job(self, r):
        return EvalJob("test", r.generation, r.index, tuple(r.genome), Recipe(self.hashes[(r.generation, r.index)]),
                       {}, TEST_KEY)

    def cached(self, hit):
        return TrialResult(hit.recipe_hash, hit.fitness, hit.status, hit.reason, hit.metrics, hit.items)

    def log(self, job, res, hit):
        r = rec("rescore", job.generation, job.index, res.recipe_hash, res.fitness,
                cached_from=[hit.generation, hit.index] if hit else None)
        self.logged.append(r)
        return r

    def log_test(self, job, res):
        r = trec(job.generation, job.index, res.recipe_hash, res.fitness)
        self.logged.append(r)
        return r

    def top_candidates(self, records):
        return top_candidates(records, self.k)

    def check_stop(self):
        self.stops += 1


def test_background_rescores_the_top_k_then_tests_their_winner():
    search = FakeSearch()
    cands = {(0, 0): rec("candidate", 0, 0, "a", 0.5), (0, 1): rec("candidate", 0, 1, "b", 0.9),
             (0, 2): rec("candidate", 0, 2, "c", 0.7)}
    search.hashes = {k: r.recipe_hash for k, r in cands.items()}
    bg = SearchBackground(search, [])
    bg.plan(0, cands)
    first, second = bg.next(), bg.next()
    assert [(j.kind, j.recipe.hash()) for j in (first, second)] == [("rescore", "b"), ("rescore", "c")]
    assert bg.next() is None and bg.pending  # the test job waits for both re-scores
    bg.done(first, TrialResult("b", 0.6, "ok"))
    assert bg.next() is None
    bg.done(second, TrialResult("c", 0.8, "ok"))  # c wins on the full dev split
    test = bg.next()
    assert (test.kind, test.recipe.hash(), test.eval_key) == ("test", "c", TEST_KEY)
    bg.done(test, TrialResult("c", 0.75, "ok"))
    assert not bg.pending and bg.next() is None
    assert [(r.type, r.recipe_hash) for r in search.logged] == [("rescore", "b"), ("rescore", "c"), ("test", "c")]
    assert search.stops == 3  # a stop request is honoured after each logged background result
    # a later generation whose top-k is unchanged queues nothing new
    bg.plan(1, cands)
    assert bg.next() is None and not bg.pending


def test_background_serves_a_cached_full_dev_score_and_resumes_from_the_log():
    search = FakeSearch(k=1)
    cands = {(0, 0): rec("candidate", 0, 0, "a", 0.9)}
    search.hashes = {(0, 0): "a"}
    hit = rec("reference", -1, 0, "a", 0.85, eval_key="full-dev")
    search.cache[("a", "full-dev")] = hit
    bg = SearchBackground(search, [])
    bg.plan(0, cands)
    test = bg.next()  # the re-score came from the cache: straight to the test job
    assert test.kind == "test" and search.logged[0].cached_from == [-1, 0]
    # a resumed search whose log holds the re-score and the test queues nothing
    resumed = SearchBackground(search, [rec("rescore", 0, 0, "a", 0.85), trec(0, 0, "a", 0.8)])
    resumed.plan(0, cands)
    assert resumed.next() is None and not resumed.pending


def test_history_puts_background_records_in_their_own_section():
    gen0 = {"type": "generation", "generation": 0}
    a = [rec("candidate", 0, 1, "b", 0.9), rec("candidate", 0, 0, "a", 0.5), gen0,
         rec("rescore", 0, 1, "b", 0.4, worker="w1"), rec("candidate", 1, 0, "c", 0.95),
         trec(0, 1, "b", 0.3), final("c")]
    b = [rec("candidate", 0, 0, "a", 0.5), rec("candidate", 0, 1, "b", 0.9), rec("rescore", 0, 1, "b", 0.4),
         gen0, trec(0, 1, "b", 0.3), rec("candidate", 1, 0, "c", 0.95), final("c")]
    assert history(a) == history(b)
    assert [r["type"] for r in history(a)] == ["candidate", "candidate", "generation", "candidate", "final",
                                               "rescore", "test"]
    # a candidate in another generation's block is a different history
    c = [b[0], b[1], b[2], b[5], gen0, b[4], b[6]]
    assert history(c) != history(a)


def test_export_ranks_the_winner_first_among_background_rescores():
    """A recipe re-scored in the background that later left the top-k does not outrank the winner."""
    records = [rec("candidate", 0, 0, "a", 0.5), rec("candidate", 0, 1, "b", 0.9), rec("rescore", 0, 0, "a", 0.7),
               rec("candidate", 1, 0, "c", 0.95), rec("rescore", 0, 1, "b", 0.4), rec("rescore", 1, 0, "c", 0.6),
               final("c")]
    assert [r.recipe_hash for r in ranked_candidates(records)] == ["c", "a", "b"]
    # without a final record the re-scores rank by their score, then the rest by standing
    assert [r.recipe_hash for r in ranked_candidates(records[:-1])] == ["a", "c", "b"]
