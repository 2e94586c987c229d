"""Architectures whose layers can be re-ordered and whose step scales fold into weights.

Folding needs pre-norm blocks that read the residual stream only through scale-invariant norms
(docs/dataflow.md). That is a property of each architecture, so the list is explicit: anything
else is refused with a message rather than folded wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from evomerge.core.errors import ArchitectureError


@dataclass(frozen=True)
class ArchSpec:
    inner: str  # attribute of the *ForCausalLM holding the decoder: "model" / "transformer"
    layers: str  # attribute of the decoder holding the layer list
    embeddings: tuple[str, ...]  # decoder modules before the layers (rotary tables included)
    norm: str  # the final norm (a decoder attribute)
    # Substrings of a layer's tensor names that mark the two output projections (weight, bias):
    # the only tensors a step scale changes when folded.
    out_projections: tuple[str, ...]


def _model(out_projections: tuple[str, ...], *, norm: str = "norm") -> ArchSpec:
    """A decoder under ``model`` (Llama's layout: embed_tokens, layers, a final norm, rotary_emb)."""
    return ArchSpec(inner="model", layers="layers", embeddings=("embed_tokens", "rotary_emb"),
                    norm=norm, out_projections=out_projections)


_LLAMA_LIKE = _model(("self_attn.o_proj.", "mlp.down_proj."))
# Every family here is pre-norm: each block reads the residual stream only through a
# scale-invariant norm (RMSNorm or LayerNorm), also where attention and MLP run in parallel
# (phi, gpt_neox, falcon) or where a constant multiplies the block's output (granite's
# residual_multiplier); the MoE routers read the normed stream too. tests/test_families_dfs.py
# checks each folded model against its scaled path.
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,  # its q/k norms act on the projections of the normed input
    "phi3": _LLAMA_LIKE,  # fused qkv_proj / gate_up_proj read the normed input
    "granite": _LLAMA_LIKE,
    "stablelm": _LLAMA_LIKE,
    "starcoder2": _model(("self_attn.o_proj.", "mlp.c_proj.")),
    "mixtral": _model(("self_attn.o_proj.", ".w2.")),  # block_sparse_moe.experts.E.w2
    "qwen2_moe": _model(("self_attn.o_proj.", "down_proj.")),  # experts' and shared expert's
    "phi": _model(("self_attn.dense.", "mlp.fc2."), norm="final_layernorm"),
    # GPT-2's projections are Conv1D ([in, out] weights): a scalar factor does not care.
    "gpt2": ArchSpec(inner="transformer", layers="h", embeddings=("wte", "wpe"), norm="ln_f",
                     out_projections=("attn.c_proj.", "mlp.c_proj.")),
    "gpt_neox": ArchSpec(inner="gpt_neox", layers="layers", embeddings=("embed_in", "rotary_emb"),
                         norm="final_layer_norm",
                         out_projections=("attention.dense.", "mlp.dense_4h_to_h.")),
    "falcon": ArchSpec(inner="transformer", layers="h", embeddings=("word_embeddings", "rotary_emb"),
                       norm="ln_f", out_projections=("self_attention.dense.", "mlp.dense_4h_to_h.")),
}
_SANDWICH = "has sandwich (post-)norms: its scales would fold into the post-norm weights"
_WHY_NOT = {
    "gemma": "Gemma stores RMSNorm weights as (1 + w) and scales embeddings by sqrt(hidden)",
    "gemma2": f"Gemma 2 {_SANDWICH}",
    "gemma3": f"Gemma 3 {_SANDWICH}",
    "gemma3_text": f"Gemma 3 {_SANDWICH}",
    "olmo2": "OLMo-2 is post-norm only: a step scale does not fold into its weights",
}


def arch_spec(config: dict[str, Any], where: str = "model") -> ArchSpec:
    """The spec of a model's config.json, or ArchitectureError naming the supported ones."""
    model_type = config.get("model_type")
    spec = ARCHITECTURES.get(str(model_type))
    if spec is None:
        why = _WHY_NOT.get(str(model_type), "its blocks are not on the verified list")
        raise ArchitectureError(
            f"{where}: data-flow merging supports model types {', '.join(sorted(ARCHITECTURES))}; "
            f"{model_type!r} is refused ({why})")
    if model_type == "gpt2" and config.get("scale_attn_by_inverse_layer_idx"):
        raise ArchitectureError(f"{where}: GPT-2 with scale_attn_by_inverse_layer_idx computes "
                                "attention from the layer's position, so its layers cannot move")
    if config.get("add_cross_attention"):
        raise ArchitectureError(f"{where}: models with cross-attention are not supported")
    return spec


# The config.json keys that hold the layer count, in the order they are looked up.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def layer_count(config: dict[str, Any]) -> tuple[str | None, int | None]:
    """The key that holds a config's layer count and its value, (None, None) when none does."""
    for key in LAYER_COUNT_KEYS:
        if key in config:
            return key, int(config[key])
    return None, None


def num_layers(config: dict[str, Any]) -> int:
    key, n = layer_count(config)
    if n is None:
        raise ArchitectureError(f"config has no layer count (model_type {config.get('model_type')!r})")
    return n


def per_layer_keys(config: dict[str, Any]) -> list[str]:
    """Config lists with one entry per layer (layer_types, ...): they follow the path's steps."""
    n = num_layers(config)
    return [k for k, v in config.items() if isinstance(v, list) and len(v) == n and k.startswith("layer")]
