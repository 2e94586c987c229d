"""Source models: Hugging Face folders read lazily, tensor by tensor, and checked before merging.

The architecture is read from config.json and the tensor names (layer tensors are
`<prefix>.<index>.<suffix>`, e.g. `model.layers.3.mlp.up_proj.weight` or `transformer.h.3.attn.c_attn
.weight`), not from one model class, so Llama, Mistral, Qwen2 and GPT-2 layouts work alike.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from evomerge.core.errors import MergeError, ModelFolderError
from evomerge.models import adapters
from evomerge.models.architectures import layer_count
from evomerge.models.folders import (
    causal_lm_problem,
    load_causal_lm,
    read_model_config,
    safetensors_problem,
)
from evomerge.models.tensor_files import DTYPES as ST_DTYPES
from evomerge.models.tensor_files import read_index, read_tensor
from evomerge.models.tensor_names import checkpoint_views

_LAYER = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks|layer))\.(?P<index>\d+)\.(?P<rest>.+)$")
# Non-layer tensors indexed by token id (their rows follow the tokenizer).
_VOCAB_NAMES = ("embed_tokens", "wte", "word_embeddings", "embed_in", "embed_out", "lm_head")
# Non-layer tensors that come before the layers (mergekit's pre_weights); the rest come after,
# heads among them: gpt_neox's head is `embed_out` (mergekit takes it from the last slice).
_PRE_NAMES = ("embed", "wte", "wpe")
_HEAD_NAMES = ("lm_head", "embed_out")


def is_pre_tensor(name: str) -> bool:
    """A non-layer tensor that comes before the layers (the embeddings), not a head."""
    return not any(h in name for h in _HEAD_NAMES) and any(k in name for k in _PRE_NAMES)
_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model")
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt",
)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


@dataclass(frozen=True)
class Layout:
    """Where a model's tensors live: embeddings, layers, final norm / lm_head."""

    layer_prefix: str  # e.g. "model.layers"
    num_layers: int
    layer_suffixes: tuple[str, ...]  # the per-layer tensor names after "<prefix>.<i>."
    pre: tuple[str, ...]  # embeddings
    post: tuple[str, ...]  # final norm, lm_head (absent when tied to the embeddings)

    def layer_name(self, index: int, suffix: str) -> str:
        return f"{self.layer_prefix}.{index}.{suffix}"

    @property
    def tied(self) -> bool:
        return not any(is_vocab_tensor(n) for n in self.post)


def is_vocab_tensor(name: str) -> bool:
    return _LAYER.match(name) is None and any(k in name for k in _VOCAB_NAMES)


def _first_key(config: Mapping[str, Any], keys: Iterable[str]) -> tuple[str | None, Any]:
    for k in keys:
        if k in config:
            return k, config[k]
    text = config.get("text_config")
    if isinstance(text, dict):
        return _first_key(text, keys)
    return None, None


@dataclass
class SourceModel:
    """One model folder: its config and an index of its tensors (nothing loaded yet)."""

    name: str  # as written in the recipe
    path: Path
    config: dict[str, Any]
    files: dict[str, Path]  # tensor name -> weight file
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    weight_files: tuple[Path, ...]  # every weights file, index files included (for hashing)
    pickled: bool
    layout: Layout
    _handles: dict[Path, Any] = field(default_factory=dict, repr=False)
    _pickles: dict[Path, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def architectures(self) -> tuple[str, ...]:
        return tuple(self.config.get("architectures") or ())

    @property
    def vocab_rows(self) -> int | None:
        return _first_key(self.config, ("vocab_size",))[1]

    @property
    def hidden_size(self) -> int | None:
        return _first_key(self.config, _HIDDEN_KEYS)[1]

    def has_tokenizer(self) -> bool:
        return any((self.path / f).is_file() for f in ("tokenizer.json", "tokenizer.model",
                                                       "vocab.json", "vocab.txt"))

    def read(self, name: str, stack: ExitStack) -> torch.Tensor:
        """One tensor, on CPU, as stored, read (not mapped: models/tensor_files.py) into memory of
        its own. Files' headers (and pickles) are kept in `stack` until the merge ends."""
        file = self.files[name]
        if self.pickled:
            if file not in self._pickles:
                self._pickles[file] = torch.load(file, map_location="cpu", weights_only=True)
                stack.callback(self._pickles.pop, file, None)
            return self._pickles[file][name]
        if file not in self._handles:
            self._handles[file] = read_index(file)
            stack.callback(self._handles.pop, file, None)
        return read_tensor(self._handles[file], name)


def load_source(name: str, *, allow_pickle: bool = False, base: str | None = None) -> SourceModel:
    """Index a model folder; raises MergeError with a message for each kind of bad input.

    A LoRA adapter (a PEFT folder, or mergekit's ``base+adapter``) reads as its base plus the
    adapter (models/adapters.py); ``base`` is its base when the name gives none."""
    if adapters.is_adapter_reference(name):
        return load_adapter_source(name, base=base, allow_pickle=allow_pickle)
    path = Path(name).expanduser()
    try:  # the one config.json reader and causal-LM rule (models/folders.py), as MergeErrors
        config = read_model_config(path)
    except ModelFolderError as err:
        raise MergeError(str(err)) from None
    problem = causal_lm_problem(config)
    if problem:
        raise MergeError(f"{name}: {problem}")

    files, weight_files, pickled = _weight_index(path, name, allow_pickle)
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, torch.dtype] = {}
    if pickled:
        for file in sorted(set(files.values())):
            state = torch.load(file, map_location="cpu", weights_only=True)
            for k, v in state.items():
                if k in files and files[k] == file:
                    shapes[k], dtypes[k] = tuple(v.shape), v.dtype
    else:
        for file in sorted(set(files.values())):
            for k, (code, shape, _, _) in read_index(file).entries.items():  # the header only
                if files.get(k) == file:
                    shapes[k], dtypes[k] = shape, _safetensors_dtype(code)
    layout = _layout(name, config, list(files))
    return SourceModel(name=name, path=path, config=config, files=files, shapes=shapes,
                       dtypes=dtypes, weight_files=weight_files, pickled=pickled, layout=layout)


def _safetensors_dtype(code: str) -> torch.dtype:
    return ST_DTYPES.get(code, torch.float32)


def _check_safetensors(files: Iterable[Path]) -> None:
    """A truncated or foreign file is named before the safetensors library fails on it."""
    for file in files:
        problem = safetensors_problem(file)
        if problem is not None:
            raise MergeError(f"{file} {problem}")


def _weight_index(path: Path, name: str,
                  allow_pickle: bool) -> tuple[dict[str, Path], tuple[Path, ...], bool]:
    for index_name, pickled in (("model.safetensors.index.json", False),
                                ("pytorch_model.bin.index.json", True)):
        index = path / index_name
        if index.is_file():
            if pickled and not allow_pickle:
                break
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = {k: path / v for k, v in weight_map.items()}
            missing = sorted({str(f.name) for f in files.values() if not f.is_file()})
            if missing:
                raise MergeError(f"{name}: {index_name} names missing shards: {missing}")
            if not pickled:
                _check_safetensors(sorted(set(files.values())))
            return files, (index, *sorted(set(files.values()))), pickled
    safetensors = sorted(path.glob("*.safetensors"))
    if safetensors:
        _check_safetensors(safetensors)
        files = {}
        for file in safetensors:
            try:
                files.update({k: file for k in read_index(file).entries})
            except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
                raise MergeError(f"{name}: {file.name} is not a readable safetensors file ({err})") from None
        return files, tuple(safetensors), False
    pickles = sorted(p for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES and p.is_file())
    if not pickles:
        raise MergeError(f"{name} has no weights (no *.safetensors, no index file)")
    if not allow_pickle:
        raise MergeError(
            f"{name} has only pickled weights ({', '.join(p.name for p in pickles)}); pickles "
            "can run code when loaded: pass --allow-pickle (allow_pickle=True) to read them with "
            "torch.load(weights_only=True)"
        )
    files = {}
    for file in pickles:
        state = torch.load(file, map_location="cpu", weights_only=True)
        files.update({k: file for k in state})
    return files, tuple(pickles), True


def _layout(name: str, config: Mapping[str, Any], tensor_names: list[str]) -> Layout:
    layers: dict[int, set[str]] = {}
    prefixes = set()
    pre, post = [], []
    for t in sorted(tensor_names):
        m = _LAYER.match(t)
        if m:
            prefixes.add(m["prefix"])
            layers.setdefault(int(m["index"]), set()).add(m["rest"])
        elif is_pre_tensor(t):
            pre.append(t)
        else:
            post.append(t)
    if len(prefixes) != 1:
        raise MergeError(f"{name}: cannot find one stack of layers in the tensor names "
                         f"(prefixes: {sorted(prefixes) or 'none'})")
    key, n_config = layer_count(config)
    n = len(layers)
    if sorted(layers) != list(range(n)):
        raise MergeError(f"{name}: layer indices are not 0..{n - 1}: {sorted(layers)}")
    if n_config is not None and n_config != n:
        raise MergeError(f"{name}: config.json says {key}={n_config} but the weights hold {n} "
                         "layers")
    suffixes = layers[0]
    for i, s in layers.items():
        if s != suffixes:
            raise MergeError(f"{name}: layer {i} has different tensors than layer 0: "
                             f"{sorted(s ^ suffixes)}")
    return Layout(layer_prefix=prefixes.pop(), num_layers=n,
                  layer_suffixes=tuple(sorted(suffixes)), pre=tuple(pre), post=tuple(post))


def num_layers_key(config: Mapping[str, Any]) -> str | None:
    return layer_count(dict(config))[0]


# --- a LoRA adapter as a source model (models/adapters.py reads and checks it) -------------


def _adapter_base(name: str, ref: tuple[str | None, str], base: str | None) -> str:
    """The base folder of adapter reference ``ref`` (split_reference's): the one the name gives,
    else ``base``, else the one the adapter records."""
    ref_base, adapter_path = ref
    base_name = ref_base or base or adapters.recorded_base(adapter_path)
    if base_name is None:
        raise MergeError(f"{name}: a LoRA adapter needs its base model: write it as "
                         f"BASE+{name} (mergekit's syntax) or give the recipe a base_model")
    if adapters.is_adapter_reference(base_name):
        raise MergeError(f"{name}: the base {base_name} is itself an adapter; stacked adapters "
                         "are not supported")
    return base_name


def model_folder(name: str, *, base: str | None = None) -> str:
    """The model folder behind a source name (its config and tokenizer): the name itself, or for
    a LoRA adapter its base (``base+adapter``, else ``base``, else the base the adapter records)."""
    ref = adapters.split_reference(name)
    return name if ref is None else _adapter_base(name, ref, base)


def load_adapter_source(name: str, *, base: str | None = None, allow_pickle: bool = False):
    """The SourceModel of ``base+adapter`` (or of an adapter folder over ``base``)."""
    ref = adapters.split_reference(name)
    if ref is None:
        raise MergeError(f"{name} is not a LoRA adapter reference")
    adapter_path = ref[1]
    base_name = _adapter_base(name, ref, base)
    base_source = load_source(base_name, allow_pickle=allow_pickle)
    info = adapters.read_adapter(adapter_path, base_source, name=name, allow_pickle=allow_pickle)
    return make_adapter_source(name, base_source, info)


@dataclass
class AdapterSource(SourceModel):
    """A base model plus one LoRA adapter: reads W + scaling * B @ A for targeted tensors."""

    base_source: SourceModel | None = None
    adapter: adapters.AdapterInfo | None = None

    def lora(self, tensor: str) -> adapters.LoraFactors | None:
        return self.adapter.factors(tensor) if tensor in self.adapter.modules else None

    def read(self, tensor: str, stack: ExitStack) -> torch.Tensor:
        t = self.base_source.read(tensor, stack)
        f = self.lora(tensor)
        if f is None:
            return t
        # peft's merge: the delta in the weight's dtype (float32 on CPU for half weights)
        work = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype
        return t + f.delta(work).to(t.dtype)


def make_adapter_source(name: str, base_source: SourceModel, info: adapters.AdapterInfo) -> AdapterSource:
    b = base_source
    return AdapterSource(name=name, path=b.path, config=b.config, files=b.files, shapes=b.shapes,
                         dtypes=b.dtypes, weight_files=(*b.weight_files, info.file),
                         pickled=b.pickled, layout=b.layout, base_source=b, adapter=info)


def load_source_lm(name: str, *, base: str | None = None, device: str = "cpu",
                   dtype: str = "float32", allow_pickle: bool = False,
                   trust_remote_code: bool = False) -> torch.nn.Module:
    """A source as a causal LM to score: its folder, or for a LoRA adapter (a folder over
    ``base``, or ``base+adapter``) its base with the adapter merged in, W + scaling * B @ A, as
    the merges read it (AdapterSource.read)."""
    if not adapters.is_adapter_reference(name):
        return load_causal_lm(name, device=device, dtype=dtype, allow_pickle=allow_pickle,
                              trust_remote_code=trust_remote_code)
    source = load_adapter_source(name, base=base, allow_pickle=allow_pickle)
    model = load_causal_lm(source.base_source.path, device=device, dtype=dtype,
                           allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    params = checkpoint_views(model)  # the adapter's (checkpoint) names in the loaded model
    with ExitStack() as stack, torch.no_grad():
        for tensor in source.adapter.modules:
            params[tensor].copy_(source.read(tensor, stack))
    return model


# --- tokenizers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizerInfo:
    vocab: Mapping[str, int]  # token -> id, added tokens included
    specials: tuple[tuple[str, Any], ...]  # named special tokens and the full special list


def load_tokenizer_info(source: SourceModel) -> TokenizerInfo | None:
    """The vocabulary and special tokens of a folder's tokenizer (None if it has none)."""
    if not source.has_tokenizer():
        return None
    return tokenizer_info(source.path, source.name)


def has_tokenizer_files(path: str | Path) -> bool:
    """As ``SourceModel.has_tokenizer``, for a folder that is not indexed."""
    return any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt"))


def tokenizer_info(path: str | Path, name: str) -> TokenizerInfo:
    """The vocabulary and special tokens of the tokenizer in folder ``path`` (no weights read)."""
    from transformers import AutoTokenizer  # lazy: importing transformers takes seconds

    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - any loader failure is a bad input here
        raise MergeError(f"{name}: cannot load its tokenizer: {err}") from None
    named = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
             "mask_token")
    specials = tuple((k, str(getattr(tok, k, None))) for k in named)
    specials += (("all_special_tokens", tuple(sorted(map(str, tok.all_special_tokens)))),)
    return TokenizerInfo(vocab=dict(tok.get_vocab()), specials=specials)


def describe_tokenizer_difference(a: TokenizerInfo, b: TokenizerInfo) -> str:
    if a.vocab != b.vocab:
        only_a = sorted(set(a.vocab) - set(b.vocab))[:5]
        only_b = sorted(set(b.vocab) - set(a.vocab))[:5]
        moved = sorted(t for t in set(a.vocab) & set(b.vocab) if a.vocab[t] != b.vocab[t])[:5]
        return (f"vocabularies differ (sizes {len(a.vocab)} vs {len(b.vocab)}; only in the first:"
                f" {only_a}; only in the second: {only_b}; different ids: {moved})")
    diffs = [f"{k}: {va!r} vs {vb!r}" for (k, va), (_, vb) in zip(a.specials, b.specials,
                                                                  strict=True) if va != vb]
    return "special tokens differ (" + "; ".join(diffs) + ")"
