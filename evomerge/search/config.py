"""The search config: one frozen, validated description of a search (``evomerge search CONFIG``).

Validation happens in three steps, all before any model weights are read:
1. ``SearchConfig.load``: YAML syntax, unknown keys, types, ranges (pydantic, errors name the field);
2. ``check_sources``: model folders exist and agree (config.json only), the granularity divides
   the layer count;
3. ``check_tasks``: task names and metrics exist (lm-eval task configs, no model).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from evomerge.core.data import data_dir
from evomerge.core.errors import ConfigError
from evomerge.core.validation import format_errors
from evomerge.evaluation.backends import EvaluatorConfig
from evomerge.evaluation.floors import FloorsConfig
from evomerge.evaluation.tasks import TaskConfig
from evomerge.search.fitness_config import FitnessConfig, check_fitness, irt_requested
from evomerge.search.optimizers import OPTIMIZERS, REGISTRY, Batch, OptimizerKind
from evomerge.search.optimizers.cma_options import AUTO_SEPARABLE_DIM, PLAIN_LEVELS, Restarts
from evomerge.search.optimizers.m2n2 import M2N2Options
from evomerge.search.spaces.dataflow import DfsSpace
from evomerge.search.spaces.parameter import SearchSpace

# the repository's search_spaces/, or the copy an installed wheel carries (core/data.py)
REPO_SPACES = data_dir("search_spaces")

# Upper bounds on the sizes a config may ask for: far above any search this tool is meant for, low
# enough that a typo (popsize: 1000000000) is refused at load time instead of exhausting memory.
MAX_POPSIZE = 10_000
MAX_GENERATIONS = 1_000_000
MAX_EVALUATIONS = 10_000_000
MAX_TIME_LIMIT_S = 366 * 24 * 3600.0  # a year
MAX_ITEMS = 1_000_000  # tasks[].limit and racing stage sizes: items per task
MAX_STAGES = 10
MAX_RESCORE_TOP_K = 1_000
MAX_BATCH_SIZE = 65_536
MAX_THREADS = 1_024
MAX_FEWSHOT = 1_000


def _space_kind(v: Any) -> str:
    if isinstance(v, dict):
        return "DfsSpace" if v.get("kind") == "dfs" else "SearchSpace"
    return type(v).__name__


# The config's ``search_space``: a name or path (str), or a space inline: a parameter-space (PS)
# space, or a data-flow space (``kind: dfs``); the kind picks the codec and the candidate builder
# (codec.make_codec, trial.make_builder). Tagged, so that an inline space's errors are its own, not
# preceded by "Input should be a valid string" from the str branch.
SpaceOrName = Annotated[Annotated[str, Tag("str")] | Annotated[SearchSpace, Tag("SearchSpace")]
                        | Annotated[DfsSpace, Tag("DfsSpace")], Discriminator(_space_kind)]

# Keys the search fills in and freezes with the run; a user's config that sets them is refused.
FILLED_IN = {("floors", "base_scores"): "the base model's scores, measured when the search starts "
             "(set floors.values to give floors by hand)"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RestartsConfig(_Strict):
    """CMA-ES restarts (docs/search.md, "CMA-ES options"): pycma's IPOP / BIPOP rules."""

    kind: Literal["ipop", "bipop"] = Field(Restarts.kind, description="ipop: each restart doubles the population; "
                                           "bipop: large-population runs interleaved with small local ones")
    max: int = Field(Restarts.max, ge=1, le=20, description="restarts with a larger population (BIPOP's small runs not counted)")
    incpopsize: float = Field(Restarts.incpopsize, gt=1, le=10, description="population factor per large restart")
    tolfun: float | None = Field(Restarts.tolfun, gt=0, description="pycma's tolfun (a run stops when the fitness range "
                                 "falls below it); default pycma's 1e-11")
    tolx: float | None = Field(Restarts.tolx, gt=0, description="pycma's tolx (a run stops when every step falls below "
                               "it); default pycma's 1e-11")
    patience: int | None = Field(Restarts.patience, ge=1, le=MAX_GENERATIONS, description="a run also stops after this many "
                                 "generations without a better fitness")
    start: Literal["random", "x0"] = Field(Restarts.start, description="where a restart begins: a uniform random "
                                           "point of the cube (the optimizer's own stream) or the first run's start")



class OptimizerConfig(_Strict):
    name: str = Field("cma", description=f"one of {', '.join(OPTIMIZERS)}")
    popsize: int | None = Field(None, ge=2, le=MAX_POPSIZE, description="population per generation (default: 4 + 3 ln n)")
    sigma0: float | None = Field(None, gt=0, le=1, description="initial step (default: the space's sigma0)")
    sampler: str = Field("CmaEsSampler", description="with name: optuna, an Optuna sampler class name")
    sampler_args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the sampler")
    # cma only (docs/search.md, "CMA-ES options")
    separable: bool | Literal["auto"] = Field(False, description="cma: a diagonal covariance (pycma's "
                                              f"CMA_diagonal); auto: when the genome has more than {AUTO_SEPARABLE_DIM} genes")
    bounds: Literal["transform", "penalty"] = Field("transform", description="cma: pycma's BoundTransform "
                                                    "or BoundPenalty for the unit cube")
    restarts: RestartsConfig | None = Field(None, description="cma: IPOP/BIPOP restarts; null: none")
    start: Literal["x0", "best_plain"] = Field("x0", description="cma: x0 (the space's start) or best_plain "
                                               "(generation 0 scores plain merges, CMA-ES starts at the best)")
    plain_levels: tuple[float, ...] = Field(PLAIN_LEVELS, min_length=1, max_length=20, description="start: "
                                            "best_plain: positions in [0, 1] that every per-model gene takes at once")
    m2n2: M2N2Options | None = Field(None, description="m2n2: archive, competition, attraction (docs/search.md)")

    @property
    def m2n2_options(self) -> M2N2Options:
        return self.m2n2 or M2N2Options()

    @field_validator("plain_levels")
    @classmethod
    def _levels(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 <= x <= 1 for x in v):
            raise ValueError("plain_levels are positions in the unit cube: each in [0, 1]")
        return v

    def cma_options(self) -> dict:
        """The keyword options of optimizers.cma.CMAES (the seeds are added by the loop)."""
        r = self.restarts
        return {"separable": self.separable, "bounds": self.bounds,
                "restarts": None if r is None else Restarts(**r.model_dump())}

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {v!r}; choose one of {', '.join(OPTIMIZERS)}")
        return v

    @property
    def kind(self) -> OptimizerKind:
        """What the optimizer declares (search/optimizers: its objectives, its batch rule)."""
        return REGISTRY[self.name]

    @property
    def multi_objective(self) -> bool:
        return self.kind.multi_objective

    @model_validator(mode="after")
    def _sampler(self) -> OptimizerConfig:
        if self.multi_objective:
            if self.sampler != "CmaEsSampler":
                raise ValueError(f"{self.name} is Optuna's NSGAIISampler; sampler does not apply (sampler_args do)")
        elif self.kind.options == "optuna":
            from evomerge.search.optimizers.optuna import sampler_class

            sampler_class(self.sampler)
        elif self.sampler != "CmaEsSampler" or self.sampler_args:
            raise ValueError(f"sampler and sampler_args apply to name: optuna, not {self.name!r}")
        if self.m2n2 is not None and self.name != "m2n2":
            raise ValueError(f"m2n2 applies to name: m2n2, not {self.name!r}")
        if self.name != "cma":
            # non-default values only: a frozen config.yaml writes every field, defaults included
            given = [k for k in ("separable", "bounds", "restarts", "start", "plain_levels")
                     if getattr(self, k) != type(self).model_fields[k].default]
            if given:
                raise ValueError(f"{', '.join(given)} apply to name: cma, not {self.name!r}")
        return self


class RacingConfig(_Strict):
    """Successive halving within each generation (docs/search.md, "Racing")."""

    stages: list[int | None] = Field(description="items per task at each stage, increasing; every candidate "
                                     "is scored on the first stage, the better `keep` fraction goes on to the "
                                     "next; null (last only) means the whole split")
    keep: float = Field(0.25, gt=0, lt=1, description="fraction of a stage's candidates promoted to the next "
                        "(rounded up, at least one)")

    @field_validator("stages")
    @classmethod
    def _increasing(cls, v: list[int | None]) -> list[int | None]:
        if len(v) < 2:
            raise ValueError("racing needs at least two stages")
        if len(v) > MAX_STAGES:
            raise ValueError(f"at most {MAX_STAGES} stages (got {len(v)})")
        if any(n is None for n in v[:-1]):
            raise ValueError("only the last stage may be null (the whole split)")
        sizes = [n for n in v if n is not None]
        if any(n < 1 for n in sizes):
            raise ValueError(f"stage sizes must be >= 1 (got {v})")
        if any(n > MAX_ITEMS for n in sizes):
            raise ValueError(f"stage sizes must be <= {MAX_ITEMS} items (got {v}; null scores the whole split)")
        if any(b <= a for a, b in zip(sizes, sizes[1:], strict=False)):
            raise ValueError(f"stage sizes must increase strictly (got {v})")
        return v


class BudgetConfig(_Strict):
    generations: int | None = Field(None, gt=0, le=MAX_GENERATIONS)
    evaluations: int | None = Field(None, gt=0, le=MAX_EVALUATIONS, description="rounded up to whole generations")
    time_limit_s: float | None = Field(None, gt=0, le=MAX_TIME_LIMIT_S, description="wall-clock limit; NOT reproducible")

    @model_validator(mode="after")
    def _one(self) -> BudgetConfig:
        if self.generations is None and self.evaluations is None and self.time_limit_s is None:
            raise ValueError("give generations, evaluations or time_limit_s")
        return self


class StudyConfig(_Strict):
    """The Optuna study that mirrors the run log (docs/tracking.md)."""

    storage: str | None = Field(None, description="SQLAlchemy URL of an Optuna RDB storage (sqlite:///..., "
                                "postgresql+psycopg://...); default: optuna.db in the run folder")
    name: str | None = Field(None, min_length=1, description="the study's name (default: the run folder's name)")

    @field_validator("storage")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None:  # imported here: only a config that names a storage pays for it
            from sqlalchemy.engine import make_url
            from sqlalchemy.exc import ArgumentError

            try:
                make_url(v)
            except ArgumentError:
                raise ValueError(f"{v!r} is not a SQLAlchemy URL (e.g. sqlite:///optuna.db, "
                                 "postgresql+psycopg://user@host/db)") from None
        return v


class MlflowConfig(_Strict):
    uri: str | None = Field(None, description="MLflow tracking URI (http://..., sqlite:///..., file:...); "
                            "default: mlflow.db in the run folder")
    experiment: str = Field("evomerge", min_length=1, description="the MLflow experiment of the run")


class TrackingConfig(_Strict):
    mlflow: MlflowConfig | None = Field(None, description="log the search to MLflow: one MLflow run per search")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if data == "mlflow":  # `tracking: mlflow`: MLflow with its defaults
            return {"mlflow": {}}
        if isinstance(data, str):
            raise ValueError(f"unknown tracker {data!r}; the one supported is mlflow (`tracking: mlflow`)")
        if isinstance(data, dict) and "mlflow" in data and data["mlflow"] in (True, {}):
            return dict(data, mlflow={})
        return data


def _study_on_off(v: Any) -> Any:
    """``study: true`` is the default mirror, ``study: false`` (or null) none."""
    if v is True:
        return {}
    if v is False:
        return None
    return v


# Racing when a config scores candidates on the whole split (no task has a limit) and says nothing
# about racing: it met scripts/bench_fitness.py's acceptance (README). `racing: null` turns it off.
DEFAULT_RACING = {"stages": [30, 100, None], "keep": 0.25}


class SearchConfig(_Strict):
    models: list[str] = Field(min_length=1, description="source model folders, as you name them")
    base_model: str | None = Field(None, description="base model folder (task-arithmetic methods)")
    search_space: SpaceOrName = Field(description="a file in search_spaces/ (name or path) or inline")
    tasks: list[TaskConfig] = Field(min_length=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32", description="the merge's and the evaluated model's dtype; auto: float32 where the "
        "memory plan fits it on `device`, else bfloat16 (decided at search start, frozen with the run)")
    device: str = "cpu"
    placement: Literal["auto", "resident", "stream"] = Field(
        "auto", description="where the in-place merger keeps its inputs: resident on `device`, or stream "
        "(host memory, copied per tensor); auto: the memory plan's choice at search start, frozen with the run "
        "(docs/inplace.md); a search no plan fits is refused naming the shortfall")
    batch_size: int = Field(32, ge=1, le=MAX_BATCH_SIZE, description="fixed lm-eval batch size")
    evaluator: EvaluatorConfig = Field(default_factory=EvaluatorConfig, description="the evaluator backend "
                                       "(`{backend: hf}` or `{backend: vllm}`, docs/evaluation.md)")
    threads: int | None = Field(None, ge=1, le=MAX_THREADS, description="torch CPU threads")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    budget: BudgetConfig
    seed: int = Field(0, description="seeds the optimizer and the evaluation subsets")
    mask_seed: int = Field(0, description="DARE/DELLA mask seed, the same for every candidate")
    racing: RacingConfig | None = Field(None, description="score candidates on growing nested subsets, "
                                        "promoting the better fraction; default: {stages: [30, 100, null], keep: "
                                        "0.25} when no task has a limit (and the optimizer is not nsga2), else off; "
                                        "null: off")
    fitness: FitnessConfig = Field(default_factory=FitnessConfig, description="mean (default) or an IRT "
                                   "estimate from anchor items: {estimator: irt, anchors: 25} (docs/irt.md)")
    rescore_top_k: int = Field(3, ge=1, le=MAX_RESCORE_TOP_K, description="candidates re-scored on the full dev split at the end")
    penalty_fitness: float = Field(-1.0, description="fitness of a failed or non-finite candidate")
    background: bool | None = Field(None, description="during the search, re-score the top candidates on the "
                                    "full dev split and score each new best on the test split (work that "
                                    "does not change the search; with Ray workers it fills the slots the "
                                    "generation barrier leaves idle); default: on with --workers N >= 1, off "
                                    "in-process; frozen in the run folder")
    run_dir: str | None = Field(None, description="run folder (default: runs/<config name>)")
    study: StudyConfig | None = Field(default_factory=StudyConfig, description="the Optuna study mirroring the "
                                      "run log (optuna-dashboard); false or null: none")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="experiment tracking "
                                     "(`tracking: mlflow` or {mlflow: {uri, experiment}})")
    allow_pickle: bool = False
    trust_remote_code: bool = False
    floors: FloorsConfig | None = Field(None, description="per-task floors: a lost skill costs "
                                        "fitness (evomerge/evaluation/floors.py, docs/quality.md)")

    @field_validator("models")
    @classmethod
    def _unique_models(cls, v: list[str]) -> list[str]:
        seen: dict[str, int] = {}
        for i, m in enumerate(v):
            key = str(Path(m).expanduser().resolve()) if "+" not in m else m
            if key in seen:  # a source twice: its task vector counts double, a genome gene is wasted
                raise ValueError(f"{i}: {m!r} is listed twice (also models.{seen[key]}); list each source once")
            seen[key] = i
        return v

    @model_validator(mode="before")
    @classmethod
    def _default_racing(cls, data: Any) -> Any:
        if isinstance(data, dict) and "racing" not in data:
            tasks = data.get("tasks")
            opt = data.get("optimizer")
            name = opt.get("name") if isinstance(opt, dict) else None
            if (isinstance(tasks, list) and tasks and all(isinstance(t, dict) and t.get("limit") is None for t in tasks)
                    and (name not in REGISTRY or REGISTRY[name].batch is Batch.GENERATION
                         and not REGISTRY[name].multi_objective) and not irt_requested(data)):
                data = dict(data, racing=DEFAULT_RACING)
        return data

    @field_validator("study", mode="before")
    @classmethod
    def _study(cls, v: Any) -> Any:
        return _study_on_off(v)

    @field_validator("tracking", mode="before")
    @classmethod
    def _no_tracking(cls, v: Any) -> Any:
        return {} if v is None or v is False else v

    @field_validator("tasks")
    @classmethod
    def _unique_tasks(cls, v: list[TaskConfig]) -> list[TaskConfig]:
        names = [t.name for t in v]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"task(s) listed twice: {', '.join(sorted(dup))}")
        for i, t in enumerate(v):
            if t.limit is not None and t.limit > MAX_ITEMS:
                raise ValueError(f"{i}.limit: at most {MAX_ITEMS} items (got {t.limit}; null scores the whole split)")
            if t.num_fewshot is not None and t.num_fewshot > MAX_FEWSHOT:
                raise ValueError(f"{i}.num_fewshot: at most {MAX_FEWSHOT} (got {t.num_fewshot})")
            if not math.isfinite(t.weight):
                raise ValueError(f"{i}.weight: must be a finite number (got {t.weight})")
        if all(t.weight == 0 for t in v):
            raise ValueError("every task has weight 0, so the fitness is 0 for every candidate; give at least "
                             "one task a non-zero weight")
        return v

    @model_validator(mode="after")
    def _racing(self) -> SearchConfig:
        if self.racing is not None:
            limited = [i for i, t in enumerate(self.tasks) if t.limit is not None]
            if limited:
                raise ValueError(f"tasks.{limited[0]}.limit: with racing the stages decide how many items a "
                                 "candidate is scored on; remove limit")
            if self.optimizer.multi_objective:
                raise ValueError("racing: needs a single fitness to promote by; it does not combine with "
                                 f"optimizer {self.optimizer.name} (one objective per task)")
            if self.optimizer.kind.batch is not Batch.GENERATION:
                raise ValueError(f"racing: races the candidates of a generation; optimizer {self.optimizer.name} "
                                 "takes one candidate at a time (set racing: null)")
        check_fitness(self)
        if self.optimizer.multi_objective and len(self.tasks) < 2:
            raise ValueError(f"optimizer.name: {self.optimizer.name} keeps one objective per task and needs at "
                             "least two tasks")
        if self.optimizer.kind.batch is not Batch.GENERATION and self.fitness.irt:
            raise ValueError(f"fitness.estimator irt refits after each generation; optimizer {self.optimizer.name} "
                             "takes one candidate at a time (use estimator: mean)")
        if self.optimizer.kind.per_item:
            self.optimizer.m2n2_options.check(self.space, len(self.models), [t.weight for t in self.tasks])
        if self.floors is not None:
            self.floors.check_tasks(self.tasks)
        if self.optimizer.start == "best_plain" and self.is_dfs:
            raise ValueError("optimizer.start: best_plain needs a parameter space (per-model genes); "
                             "a data-flow space has none")
        return self

    @property
    def space(self) -> SearchSpace | DfsSpace:
        if isinstance(self.search_space, SearchSpace | DfsSpace):
            return self.search_space
        return load_space(self.search_space)

    @property
    def is_dfs(self) -> bool:
        return isinstance(self.space, DfsSpace)

    def tokenizer_folder(self) -> str:
        """The folder whose tokenizer scores every candidate: the base model's, else the first
        source's (for a LoRA adapter, its base)."""
        from evomerge.models.sources import model_folder

        return model_folder(self.base_model or self.models[0])

    def search_key(self) -> dict:
        """The fields that define a search: a resume must not change them (budget may grow)."""
        # the mirrors (study, tracking) copy the run log: they may change on resume
        data = self.model_dump(mode="json", exclude={"budget", "run_dir", "threads", "study", "tracking"})
        data["search_space"] = self.space.model_dump(mode="json")
        return data

    @classmethod
    def load(cls, path: str | Path) -> SearchConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a search config is a YAML mapping")
        refuse_filled_in(data, str(path))
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "<config>") -> SearchConfig:
        try:
            cfg = cls.model_validate(data)
            cfg.space  # noqa: B018  (loads and validates the search space file now)
            return cfg
        except ValidationError as e:
            raise ConfigError(f"{source}: {format_errors(e, cls)}") from None
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"{source}: search_space: {e}") from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def refuse_filled_in(data: dict, source: str) -> None:
    """A user's config (not a run's frozen one) may not set the keys the search fills in."""
    for (section, key), what in FILLED_IN.items():
        part = data.get(section)
        if isinstance(part, dict) and part.get(key) is not None:
            raise ConfigError(f"{source}: {section}.{key}: not set by hand: it holds {what}; remove it")


def load_space(ref: str) -> SearchSpace | DfsSpace:
    """A search space by path, or by name in the repository's search_spaces/ folder."""
    candidates = [Path(ref), REPO_SPACES / ref, REPO_SPACES / f"{ref}.yaml"]
    for p in candidates:
        if p.is_file():
            data = yaml.safe_load(p.read_text())
            kind = DfsSpace if isinstance(data, dict) and data.get("kind") == "dfs" else SearchSpace
            try:
                return kind.load(p)
            except ValidationError as e:
                raise ValueError(f"{p}: {format_errors(e, kind)}") from None
    known = sorted(p.stem for p in REPO_SPACES.glob("*.yaml"))
    raise FileNotFoundError(f"search space {ref!r} not found (as a path, or a name among {', '.join(known)})")


# ------------------------------------------------------------------ checks beyond the schema


def default_run_dir(config_path: str | Path | None) -> Path:
    name = Path(config_path).stem if config_path else "search"
    return Path("runs") / name
