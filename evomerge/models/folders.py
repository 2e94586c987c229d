"""Loading Hugging Face model folders for evaluation, with early, clear errors.

Security defaults: weights load from safetensors only (pickled ``.bin`` files are refused unless
``allow_pickle``), and ``trust_remote_code`` stays off unless the caller asks for it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from evomerge.core.errors import ConfigError, ModelFolderError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def read_model_config(path: str | Path) -> dict:
    """A model folder's config.json, with a clear error for a missing folder or file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelFolderError(f"model folder {str(path)!r} does not exist (evomerge reads local folders; "
                               "hub downloads are not supported)")
    if not path.is_dir():
        raise ModelFolderError(f"{str(path)!r} is not a folder (a model is a Hugging Face folder with config.json and weights)")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        adapter = [f for f in ("adapter_model.safetensors", "adapter_model.bin") if (path / f).is_file()]
        if adapter:  # a PEFT adapter folder that lost its config
            raise ModelFolderError(f"{str(path)!r} holds a PEFT adapter ({adapter[0]}) but has no adapter_config.json, "
                                   "which says its rank, alpha and target modules: copy it back from where the "
                                   "adapter came from")
        raise ModelFolderError(f"{str(path)!r} is not a Hugging Face model folder: it has no config.json")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelFolderError(f"{cfg_path} is not valid JSON: {e}") from None


_MAX_HEADER = 100_000_000  # safetensors refuses larger headers


def safetensors_problem(file: str | Path) -> str | None:
    """What makes ``file`` unreadable as safetensors (truncated, or not safetensors at all), or None.

    Reads the 8-byte length and the JSON header only, and checks that the tensors' byte ranges
    end exactly at the end of the file, as the safetensors library does when it opens one.
    """
    file = Path(file)
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            return (f"is {size} bytes long, too short for a safetensors header (truncated, or not "
                    "a safetensors file)")
        n = int.from_bytes(prefix, "little")
        if n > _MAX_HEADER:
            return ("is not a safetensors file (its first 8 bytes are not the length of a "
                    "safetensors header)")
        if 8 + n > size:
            return f"is truncated: its header alone needs {8 + n} bytes, the file has {size}"
        header = f.read(n)
    try:
        meta = json.loads(header)
    except (UnicodeDecodeError, ValueError):
        return "is not a safetensors file (its header is not JSON)"
    if not isinstance(meta, dict):
        return "is not a safetensors file (its header is not a JSON object)"
    end = 0
    for name, info in meta.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) for o in offsets)):
            return f"is not a valid safetensors file (tensor {name!r} has no data_offsets)"
        end = max(end, offsets[1])
    if 8 + n + end > size:
        return (f"is truncated: its tensors need {8 + n + end} bytes, the file has {size} (an "
                "interrupted download or copy?)")
    if 8 + n + end < size:
        return (f"is not a valid safetensors file: {size - 8 - n - end} bytes follow its last "
                "tensor")
    return None


def check_weight_files(path: str | Path) -> None:
    """Every ``*.safetensors`` file in a model folder is complete (headers only, nothing loaded)."""
    for file in sorted(Path(path).expanduser().glob("*.safetensors")):
        problem = safetensors_problem(file)
        if problem is not None:
            raise ModelFolderError(f"{file} {problem}")


def causal_lm_problem(config: dict) -> str | None:
    """Why a config.json does not describe a causal LM, or None when it does: a ``*ForCausalLM`` /
    ``*LMHeadModel`` architecture, or (no architectures listed) a causal-LM model_type. The one rule
    for loading and merging."""
    archs = config.get("architectures") or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if not archs and model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return None
    return (f"is not a causal language model (model_type {model_type!r}, architectures "
            f"{', '.join(archs) or 'none'})")


def check_model_dir(path: str | Path, *, allow_pickle: bool = False, trust_remote_code: bool = False) -> dict:
    """Validates a model folder without loading weights; returns its config.json as a dict."""
    config = read_model_config(path)
    path = Path(path)
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if config.get("auto_map") and not trust_remote_code:
        raise ModelFolderError(f"{str(path)!r} needs its own Python code (auto_map in config.json); pass "
                               "--trust-remote-code only if you trust that code")
    problem = causal_lm_problem(config)
    if problem and not (config.get("auto_map") and trust_remote_code):
        raise ModelFolderError(f"{str(path)!r}: {problem}")
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        AutoConfig.for_model(**{k: v for k, v in config.items() if k != "model_type"}, model_type=model_type)
    has_st = any(path.glob("*.safetensors"))
    check_weight_files(path)
    has_pickle = any(path.glob("*.bin")) or any(path.glob("*.pt"))
    if not has_st:
        if has_pickle and not allow_pickle:
            raise ModelFolderError(f"{str(path)!r} has only pickled weights (.bin/.pt); pickles can run code "
                                   "when loaded: convert them to safetensors, or pass --allow-pickle if you trust the files")
        if not has_pickle:
            raise ModelFolderError(f"{str(path)!r} has no weights (*.safetensors)")
    return config


def load_causal_lm(path: str | Path, *, device: str = "cpu", dtype: str = "float32",
                   allow_pickle: bool = False, trust_remote_code: bool = False) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    check_model_dir(path, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    use_st = any(Path(path).glob("*.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=parse_dtype(dtype), use_safetensors=use_st, trust_remote_code=trust_remote_code
    )
    return model.to(device).eval()


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise ModelFolderError(f"model folder {str(path)!r} does not exist")
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelFolderError(f"cannot load a tokenizer from {str(path)!r}: {e}") from None
