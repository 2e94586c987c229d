"""`dtype: auto` and `placement: auto` decided once, when a search starts, by the in-place
merger's memory plan for this machine (merge/inplace/memory.auto_plan), and frozen with the run:
a search that no plan fits is refused, naming the shortfall, before its run folder exists."""

from __future__ import annotations

from evomerge.core.errors import ConfigError
from evomerge.merge.engine import _dtype_name
from evomerge.merge.inplace.memory import auto_plan
from evomerge.search.config import SearchConfig

AUTO = "auto"


def with_memory_plan(cfg: SearchConfig) -> SearchConfig:
    """`cfg` with its open (auto) dtype and placement chosen; ConfigError when nothing fits. The
    plan reads the sources' headers: the caller has checked the sources (validation.check_sources)."""
    if AUTO not in (cfg.dtype, cfg.placement):
        return cfg
    if cfg.is_dfs:  # a layer path is built layer by layer, not held as task vectors: no plan
        return cfg.model_copy(update={k: v for k, v in (("dtype", "float32"), ("placement", "resident"))
                                      if getattr(cfg, k) == AUTO})
    try:
        plan = auto_plan(cfg.models, cfg.base_model, cfg.space.method, device=cfg.device,
                         dtype=None if cfg.dtype == AUTO else cfg.dtype,
                         placement=None if cfg.placement == AUTO else cfg.placement,
                         allow_pickle=cfg.allow_pickle)
    except ValueError as err:
        raise ConfigError(f"dtype/placement: {err}") from None
    return cfg.model_copy(update={"dtype": _dtype_name(plan.dtype), "placement": plan.placement})


def with_frozen_plan(cfg: SearchConfig | None, frozen: SearchConfig) -> SearchConfig | None:
    """On resume: a config that leaves dtype or placement open takes the run's frozen choice."""
    if cfg is None:
        return None
    update = {k: getattr(frozen, k) for k in ("dtype", "placement") if getattr(cfg, k) == AUTO}
    return cfg.model_copy(update=update) if update else cfg
