"""LoRA adapters as merge sources: a PEFT adapter folder read as "its base plus the adapter".

A source may be a PEFT LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``) or
mergekit's ``base+adapter`` reference. Either reads as a model: the base's config, layout,
tokenizer and tensors, with every targeted weight W replaced by ``W + scaling * B @ A`` (as peft's
``merge_and_unload`` computes it), so every merge method works on it unchanged. The low-rank
factors stay available (``AdapterSource.lora`` in models/sources.py) for the in-place merger, which keeps them
resident instead of a dense task vector, and for adapter export.

The adapter's config is read with peft's ``LoraConfig`` (rank, alpha, rslora, rank and alpha
patterns, target modules, fan_in_fan_out). Refused, each with a clear message before any weight
is merged: other PEFT types, DoRA, LoRA biases, ``modules_to_save`` / trainable tokens, embedding
LoRAs, pickled weights (unless allowed), an adapter of another base (shapes, or the base
fingerprint an evomerge-written adapter records) and target modules the base lacks.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from evomerge.core.errors import MergeError
from evomerge.models.folders import safetensors_problem

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = "adapter_model.bin"
FINGERPRINT_KEY = "evomerge_base_fingerprint"  # safetensors metadata of adapters evomerge writes
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path).expanduser() / ADAPTER_CONFIG).is_file()


def split_reference(name: str) -> tuple[str | None, str] | None:
    """(base or None, adapter folder) if ``name`` names an adapter, else None.

    ``base+adapter`` is mergekit's syntax; a folder that exists under the whole name is that
    folder, whatever characters its name has.
    """
    if is_adapter_folder(name):
        return None, name
    if Path(name).expanduser().exists() or "+" not in name:
        return None
    base, adapter = name.rsplit("+", 1)
    if not adapter:
        return None
    if not is_adapter_folder(adapter):
        raise MergeError(f"{name}: {adapter!r} (after the '+') is not a PEFT adapter folder "
                         f"(no {ADAPTER_CONFIG})")
    return base, adapter


def is_adapter_reference(name: str | None) -> bool:
    try:
        return name is not None and split_reference(name) is not None
    except MergeError:
        return True  # a malformed reference is still one: reading it reports the problem


@dataclass(frozen=True)
class LoraFactors:
    """One targeted weight's update: delta = scaling * B @ A (transposed for fan_in_fan_out)."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scaling: float
    fan_in_fan_out: bool

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """As peft's ``get_delta_weight``: (B @ A) * scaling, in ``dtype``."""
        d = (self.b.to(dtype) @ self.a.to(dtype)) * self.scaling
        return d.T if self.fan_in_fan_out else d


@dataclass
class AdapterInfo:
    """An adapter folder, read and checked against its base (factors loaded lazily)."""

    path: Path
    config: Any  # peft.LoraConfig
    file: Path
    modules: dict[str, tuple[str, str]]  # base tensor name -> (A key, B key) in the file
    scalings: dict[str, float]  # base tensor name -> scaling
    ranks: dict[str, int]
    _factors: dict[str, LoraFactors] = field(default_factory=dict, repr=False)

    def factors(self, name: str) -> LoraFactors:
        if name not in self._factors:
            a_key, b_key = self.modules[name]
            with safe_open(self.file, framework="pt") as f:
                a, b = f.get_tensor(a_key), f.get_tensor(b_key)
            self._factors[name] = LoraFactors(a=a, b=b, scaling=self.scalings[name],
                                              fan_in_fan_out=bool(self.config.fan_in_fan_out))
        return self._factors[name]

    @property
    def total_rank(self) -> int:
        return max(self.ranks.values(), default=0)


def read_lora_config(path: Path, name: str):
    """The folder's adapter_config.json through peft's LoraConfig, with evomerge's refusals."""
    from peft import LoraConfig

    cfg_file = path / ADAPTER_CONFIG
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise MergeError(f"{name}: cannot read {cfg_file}: {err}") from None
    peft_type = raw.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise MergeError(f"{name}: a {peft_type} adapter; evomerge reads LoRA adapters only")
    if raw.get("use_dora"):
        raise MergeError(f"{name}: a DoRA adapter (use_dora: true); DoRA rescales each column of "
                         "the merged weight by a learned magnitude, so it is not a low-rank delta: "
                         "not supported (merge it into a full model with peft's merge_and_unload "
                         "first)")
    _refuse_unknown_fields(raw, name)
    try:
        config = LoraConfig.from_pretrained(str(path))
    except Exception as err:  # noqa: BLE001 - peft raises several types for a bad config
        raise MergeError(f"{name}: peft cannot read its {ADAPTER_CONFIG}: {err}") from None
    unsupported = []
    if getattr(config, "bias", "none") != "none" or getattr(config, "lora_bias", False):
        unsupported.append(f"trained biases (bias: {config.bias!r})")
    if getattr(config, "modules_to_save", None):
        unsupported.append(f"modules_to_save {list(config.modules_to_save)}")
    if getattr(config, "trainable_token_indices", None):
        unsupported.append("trainable_token_indices")
    if getattr(config, "layer_replication", None):
        unsupported.append("layer_replication")
    if getattr(config, "target_parameters", None):
        unsupported.append("target_parameters")
    if unsupported:
        raise MergeError(f"{name}: the adapter has {', '.join(unsupported)}; evomerge reads plain "
                         "LoRA weight updates only")
    return config


def _refuse_unknown_fields(raw: dict, name: str) -> None:
    """peft drops the adapter_config.json fields its LoraConfig lacks with only a warning; one
    written by a newer peft may change what the adapter's weights mean, so it is refused, named."""
    import dataclasses

    import peft
    from peft import LoraConfig

    unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(LoraConfig)})
    if unknown:
        raise MergeError(f"{name}: {ADAPTER_CONFIG} has field(s) {', '.join(unknown)} that peft {peft.__version__}'s "
                         "LoraConfig does not know, so what they change in the adapter cannot be applied: remove "
                         "them, or upgrade peft if a newer one wrote the adapter")


def _scaling(config, module: str) -> tuple[int, float]:
    from peft.utils.other import get_pattern_key

    r_key = get_pattern_key(list(config.rank_pattern or {}), module)
    a_key = get_pattern_key(list(config.alpha_pattern or {}), module)
    r = (config.rank_pattern or {}).get(r_key, config.r)
    alpha = (config.alpha_pattern or {}).get(a_key, config.lora_alpha)
    return r, alpha / math.sqrt(r) if config.use_rslora else alpha / r


def base_fingerprint(base, tensor_names: list[str]) -> str:
    """A cheap identity of a base model: every tensor's name, shape and dtype, and the bytes of
    the first (sorted) tensor an adapter targets. Recorded by adapters evomerge writes."""
    h = hashlib.sha256()
    for k in sorted(base.shapes):
        h.update(f"{k}:{list(base.shapes[k])}:{base.dtypes[k]};".encode())
    if tensor_names:
        with ExitStack() as stack:
            t = base.read(sorted(tensor_names)[0], stack).contiguous()
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


def read_adapter(path: str | Path, base, *, name: str | None = None,
                 allow_pickle: bool = False) -> AdapterInfo:
    """Read an adapter folder and check it against ``base`` (a SourceModel); headers only."""
    path = Path(path).expanduser()
    name = name or str(path)
    config = read_lora_config(path, name)
    file = path / ADAPTER_WEIGHTS
    if not file.is_file():
        if (path / PICKLED_WEIGHTS).is_file():
            hint = ("pickles can run code when loaded: convert it to safetensors (peft's "
                    "save_pretrained writes adapter_model.safetensors)")
            if not allow_pickle:
                raise MergeError(f"{name}: the adapter's weights are pickled ({PICKLED_WEIGHTS}); "
                                 f"{hint}, or pass --allow-pickle (allow_pickle: true)")
            raise MergeError(f"{name}: pickled adapter weights ({PICKLED_WEIGHTS}) are not read "
                             f"even with allow_pickle; {hint}")
        raise MergeError(f"{name}: no {ADAPTER_WEIGHTS} in the adapter folder")
    problem = safetensors_problem(file)
    if problem is not None:
        raise MergeError(f"{file} {problem}")
    with safe_open(file, framework="pt") as f:
        keys = list(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
        meta = f.metadata() or {}
    pairs: dict[str, dict[str, str]] = {}
    for k in keys:
        m = _KEY.match(k)
        if m is None:
            kind = "an embedding LoRA" if "lora_embedding" in k else "not a LoRA factor"
            raise MergeError(f"{name}: tensor {k!r} in {file.name} is {kind}; evomerge reads "
                             "LoRA factors of linear layers (lora_A / lora_B) only")
        pairs.setdefault(m["module"], {})[m["ab"]] = k
    modules: dict[str, tuple[str, str]] = {}
    scalings: dict[str, float] = {}
    ranks: dict[str, int] = {}
    missing = sorted(mod for mod in pairs if f"{mod}.weight" not in base.shapes)
    if missing:
        raise MergeError(f"{name}: targets modules that the base {base.name} lacks: {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''} (an adapter of another model?)")
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise MergeError(f"{name}: {module} has lora_{''.join(ab)} but not both lora_A and "
                             "lora_B")
        target = f"{module}.weight"
        a, b = shapes[ab["A"]], shapes[ab["B"]]
        w = base.shapes[target]
        out_f, in_f = (w[1], w[0]) if config.fan_in_fan_out else (w[0] if w else 0,
                                                                   w[1] if len(w) > 1 else 0)
        if len(a) != 2 or len(b) != 2 or a[0] != b[1] or b[0] != out_f or a[1] != in_f:
            raise MergeError(f"{name}: {module}: lora_B {list(b)} @ lora_A {list(a)} does not "
                             f"fit the base's {target} {list(w)} (an adapter of another base?)")
        r, s = _scaling(config, module)
        if r != a[0]:
            raise MergeError(f"{name}: {module} has rank {a[0]} but its config says r={r}")
        modules[target], scalings[target], ranks[target] = (ab["A"], ab["B"]), s, a[0]
    if not modules:
        raise MergeError(f"{name}: {file.name} holds no LoRA factors")
    _check_targets(config, base, modules, name)
    recorded = meta.get(FINGERPRINT_KEY)
    if recorded is not None and recorded != base_fingerprint(base, list(modules)):
        raise MergeError(f"{name}: the adapter was trained on another base than {base.name} (the "
                         "base fingerprint it records differs: same shapes, other weights)")
    return AdapterInfo(path=path, config=config, file=file, modules=modules, scalings=scalings,
                       ranks=ranks)


def _check_targets(config, base, modules: dict[str, Any], name: str) -> None:
    """Every named target module exists in the base (peft's own load would fail on it)."""
    targets = config.target_modules
    if not targets or isinstance(targets, str):
        return  # a regex (or all-linear): the factors themselves were checked
    # peft's rule: a target names a module by its last parts ("q_proj", "self_attn.q_proj") or
    # its full path ("model.layers.0.self_attn.q_proj": how peft writes "all-linear" for some)
    modules = {n[:-len(".weight")] for n in base.shapes if n.endswith(".weight")}
    suffixes = {m.split(".", i)[-1] for m in modules for i in range(m.count(".") + 1)}
    absent = sorted(set(targets) - suffixes - {"all-linear"})
    if absent:
        raise MergeError(f"{name}: target_modules {absent} do not exist in the base {base.name}")


def recorded_base(adapter_path: str) -> str | None:
    """peft's base_model_name_or_path when it is a folder that exists (relative to the adapter
    folder or as written); a hub id is not downloaded."""
    try:
        raw = json.loads((Path(adapter_path) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    recorded = raw.get("base_model_name_or_path")
    if not recorded:
        return None
    for cand in (Path(adapter_path) / recorded, Path(recorded).expanduser()):
        if (cand / "config.json").is_file():
            return str(cand)
    return None


__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "FINGERPRINT_KEY", "AdapterInfo", "LoraFactors",
           "base_fingerprint", "is_adapter_folder", "is_adapter_reference", "read_adapter",
           "read_lora_config", "recorded_base", "split_reference"]
