"""Tensor shapes of a Llama-style decoder, for the benchmarks' synthetic sources (standard library
only, so that scripts/gpu_check.py can use it on a machine that has little more than torch)."""

from __future__ import annotations

import json


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


def write_safetensors_header(f, header: dict) -> None:
    """Writes a safetensors header (name -> {dtype, shape, data_offsets}) at the start of the open
    binary file ``f``: the little-endian length, then the JSON padded to 8 bytes. The tensor bytes
    (``data_offsets`` past the header) are the caller's to write, or to leave sparse."""
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
