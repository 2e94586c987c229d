"""Planning a merge: recipe + sources -> a checked plan of tensor jobs (nothing read yet).

Everything that can be wrong with the inputs (missing folders, different architectures, layer
counts, hidden sizes, shapes or tokenizers, missing parameters) is found here, before any tensor
is read. The engine (engine.py) runs the jobs; the in-place merger reuses the plan.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from evomerge.methods.registry import MergeMethod, ParamScope, get_method
from evomerge.models.sources import (
    MergeError,
    SourceModel,
    TokenizerInfo,
    describe_tokenizer_difference,
    is_vocab_tensor,
    load_source,
    load_tokenizer_info,
    num_layers_key,
)
from evomerge.recipes.parameter_space import (
    OutputSlice,
    Recipe,
    layer_t,
    parameter_scopes,
    resolve_parameter,
    same_model,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: which source tensors go in, with which resolved parameters."""

    name: str
    models: tuple[str, ...]  # per group key (source index in the slice): the model
    inputs: tuple[str, ...]  # per group key: the input tensor name
    base: int | None  # group key of the base model
    shared: Mapping[str, Any]
    per_source: Mapping[int, Mapping[str, Any]]


@dataclass
class VocabMap:
    """Output tokenizer's vocabulary and, per model, out token id -> model row (-1: missing)."""

    size: int
    rows: dict[str, torch.Tensor]


@dataclass
class MergePlan:
    recipe: Recipe
    method: MergeMethod
    sources: dict[str, SourceModel]  # by model name as written in the recipe
    jobs: list[TensorJob]
    out_config: dict[str, Any]
    donor: SourceModel  # tokenizer, generation config and config come from here
    tokenizer_donor: SourceModel | None
    vocab: VocabMap | None


def _dtype_name(dtype: torch.dtype | str | None) -> str | None:
    if dtype is None or isinstance(dtype, str):
        if dtype is not None and dtype not in DTYPES:
            raise MergeError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
        return dtype
    return next(k for k, v in DTYPES.items() if v == dtype)


# --- planning -----------------------------------------------------------------------------------


def plan_merge(recipe: Recipe, *, allow_pickle: bool = False) -> MergePlan:
    """Index the sources, check them against each other and resolve every tensor's parameters."""
    method = get_method(recipe.merge_method)
    sources: dict[str, SourceModel] = {}
    for name in recipe.referenced_models():
        sources[name] = load_source(name, allow_pickle=allow_pickle, base=recipe.base_model)

    def source(name: str) -> SourceModel:
        return next(s for k, s in sources.items() if same_model(k, name))

    donor = source(recipe.base_model) if recipe.base_model else next(iter(sources.values()))
    merged = [s for s in sources.values()]
    # Layer stacking (passthrough) reads whole layers: the sources' depths may differ.
    _check_compatible(donor, merged, vocab_may_differ=recipe.tokenizer_source is not None,
                      same_depth=method.name != "passthrough")

    tokenizer_donor: SourceModel | None = None
    vocab: VocabMap | None = None
    if recipe.tokenizer_source is not None:
        tokenizer_donor = (donor if recipe.tokenizer_source == "base"
                           else source(recipe.tokenizer_source))
        vocab = _vocab_map(tokenizer_donor, merged)
    else:
        _check_tokenizers(merged)

    slices = recipe.output_slices(donor.layout.num_layers)
    jobs = _plan_jobs(recipe, method, slices, source, donor)
    out_config = _out_config(recipe, donor, slices, source, vocab)
    return MergePlan(recipe=recipe, method=method, sources=sources, jobs=jobs,
                     out_config=out_config, donor=donor, tokenizer_donor=tokenizer_donor,
                     vocab=vocab)


def _check_compatible(ref: SourceModel, models: list[SourceModel], vocab_may_differ: bool,
                      same_depth: bool = True) -> None:
    for m in models:
        if m is ref:
            continue
        pair = f"{m.name} and {ref.name}"
        if m.config.get("model_type") != ref.config.get("model_type") or (
            m.architectures != ref.architectures
        ):
            raise MergeError(
                f"different architectures: {pair} ({m.config.get('model_type')} "
                f"{list(m.architectures)} vs {ref.config.get('model_type')} "
                f"{list(ref.architectures)})"
            )
        if same_depth and m.layout.num_layers != ref.layout.num_layers:
            raise MergeError(f"different layer counts: {pair} ({m.layout.num_layers} vs "
                             f"{ref.layout.num_layers})")
        if m.hidden_size != ref.hidden_size:
            raise MergeError(f"different hidden sizes: {pair} ({m.hidden_size} vs "
                             f"{ref.hidden_size})")
        names, ref_names = _shape_keys(m, same_depth), _shape_keys(ref, same_depth)
        if names != ref_names:
            diff = sorted(names ^ ref_names)[:5]
            tie = " (one ties lm_head to the embeddings, the other does not)" if any(
                is_vocab_tensor(d) for d in diff) else ""
            raise MergeError(f"different tensors: {pair}{tie}: {diff}")
        for name, shape in ref.shapes.items():
            if name in m.shapes and m.shapes[name] != shape:
                if is_vocab_tensor(name) and vocab_may_differ:
                    if m.shapes[name][1:] == shape[1:]:
                        continue
                hint = (" (vocabularies differ: name a tokenizer_source in the recipe)"
                        if is_vocab_tensor(name) else "")
                raise MergeError(f"different shapes of {name}: {pair} ({list(m.shapes[name])} "
                                 f"vs {list(shape)}){hint}")


def _shape_keys(m: SourceModel, same_depth: bool) -> set[str]:
    """Tensor names to compare; across depths, layer tensors by suffix (layer 0 stands for all)."""
    if same_depth:
        return set(m.shapes)
    prefix = f"{m.layout.layer_prefix}."
    return {n for n in m.shapes if not n.startswith(prefix)} | {
        m.layout.layer_name(0, s) for s in m.layout.layer_suffixes}


def _check_tokenizers(models: list[SourceModel]) -> None:
    infos: list[tuple[SourceModel, TokenizerInfo]] = [
        (m, info) for m in models if (info := load_tokenizer_info(m)) is not None
    ]
    for m, info in infos[1:]:
        ref, ref_info = infos[0]
        if info != ref_info:
            raise MergeError(
                f"different tokenizers: {m.name} and {ref.name}: "
                f"{describe_tokenizer_difference(info, ref_info)}; name a tokenizer_source in "
                "the recipe to merge them anyway"
            )


def _vocab_map(tokenizer_donor: SourceModel, models: list[SourceModel]) -> VocabMap:
    """mergekit's permutations: out token id -> the row of that token in each model."""
    out_info = load_tokenizer_info(tokenizer_donor)
    if out_info is None:
        raise MergeError(f"tokenizer_source {tokenizer_donor.name} has no tokenizer files")
    size = len(out_info.vocab)
    if sorted(out_info.vocab.values()) != list(range(size)):
        raise MergeError(f"{tokenizer_donor.name}: token ids are not 0..{size - 1}")
    rows: dict[str, torch.Tensor] = {}
    for m in models:
        # A model without tokenizer files is assumed to use the output tokenizer (as mergekit).
        vocab = (load_tokenizer_info(m) or out_info).vocab
        n_rows = m.vocab_rows if m.vocab_rows is not None else len(vocab)
        p = torch.full((size,), -1, dtype=torch.int64)
        for token, out_id in out_info.vocab.items():
            row = vocab.get(token, -1)
            if 0 <= row < n_rows:
                p[out_id] = row
        rows[m.name] = p
    return VocabMap(size=size, rows=rows)


def _plan_jobs(recipe: Recipe, method: MergeMethod, slices: list[OutputSlice], source,
               donor: SourceModel) -> list[TensorJob]:
    layout = donor.layout
    jobs: list[TensorJob] = []
    for i, s in enumerate(slices):
        names = [src.model for src in s.sources]
        for a in range(len(names)):
            if any(same_model(names[a], names[b]) for b in range(a)):
                raise MergeError(f"slices.{i}: model {names[a]} appears twice in one slice")
        for src in s.sources:
            n = source(src.model).layout.num_layers
            if src.layer_range[1] > n:
                raise MergeError(f"slices.{i}: layer_range {list(src.layer_range)} of "
                                 f"{src.model} exceeds its {n} layers")
        if method.requires_base and not any(same_model(recipe.base_model, n) for n in names):
            raise MergeError(f"slices.{i}: the base model {recipe.base_model} must be one of "
                             f"the slice's sources for {recipe.merge_method}")

    def job(out_name: str, s: OutputSlice, inputs: list[str], t: float) -> TensorJob:
        base = next((k for k, src in enumerate(s.sources)
                     if same_model(src.model, recipe.base_model)), None)
        shared = {}
        for p in method.params:
            if p.scope is ParamScope.SHARED:
                value = resolve_parameter(parameter_scopes(recipe, s, None), p.name, out_name, t)
                shared[p.name] = _finish(p, value, f"tensor {out_name}")
        per_source: dict[int, dict[str, Any]] = {}
        for k, src in enumerate(s.sources):
            per_source[k] = {}
            for p in method.params:
                if p.scope is ParamScope.SHARED or (p.scope is ParamScope.NON_BASE and k == base):
                    continue
                # mergekit matches per-model filters against the input tensor's name.
                value = resolve_parameter(parameter_scopes(recipe, s, k), p.name, inputs[k], t)
                per_source[k][p.name] = _finish(p, value, f"model {src.model}, tensor {inputs[k]}")
            if k != base:
                try:  # each source's own values (della: its density against its epsilon)
                    method.check_source_params(per_source[k])
                except ValueError as err:
                    raise MergeError(f"model {src.model}, tensor {inputs[k]}: {err}") from None
        return TensorJob(name=out_name, models=tuple(src.model for src in s.sources),
                         inputs=tuple(inputs), base=base, shared=shared, per_source=per_source)

    # Non-layer tensors are evaluated at t = 0: embeddings with the first slice's parameters,
    # the final norm and lm_head with the last slice's.
    for name in layout.pre:
        jobs.append(job(name, slices[0], [name] * len(slices[0].sources), 0.0))
    out_index = 0
    for s in slices:
        for offset in range(s.num_layers):
            t = layer_t(offset, s.num_layers)
            for suffix in layout.layer_suffixes:
                inputs = [source(src.model).layout.layer_name(src.layer_range[0] + offset, suffix)
                          for src in s.sources]
                jobs.append(job(layout.layer_name(out_index, suffix), s, inputs, t))
            out_index += 1
    for name in layout.post:
        jobs.append(job(name, slices[-1], [name] * len(slices[-1].sources), 0.0))
    return jobs


def _finish(spec, value, where: str) -> Any:
    if value is None:
        if spec.required:
            raise MergeError(f"missing parameter {spec.name!r} for {where}")
        return spec.default
    try:
        return spec.check(value)
    except ValueError as err:
        raise MergeError(f"{err} ({where})") from None


def _out_config(recipe: Recipe, donor: SourceModel, slices: list[OutputSlice], source,
                vocab: VocabMap | None) -> dict[str, Any]:
    config = json.loads(json.dumps(donor.config))
    n_out = sum(s.num_layers for s in slices)
    key = num_layers_key(config)
    if key is not None and key in config:
        config[key] = n_out
    # Per-layer config lists (Qwen2's layer_types, ...) follow the layers they describe.
    for k, v in list(config.items()):
        if isinstance(v, list) and len(v) == donor.layout.num_layers and k.startswith("layer"):
            config[k] = [source(s.sources[0].model).config.get(k, v)[s.sources[0].layer_range[0]
                                                                    + o]
                         for s in slices for o in range(s.num_layers)]
    if vocab is not None:
        config["vocab_size"] = vocab.size
    out_dtype = recipe.out_dtype or recipe.dtype
    if out_dtype:
        config["dtype"] = out_dtype
        if "torch_dtype" in config:
            config["torch_dtype"] = out_dtype
    return config


def plan_jobs(recipe: Recipe, plan: MergePlan) -> list[TensorJob]:
    """Resolve every tensor's parameters for `recipe` over the already checked sources of `plan`.

    For callers that merge many recipes over the same sources (the in-place merger): the sources
    are not indexed or checked again, only the recipe's slices and parameters.
    """
    method = get_method(recipe.merge_method)
    slices = recipe.output_slices(plan.donor.layout.num_layers)
    return _plan_jobs(recipe, method, slices, lambda name: plan_source(plan, name), plan.donor)


def plan_source(plan: MergePlan, model: str) -> SourceModel:
    return next(s for k, s in plan.sources.items() if same_model(k, model))
