"""Memory of the in-place merger over LoRA adapters: factors resident vs dense task vectors.

A 7B-shaped Llama (hidden 4096, intermediate 11008, 32 layers, vocab 32000) is written as
*headers only*: each safetensors file is its JSON header followed by a sparse hole of the right
length, so nothing is allocated and `plan()` (config.json and the headers only) reads it as a
real folder. Three rank-16 adapters over every attention and MLP projection are written the same
way. The table compares, from `plan()`:

- adapters resident (task_arithmetic over the adapters: the low-rank path) against three dense
  task vectors (what the merger holds for the same deltas made dense: `inputs` of the plan), and
- the whole plan (target + base + inputs or adapters) of both.

A second part builds a small real model (hidden 256, 4 layers) both ways with `InPlaceMerger` and
checks the bytes its entries really hold against the plan. Runs in seconds (`--quick` is the
same: nothing here is timed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_llama import llama_shapes, write_safetensors_header  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_header_only(path: Path, shapes: dict[str, tuple], dtype: str = "F32") -> None:
    """A safetensors file whose data is a sparse hole (valid header, exact length)."""
    size = {"F32": 4, "BF16": 2}[dtype]
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = size
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    with open(path, "wb") as f:
        write_safetensors_header(f, header)
        f.truncate(f.tell() + offset)


def write_sharded_header_only(folder: Path, shapes: dict[str, tuple], dtype: str = "F32") -> None:
    """Header-only shards, one per layer (a mapping of one huge file may be refused), and their index."""
    shards: dict[str, dict[str, tuple]] = {}
    for name, shape in shapes.items():
        part = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        shards.setdefault(part, {})[name] = shape
    weight_map = {}
    for i, group in enumerate(shards.values(), start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_header_only(folder / file, group, dtype=dtype)
        weight_map.update({k: file for k in group})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": weight_map}))


def llama_config(hidden: int, inter: int, layers: int, vocab: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 32,
            "num_key_value_heads": 32, "vocab_size": vocab, "tie_word_embeddings": False,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}


def adapter_shapes(shapes: dict[str, tuple], rank: int) -> dict[str, tuple]:
    out = {}
    for name, shape in shapes.items():
        module = name[: -len(".weight")]
        if module.rsplit(".", 1)[-1] in TARGETS:
            out[f"base_model.model.{module}.lora_A.weight"] = (rank, shape[1])
            out[f"base_model.model.{module}.lora_B.weight"] = (shape[0], rank)
    return out


def write_family(root: Path, size: tuple[int, int, int, int], rank: int, n: int,
                 *, headers_only: bool) -> tuple[Path, list[Path]]:
    hidden, inter, layers, vocab = size
    shapes = llama_shapes(hidden, inter, layers, vocab)
    base = root / "base"
    base.mkdir(parents=True)
    (base / "config.json").write_text(json.dumps(llama_config(*size)))
    adapters = []
    for i in range(n):
        a = root / f"adapter_{i}"
        a.mkdir()
        (a / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS),
            "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base)}))
        adapters.append(a)
    if headers_only:
        write_sharded_header_only(base, shapes)
        for a in adapters:
            write_header_only(a / "adapter_model.safetensors", adapter_shapes(shapes, rank))
        return base, adapters
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()},
              str(base / "model.safetensors"))
    for a in adapters:
        save_file({k: torch.randn(s, generator=g) * 0.02
                   for k, s in adapter_shapes(shapes, rank).items()},
                  str(a / "adapter_model.safetensors"))
    return base, adapters


# hidden, intermediate, layers, vocab, key/value width (grouped-query attention at 70B)
PLAN_SIZES = {"7B": (4096, 11008, 32, 32000, 4096), "13B": (5120, 13824, 40, 32000, 5120),
              "70B": (8192, 28672, 80, 32000, 1024)}


def plan_table(reserve_gb: float, gpu_gb: float = 80.0, sources: int = 3, rank: int = 16) -> None:
    """The search's memory plan (memory.choose_plan) for 7B/13B/70B with three sources, on one
    80 GB GPU and on 8: each choice's bytes per GPU, and what the plan picks when the config
    leaves dtype and placement open (or its refusal)."""
    from evomerge.merge.inplace.memory import (
        CHOICES,
        choose_plan,
        memory_plan_from_shapes,
        per_gpu_bytes,
    )

    budget = (gpu_gb - reserve_gb) * 1e9
    print(f"\nSearch memory plan, {sources} sources, {gpu_gb:g} GB GPUs less {reserve_gb:g} GB each "
          "for vLLM's KV cache and activations; GB per GPU (model-sized parts split over the GPUs)")
    head = ["model", "GPUs", "method", *(f"{str(d)[6:]} {p}" for d, p in CHOICES), "choice"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for label, (hidden, inter, layers, vocab, kv) in PLAN_SIZES.items():
        shapes = llama_shapes(hidden, inter, layers, vocab)
        for name in shapes:
            if name.endswith(("k_proj.weight", "v_proj.weight")):
                shapes[name] = (kv, hidden)
        lora = sum(3 * rank * (shape[0] + shape[1]) * 4 for n, shape in shapes.items()
                   if n.rsplit(".", 2)[-2] in TARGETS) * sources
        for gpus in (1, 8):
            for method, adapter_bytes in (("task_arithmetic", None), ("ties", None),
                                          ("task_arithmetic", lora)):
                cells = []
                for d, p in CHOICES:
                    mp = memory_plan_from_shapes(shapes, method, sources, dtype=d, placement=p,
                                                 device="cuda", adapter_bytes=adapter_bytes)
                    g = per_gpu_bytes(mp, gpus)
                    cells.append(f"{g / 1e9:.1f}{'' if g <= budget else ' ✗'}")
                try:
                    mp = choose_plan(shapes, method, sources, device_bytes=budget, gpus=gpus,
                                     adapter_bytes=adapter_bytes)
                    choice = f"{str(mp.dtype)[6:]} {mp.placement}"
                except ValueError as err:
                    choice = "refused: " + str(err).split("the smallest ")[1].split(";")[0]
                kind = f"{method} (LoRA factors)" if adapter_bytes else method
                print(f"| {label} | {gpus} | {kind} | " + " | ".join(cells) + f" | {choice} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the same run (nothing is timed)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=3)
    parser.add_argument("--reserve-gb", type=float, default=8.0,
                        help="GB per GPU kept for vLLM's KV cache and activations (plan table)")
    args = parser.parse_args(argv)
    import torch

    from evomerge.merge.inplace import InPlaceMerger, plan

    gb = 1e9
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        base, adapters = write_family(Path(tmp) / "7b", (4096, 11008, 32, 32000), args.rank,
                                      args.adapters, headers_only=True)
        names = [str(a) for a in adapters]
        low = plan(names, str(base), "task_arithmetic")
        dense = plan(names, str(base), "ties")  # the dense path: the same deltas made dense
        adapter_b, dense_b = low.parts["adapters"][1], dense.parts["inputs"][1]
        rows.append(("7B-shaped, plan()", f"{low.parameters / 1e9:.2f}B", adapter_b / gb,
                     dense_b / gb, dense_b / adapter_b, low.host_bytes / gb,
                     (dense.parts["target"][1] + dense.parts["base"][1] + dense_b) / gb))
        small, small_adapters = write_family(Path(tmp) / "small", (256, 688, 4, 1000), args.rank,
                                             args.adapters, headers_only=False)
        names = [str(a) for a in small_adapters]
        low_s = plan(names, str(small), "task_arithmetic")
        torch.set_num_threads(1)
        m = InPlaceMerger(names, str(small), "task_arithmetic")
        held = sum(t.numel() * t.element_size() for e in m._lowrank_entries.values()
                   for t in (*e.scaled_b.values(), e.a_cat, e.b_cat) if t is not None)
        d = InPlaceMerger(names, str(small), "ties")
        held_dense = sum(e.inputs.numel() * e.inputs.element_size() for e in d._entries.values())
        assert held == low_s.parts["adapters"][1], (held, low_s.parts["adapters"][1])
        rows.append(("small real model, held", f"{low_s.parameters / 1e6:.2f}M", held / gb,
                     held_dense / gb, held_dense / held, low_s.host_bytes / gb, float("nan")))
    print(f"{args.adapters} rank-{args.rank} LoRA adapters (q,k,v,o,gate,up,down), float32; "
          f"load average {os.getloadavg()[0]:.2f}")
    head = ("model", "params", "adapters GB", f"{args.adapters} dense task vectors GB",
            "ratio", "plan total (low-rank) GB", "plan total (dense) GB")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.3f} | {r[4]:.1f}x | {r[5]:.3f} | "
              f"{r[6]:.3f} |")
    plan_table(args.reserve_gb, sources=args.adapters, rank=args.rank)
    return 0


if __name__ == "__main__":
    sys.exit(main())
