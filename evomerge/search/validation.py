"""Checks of a search config that read files but no weights: the sources' config.json and
safetensors headers (they exist, the weight files are whole, and they agree; the granularity
divides the layer count) and the tasks (names and metrics exist in the
lm-eval task configs). They run before a run folder is created, so a bad config leaves nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from evomerge.core.errors import ConfigError
from evomerge.evaluation.backends import TOKEN_BUDGETS
from evomerge.models.architectures import LAYER_COUNT_KEYS, layer_count
from evomerge.search.config import SearchConfig
from evomerge.search.spaces.dataflow import DfsSpace


def _read_config_json(name: str, field: str, base: str | None = None,
                      allow_pickle: bool = False) -> dict:
    """config.json, after checking that the folder's safetensors files are whole (headers only).
    A LoRA adapter (models/adapters.py) is read and checked against its base: the base's config."""
    from evomerge.models.adapters import is_adapter_reference
    from evomerge.models.folders import ModelFolderError, check_weight_files, read_model_config

    if is_adapter_reference(name):
        from evomerge.models.sources import MergeError, load_source

        try:
            return load_source(name, base=base, allow_pickle=allow_pickle).config
        except MergeError as e:
            raise ConfigError(f"{field}: {e}") from None
    try:
        config = read_model_config(name)
        check_weight_files(name)
        return config
    except ModelFolderError as e:
        raise ConfigError(f"{field}: {e}") from None


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
    contract = getattr(method, "check_sources", None)
    if contract is not None:  # mergekit's input contract: how many sources, the base among them
        with_base = cfg.base_model is not None and cfg.base_model not in cfg.models
        try:
            contract(len(cfg.models) + with_base, cfg.base_model is not None)
        except ValueError as err:
            raise ConfigError(f"models: {err} (the models and the base_model)") from None
    named = [(f"models.{i}", m) for i, m in enumerate(cfg.models)]
    if cfg.base_model:
        named.insert(0, ("base_model", cfg.base_model))
    configs = [(field, name, _read_config_json(name, field, cfg.base_model, cfg.allow_pickle))
               for field, name in named]
    for field, name, c in configs:
        check_no_remote_code(cfg, field, name, c)
    _check_weight_files(cfg, named)
    ref_field, ref_name, ref = configs[0]
    for field, name, c in configs[1:]:
        for key in ("model_type", "hidden_size", *LAYER_COUNT_KEYS, "n_embd"):
            if c.get(key) != ref.get(key):
                raise ConfigError(f"{field}: {name!r} has {key}={c.get(key)!r} but {ref_field} "
                                  f"{ref_name!r} has {ref.get(key)!r}")
    _check_tokenizers(named)
    n_layers = layer_count(ref)[1]
    k = space.granularity.layers_per_group
    if n_layers and k != "all" and n_layers % k:
        raise ConfigError(f"search_space.granularity.layers_per_group: {k} does not divide the "
                          f"{n_layers} layers of the models")
    return n_layers or 0


def _check_weight_files(cfg: SearchConfig, named: list[tuple[str, str]]) -> None:
    """Pickled weights are refused here, naming the config key that allows them (the loaders'
    messages name the --allow-pickle flag of `evomerge merge` and `evomerge eval`)."""
    from pathlib import Path

    from evomerge.models.adapters import is_adapter_reference

    for field, name in named:
        path = Path(name).expanduser()
        if is_adapter_reference(name):
            continue  # read and checked by _read_config_json
        if cfg.allow_pickle or any(path.glob("*.safetensors")) or any(path.glob("*.safetensors.index.json")):
            continue
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        if pickles:
            raise ConfigError(f"{field}: {name!r} has only pickled weights ({', '.join(pickles)}); pickles can "
                              "run code when loaded: convert them to safetensors, or set allow_pickle: true in "
                              "the search config if you trust the files")


def _check_tokenizers(named: list[tuple[str, str]]) -> None:
    """The sources share one tokenizer: a search has no tokenizer_source to merge others."""
    from evomerge.models.sources import (
        MergeError,
        describe_tokenizer_difference,
        has_tokenizer_files,
        tokenizer_info,
    )

    try:
        infos = [(f, n, tokenizer_info(n, n)) for f, n in named if has_tokenizer_files(n)]
    except MergeError as e:
        raise ConfigError(str(e)) from None
    for field, name, info in infos[1:]:
        ref_field, ref_name, ref = infos[0]
        if info != ref:
            raise ConfigError(f"{field}: {name!r} and {ref_field} {ref_name!r} have different tokenizers: "
                              f"{describe_tokenizer_difference(info, ref)}; a search merges models that share "
                              "one tokenizer (its config has no tokenizer_source): give models with the same "
                              "tokenizer, or merge these with `evomerge merge` and a recipe's tokenizer_source")


def check_dfs_sources(cfg: SearchConfig) -> list[int]:
    """A DFS search's models: on the data-flow allow-list, one model type and width; their
    layer counts (which may differ)."""
    from evomerge.models.architectures import arch_spec, num_layers

    if cfg.base_model:
        raise ConfigError("base_model: a data-flow (kind: dfs) search has no base model; model A is "
                          "the first of models")
    configs = [(f"models.{i}", m, _read_config_json(m, f"models.{i}")) for i, m in enumerate(cfg.models)]
    _check_weight_files(cfg, [(f, m) for f, m, _ in configs])
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
    from evomerge.evaluation.backends import check_gen_kwargs, check_vllm_limits, make_evaluator
    from evomerge.evaluation.evaluator import UnknownTaskError

    if cfg.evaluator.backend == "vllm" and cfg.is_dfs:
        raise ConfigError("evaluator.backend: vllm keeps one resident engine of one architecture; a data-flow "
                          "search's candidates change the layer count (use backend: hf)")
    evaluators = {}
    for i, t in enumerate(cfg.tasks):
        check_gen_kwargs(t.gen_kwargs, cfg.evaluator.backend, f"tasks.{i}.gen_kwargs")
        try:
            # log_samples: per-item scores, kept so a larger subset reuses the items already scored
            ev = make_evaluator(cfg.evaluator, t, split=t.split, batch_size=cfg.batch_size, log_samples=True,
                                model_dir=cfg.tokenizer_folder(), dtype=cfg.dtype)
        except UnknownTaskError as e:
            raise ConfigError(f"tasks.{i}.name: {e}") from None
        except ValueError as e:
            raise ConfigError(f"tasks.{i}: {e}") from None
        metrics = ev.metric_names(t.name)
        if t.metric not in metrics:
            raise ConfigError(f"tasks.{i}.metric: task {t.name!r} has no metric {t.metric!r} "
                              f"(it has {', '.join(metrics)})")
        evaluators[t.name] = ev
    if cfg.evaluator.backend == "vllm":
        from evomerge.models.folders import read_model_config
        from evomerge.models.sources import model_folder

        budgets = [generation_budget(ev.task(name)) for name, ev in evaluators.items()]
        check_vllm_limits(cfg.evaluator, read_model_config(model_folder(cfg.models[0])), cfg.device,
                          min_len=max([b + 1 for b in budgets if b is not None], default=2))
    return evaluators


def generation_budget(task) -> int | None:
    """A generation task's token budget as lm-eval's vllm model reads it (its default 256), None
    for a task that does not generate."""
    if task.get_config("output_type") != "generate_until":
        return None
    kw = task.get_config("generation_kwargs") or {}
    v = next((kw[k] for k in TOKEN_BUDGETS if kw.get(k) is not None), 256)
    return int(v)
