"""The run log's records, typed: what a search writes for each evaluation, generation and its end.

This module is the only one that turns records into JSON and back (``to_json`` / ``from_json``);
everything else reads attributes. The JSON form of each record is that of the first log format
(no key was renamed), so run folders written before these types existed read back unchanged.

    reference   the starting point (the space's x0), scored like a candidate (generation -1)
    candidate   one genome of a generation (with racing: one record per stage it reached)
    rescore     a top candidate re-scored on the full dev split (background work, the final pick)
    test        a would-be winner's test-split scores (reports only, never decisions)
    generation  a generation told to the optimizer: its best so far, median, the race's summary
    final       the winner after the last generation, with its test-split metrics
    irt         an IRT fit (``fitness: {estimator: irt}``): before the search (generation -1, with the
                anchors and the sources' scoring) and at each generation's end; resume loads it

The log's first line is a header that names the format version (``LOG_FORMAT``); a log without
one is format 1, the same records. A log from a newer format is refused (see ``check_header``).
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, fields
from enum import StrEnum
from typing import Any, Literal

from evomerge.core.errors import RunFolderError

LOG_FORMAT = 2  # 1: today's records without a header; 2: the same records after a header line


class RecordKind(StrEnum):
    """A log record's ``type`` (a str, so that the JSON form is unchanged). The only place the
    kinds are spelled: everything else compares against these members."""

    REFERENCE = "reference"
    CANDIDATE = "candidate"
    RESCORE = "rescore"
    TEST = "test"
    GENERATION = "generation"
    FINAL = "final"
    IRT = "irt"

    @property
    def evaluation(self) -> bool:
        """An `EvalRecord`: a recipe scored on dev items (the reference, a candidate, a re-score)."""
        return self in EVAL_KINDS

    @property
    def search_items(self) -> bool:
        """Items scored by the search's own evaluations (re-scoring, background work, is not counted,
        so that generation records do not depend on when it ran)."""
        return self in (RecordKind.REFERENCE, RecordKind.CANDIDATE, RecordKind.IRT)


EVAL_KINDS = (RecordKind.REFERENCE, RecordKind.CANDIDATE, RecordKind.RESCORE)
EvalKind = Literal[RecordKind.REFERENCE, RecordKind.CANDIDATE, RecordKind.RESCORE]
Metrics = dict[str, dict[str, float]]  # task -> metric -> value


@dataclass(frozen=True)
class EvalRecord:
    """One scored recipe: the starting point, a candidate (one racing stage of it) or a re-score."""

    type: EvalKind
    generation: int
    index: int
    genome: list[float]
    recipe_hash: str
    eval_key: str | None
    fitness: float
    status: str  # "ok" or "failed"
    reason: str | None
    metrics: Metrics
    items: dict[str, int]  # task -> items the fitness was computed on
    items_scored: dict[str, int]  # task -> items scored for this record (0 when served from reuse)
    cached_from: list[int] | None  # [generation, index] of the record a repeated recipe came from
    timings: dict[str, float]
    worker: str | None
    time: float
    stage: int | None = None  # racing: the stage of this record, and how many stages the race has
    stages: int | None = None
    items_file: str | None = None  # per-item scores in RUN_DIR/items/ (evaluation.items)
    items_key: str | None = None
    node: str | None = None  # the Ray node that scored it (Ray workers; absent in-process and in older logs)
    estimated: Metrics | None = None  # fitness.estimator irt: task -> metric -> IRT estimate on the whole split

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def depth(self) -> int:
        """The racing stage this score comes from (0 without racing): more items, more weight."""
        return self.stage or 0

    @property
    def last_stage(self) -> bool:
        """Scored on the race's last stage (always, without racing)."""
        return self.stage is None or self.stage == (self.stages or 1) - 1

    def metric(self, task: str, metric: str, default: float = math.nan) -> float:
        """The value the search used: the IRT estimate where there is one, else the measured metric."""
        est = (self.estimated or {}).get(task, {})
        return est[metric] if metric in est else self.metrics.get(task, {}).get(metric, default)


@dataclass(frozen=True)
class TestRecord:
    """Test-split scores of a recipe (reports only): ``fitness`` is None when a task has no test split."""

    __test__ = False  # not a pytest class

    generation: int
    index: int
    genome: list[float]
    recipe_hash: str
    fitness: float | None
    status: str
    reason: str | None
    metrics: Metrics
    timings: dict[str, float]
    worker: str | None
    time: float
    node: str | None = None
    type: Literal[RecordKind.TEST] = RecordKind.TEST


@dataclass(frozen=True)
class CandidateRef:
    generation: int
    index: int
    fitness: float


@dataclass(frozen=True)
class RaceSummary:
    """Per candidate of a racing generation: the value told, the last stage reached, its items."""

    told: list[float]
    stage: list[int]
    items: list[int]


@dataclass(frozen=True)
class GenerationRecord:
    generation: int
    popsize: int
    evaluations: int  # distinct candidates so far
    best: CandidateRef  # the best candidate so far (search.ranking)
    median: float
    max: float
    item_evaluations: int  # items scored by the search's own evaluations so far
    time: float
    elapsed_s: float | None = None  # search time so far, all sessions (a time budget's count)
    racing: RaceSummary | None = None
    steady: bool | None = None  # a steady-state engine's block (search/steady.py); None: a generation
    type: Literal[RecordKind.GENERATION] = RecordKind.GENERATION


@dataclass(frozen=True)
class FinalRecord:
    generations: int
    evaluations: int
    generation: int
    index: int
    recipe_hash: str
    fitness: float  # the winner's full-dev fitness
    metrics: Metrics
    test_metrics: Metrics
    time: float
    elapsed_s: float | None = None
    type: Literal[RecordKind.FINAL] = RecordKind.FINAL


@dataclass(frozen=True)
class IrtRecord:
    """An IRT fit (search/irt_fitness.py): its parameters in ``RUN_DIR/irt/<params_file>``, the hash
    of its inputs (the response matrices), and at generation -1 the anchors and the sources' items."""

    generation: int  # -1: before the search; g: after generation g (used from generation g + 1)
    params_file: str
    inputs: str  # sha256 of the fit's inputs: a replay recomputes and compares it
    rows: dict[str, int]  # task -> models (rows) the fit used
    anchors: dict[str, list[int]] | None  # task -> anchor items (generation -1 only)
    items_scored: dict[str, int]  # task -> items scored for this fit (the sources, generation -1)
    time: float
    type: Literal[RecordKind.IRT] = RecordKind.IRT


Record = EvalRecord | TestRecord | GenerationRecord | FinalRecord | IrtRecord
_OPTIONAL = {"stage", "stages", "items_file", "items_key", "racing", "elapsed_s", "node", "estimated", "steady"}  # left out of the JSON when None


def to_json(record: Record) -> dict[str, Any]:
    """The record as the log stores it (keys in field order, ``type`` first)."""
    data = asdict(record)
    out: dict[str, Any] = {"type": str(data.pop("type"))}
    for k, v in data.items():
        if not (k in _OPTIONAL and v is None):
            out[k] = v
    return out


def _build(cls, data: dict[str, Any], **nested):
    names = {f.name for f in fields(cls)}
    missing = [f.name for f in fields(cls) if f.name not in data and f.default is MISSING]
    if missing:
        raise RunFolderError(f"a {data.get('type')!r} record of the run log lacks {', '.join(missing)}: the log "
                             "was written by an older evomerge than this one reads, or edited; finish that "
                             "search with the evomerge that started it, or start a new one")
    kw = {k: v for k, v in data.items() if k in names}
    kw.update(nested)
    return cls(**kw)


def kind_of(data: dict[str, Any]) -> RecordKind | None:
    """The kind of a record's JSON form (None: not a record, the header say)."""
    try:
        return RecordKind(data.get("type"))
    except ValueError:
        return None


def from_json(data: dict[str, Any]) -> Record:
    """A log line's record; unknown keys (a newer minor field) are ignored, a missing one refused."""
    kind = kind_of(data)
    if kind is None:
        raise RunFolderError(f"unknown record type {data.get('type')!r} in the run log")
    data = {**data, "type": kind}
    if kind.evaluation:
        return _build(EvalRecord, data)
    if kind is RecordKind.TEST:
        return _build(TestRecord, data)
    if kind is RecordKind.GENERATION:
        race = data.get("racing")
        return _build(GenerationRecord, data, best=CandidateRef(**data["best"]),
                      racing=RaceSummary(**race) if race else None)
    if kind is RecordKind.FINAL:
        return _build(FinalRecord, data)
    return _build(IrtRecord, data)


def is_header(data: dict[str, Any]) -> bool:
    return data.get("type") == "header"


def header(version: str) -> dict[str, Any]:
    """The log's first line: its format, and the evomerge version that started the run."""
    return {"type": "header", "format": LOG_FORMAT, "evomerge": version}


def check_header(data: dict[str, Any]) -> None:
    fmt = data.get("format")
    if not isinstance(fmt, int) or fmt > LOG_FORMAT:
        raise RunFolderError(f"this run log has format {fmt!r}, written by evomerge {data.get('evomerge')}; "
                             f"this evomerge reads formats up to {LOG_FORMAT}: upgrade evomerge to resume it")
