"""Tensor shapes of a Llama-style decoder, for the benchmarks' synthetic sources (standard library
only, so that scripts/gpu_check.py can use it on a machine that has little more than torch)."""

from __future__ import annotations


def llama_shapes(hidden: int, inter: int, layers: int, vocab: int) -> dict[str, tuple]:
    """Every weight of a Llama-style model (untied lm_head): name -> shape."""
    shapes: dict[str, tuple] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{name}.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes
