"""Checks of a search config that read files but no weights: the sources' config.json (they exist
and agree; the granularity divides the layer count) and the tasks (names and metrics exist in the
lm-eval task configs). They run before a run folder is created, so a bad config leaves nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from evomerge.core.errors import ConfigError
from evomerge.search.config import SearchConfig
from evomerge.search.spaces.dataflow import DfsSpace


def _read_config_json(name: str, field: str) -> dict:
    from evomerge.models.folders import ModelFolderError, read_model_config

    try:
        return read_model_config(name)
    except ModelFolderError as e:
        raise ConfigError(f"{field}: {e}") from None


def _num_layers(config: dict) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if key in config:
            return int(config[key])
    return None


def _tokenizer_auto_map(name: str) -> bool:
    p = Path(name).expanduser() / "tokenizer_config.json"
    try:
        return bool(json.loads(p.read_text(encoding="utf-8")).get("auto_map")) if p.is_file() else False
    except (OSError, ValueError):
        return False  # an unreadable tokenizer config is the tokenizer loader's error to report


def check_no_remote_code(cfg: SearchConfig, field: str, name: str, config: dict, *,
                         reads_tokenizers: bool = True) -> None:
    """A source whose model or tokenizer needs its own Python code (``auto_map``): refused without
    ``trust_remote_code: true``. With it, a model's own code is refused too: the candidate builders
    (the in-place merger, the data-flow path builder) build transformers' own architectures. So is a
    tokenizer's own code where the merge engine reads the sources' tokenizers (``reads_tokenizers``,
    parameter-space merges: it loads them without remote code). ``trust_remote_code`` reaches the
    loaders that take it: the search's tokenizer, in process and on every worker."""
    what = ("model" if config.get("auto_map") else "tokenizer" if _tokenizer_auto_map(name) else None)
    if what is None:
        return
    where = "config.json" if what == "model" else "tokenizer_config.json"
    if not cfg.trust_remote_code:
        raise ConfigError(f"{field}: {name!r} needs its own Python code (auto_map in {where}); set "
                          "trust_remote_code: true in the config only if you trust that code")
    if what == "tokenizer" and not reads_tokenizers:
        return
    raise ConfigError(f"{field}: {name!r} needs its own Python code (auto_map in {where}), which evomerge's "
                      "merges cannot run even with trust_remote_code: true (the merge engine builds "
                      "transformers' own architectures and reads source tokenizers without remote code)")


def check_sources(cfg: SearchConfig) -> int:
    """Model folders exist and agree on architecture and size; returns the layer count."""
    from evomerge.methods.registry import get_method

    space = cfg.space
    if isinstance(space, DfsSpace):
        return max(check_dfs_sources(cfg))
    method = get_method(space.method)
    if method.requires_base and not cfg.base_model:
        raise ConfigError(f"base_model: method {space.method!r} (search_space) needs a base model")
    named = [(f"models.{i}", m) for i, m in enumerate(cfg.models)]
    if cfg.base_model:
        named.insert(0, ("base_model", cfg.base_model))
    configs = [(field, name, _read_config_json(name, field)) for field, name in named]
    for field, name, c in configs:
        check_no_remote_code(cfg, field, name, c)
    ref_field, ref_name, ref = configs[0]
    for field, name, c in configs[1:]:
        for key in ("model_type", "hidden_size", "num_hidden_layers", "n_layer", "n_embd"):
            if c.get(key) != ref.get(key):
                raise ConfigError(f"{field}: {name!r} has {key}={c.get(key)!r} but {ref_field} "
                                  f"{ref_name!r} has {ref.get(key)!r}")
    n_layers = _num_layers(ref)
    k = space.granularity.layers_per_group
    if n_layers and k != "all" and n_layers % k:
        raise ConfigError(f"search_space.granularity.layers_per_group: {k} does not divide the "
                          f"{n_layers} layers of the models")
    return n_layers or 0


def check_dfs_sources(cfg: SearchConfig) -> list[int]:
    """A DFS search's models: on the data-flow allow-list, one model type and width; their
    layer counts (which may differ)."""
    from evomerge.models.architectures import arch_spec, num_layers

    if cfg.base_model:
        raise ConfigError("base_model: a data-flow (kind: dfs) search has no base model; model A is "
                          "the first of models")
    configs = [(f"models.{i}", m, _read_config_json(m, f"models.{i}")) for i, m in enumerate(cfg.models)]
    ref_field, ref_name, ref = configs[0]
    for field, name, c in configs:
        check_no_remote_code(cfg, field, name, c, reads_tokenizers=False)
        try:
            arch_spec(c, name)
        except ValueError as e:
            raise ConfigError(f"{field}: {e}") from None
        for key in ("model_type", "hidden_size", "n_embd", "vocab_size"):
            if c.get(key) != ref.get(key):
                raise ConfigError(f"{field}: {name!r} has {key}={c.get(key)!r} but {ref_field} "
                                  f"{ref_name!r} has {ref.get(key)!r}")
    counts = [num_layers(c) for _, _, c in configs]
    from evomerge.search.codecs.dataflow import PathCodec

    try:  # the space against the layer counts (max_path_length, fixed ends)
        PathCodec(cfg.space, cfg.models, counts)  # type: ignore[arg-type]
    except ValueError as e:
        raise ConfigError(f"search_space: {e}") from None
    return counts


def check_tasks(cfg: SearchConfig):
    """Loads the tasks (no model) and checks splits and metrics; returns the evaluators by split."""
    from evomerge.evaluation.evaluator import LmEvalEvaluator, UnknownTaskError

    evaluators = {}
    for i, t in enumerate(cfg.tasks):
        try:
            # log_samples: per-item scores, kept so a larger subset reuses the items already scored
            ev = LmEvalEvaluator([t.name], split=t.split, batch_size=cfg.batch_size, num_fewshot=t.num_fewshot,
                                 log_samples=True)
        except UnknownTaskError as e:
            raise ConfigError(f"tasks.{i}.name: {e}") from None
        except ValueError as e:
            raise ConfigError(f"tasks.{i}: {e}") from None
        metrics = ev.metric_names(t.name)
        if t.metric not in metrics:
            raise ConfigError(f"tasks.{i}.metric: task {t.name!r} has no metric {t.metric!r} "
                              f"(it has {', '.join(metrics)})")
        evaluators[t.name] = ev
    return evaluators
