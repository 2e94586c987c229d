"""The merge engine streams: inputs read (not mapped) tensor by tensor, each merged tensor written
into its shard and released, so a model bigger than the memory a process may allocate merges."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from evomerge.models.tensor_files import ShardWriter, read_index, read_tensor

HIDDEN, LAYERS = 4096, 4  # every weight 4096 x 4096 bf16: 32 MiB; a model 960 MiB
TENSOR = HIDDEN * HIDDEN * 2


def _sparse_model(folder: Path, head: torch.Tensor | None = None) -> None:
    """A Llama-shaped bf16 model whose weights are a sparse hole (zeros) on disk, except the first
    rows of the embedding, set to `head`."""
    names = ["model.embed_tokens.weight"]
    for i in range(LAYERS):
        names += [f"model.layers.{i}.{m}.weight" for m in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    names.append("lm_head.weight")
    header = {n: {"dtype": "BF16", "shape": [HIDDEN, HIDDEN],
                  "data_offsets": [i * TENSOR, (i + 1) * TENSOR]} for i, n in enumerate(names)}
    norms = [f"model.layers.{i}.{m}.weight" for i in range(LAYERS)
             for m in ("input_layernorm", "post_attention_layernorm")] + ["model.norm.weight"]
    end = len(names) * TENSOR
    for n in norms:
        header[n] = {"dtype": "BF16", "shape": [HIDDEN], "data_offsets": [end, end + 2 * HIDDEN]}
        end += 2 * HIDDEN
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    folder.mkdir(parents=True)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        if head is not None:
            f.write(head.contiguous().view(torch.uint8).numpy().tobytes())
        f.truncate(8 + len(raw) + end)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": 32,
        "num_key_value_heads": 32, "vocab_size": HIDDEN, "tie_word_embeddings": False}))


_CHILD = textwrap.dedent("""
    import json, resource, sys
    import torch
    torch.set_num_threads(1)  # worker threads' stacks would count too
    from evomerge.merge.engine import write_merged_model
    from evomerge.recipes.parameter_space import Recipe

    recipe = Recipe.from_dict(json.loads(sys.argv[1]), "<test>")
    used = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")
                if line.startswith("VmData:"))
    # From here on, the process may allocate (or privately map) only `budget` more bytes.
    resource.setrlimit(resource.RLIMIT_DATA, (used + int(sys.argv[3]), resource.RLIM_INFINITY))
    write_merged_model(recipe, sys.argv[2])
""")


def test_a_merge_bigger_than_the_memory_limit_stays_within_it(tmp_path):
    """Three 960 MiB sources, a 960 MiB output, under a limit of 384 MiB (12 of its 32 MiB
    tensors) on the memory the process allocates after start-up: a merge that held the output
    shard, the inputs or their mappings would be refused memory and fail."""
    g = torch.Generator().manual_seed(0)
    head_a = torch.randn(8, HIDDEN, generator=g).to(torch.bfloat16)
    head_b = torch.randn(8, HIDDEN, generator=g).to(torch.bfloat16)
    _sparse_model(tmp_path / "base")
    _sparse_model(tmp_path / "a", head_a)
    _sparse_model(tmp_path / "b", head_b)
    recipe = {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"),
              "models": [{"model": str(tmp_path / "a"), "parameters": {"weight": 0.5}},
                         {"model": str(tmp_path / "b"), "parameters": {"weight": 0.25}}],
              "dtype": "bfloat16"}
    budget = 12 * TENSOR
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(recipe), str(out), str(budget)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    weights = out / "model.safetensors"
    assert weights.stat().st_size > budget
    with safe_open(weights, framework="pt") as f:
        assert len(f.keys()) == 9 * LAYERS + 3
        emb = f.get_tensor("model.embed_tokens.weight")
    want = (head_a.float() * 0.5 + head_b.float() * 0.25).to(torch.bfloat16)
    assert torch.equal(emb[:8], want)
    assert not emb[8:].any()


def test_shards_written_tensor_by_tensor_read_back_as_safetensors(tmp_path):
    g = torch.Generator().manual_seed(1)
    tensors = {"b.weight": torch.randn(5, 7, generator=g).to(torch.bfloat16),
               "a.weight": torch.randn(3, generator=g), "mask": torch.tensor([True, False]),
               "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3), "scalar": torch.tensor(2.5)}
    for room in (4096, 8):  # a room too small for the header: the file is rewritten with it
        path = tmp_path / f"shard-{room}.safetensors"
        w = ShardWriter(path, room, metadata={"format": "pt"})
        for name, t in tensors.items():
            w.add(name, t)
        w.close()
        back = load_file(path)
        assert back.keys() == tensors.keys()
        assert all(torch.equal(back[k], t) and back[k].dtype == t.dtype for k, t in tensors.items())
        with safe_open(path, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
        assert int.from_bytes(path.read_bytes()[:8], "little") % 8 == 0
    ref = tmp_path / "ref.safetensors"
    save_file(tensors, str(ref))
    index = read_index(ref)
    assert all(torch.equal(read_tensor(index, k), t) for k, t in tensors.items())


def test_mergekits_out_shard_size_flag_shards_as_max_shard_size(tmp_path):
    from merge_helpers import model_family

    from evomerge.cli.main import main

    base, ft1, ft2 = model_family(tmp_path / "family")
    cfg = tmp_path / "ta.yml"
    cfg.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                   f"  - model: {ft1}\n    parameters: {{weight: 0.5}}\n"
                   f"  - model: {ft2}\n    parameters: {{weight: 0.5}}\ndtype: float32\n")
    assert main(["merge", str(cfg), str(tmp_path / "a"), "--max-shard-size", "5KB"]) == 0
    assert main(["merge", str(cfg), str(tmp_path / "b"), "--out-shard-size", "5K"]) == 0
    a = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    b = {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()}
    assert a == b and "model-00002-of-" in " ".join(a)


# --- the search's memory plan: placement and dtype chosen when the config leaves them open ------

_SHAPES = {f"layers.{i}.w": (4096, 4096) for i in range(8)}


def _per_gpu(dtype, placement, gpus=1, method="task_arithmetic"):
    from evomerge.merge.inplace.memory import memory_plan_from_shapes, per_gpu_bytes

    mp = memory_plan_from_shapes(_SHAPES, method, 3, dtype=dtype, placement=placement,
                                 device="cuda")
    return per_gpu_bytes(mp, gpus)


def test_the_plan_picks_the_first_choice_that_fits_float32_resident_first():
    from evomerge.merge.inplace.memory import choose_plan

    resident32, stream32 = _per_gpu(torch.float32, "resident"), _per_gpu(torch.float32, "stream")
    resident16 = _per_gpu(torch.bfloat16, "resident")
    assert stream32 < resident32 and resident16 < resident32
    picks = {
        resident32: (torch.float32, "resident"),  # room for everything: exact and resident
        resident32 - 1: (torch.float32, "stream"),  # one byte short: the inputs stream
    }
    for room, want in picks.items():
        mp = choose_plan(_SHAPES, "task_arithmetic", 3, device_bytes=room)
        assert (mp.dtype, mp.placement) == want
    # the config's dtype is kept: bf16 resident where float32 would also have fitted
    mp = choose_plan(_SHAPES, "task_arithmetic", 3, device_bytes=resident32, dtype="bfloat16")
    assert (mp.dtype, mp.placement) == (torch.bfloat16, "resident")
    # on 8 GPUs the model-sized parts split: float32 resident fits where one GPU streams
    room = _per_gpu(torch.float32, "resident", gpus=8)
    assert room < resident32 / 2
    mp = choose_plan(_SHAPES, "task_arithmetic", 3, device_bytes=room, gpus=8)
    assert (mp.dtype, mp.placement) == (torch.float32, "resident")
    mp = choose_plan(_SHAPES, "task_arithmetic", 3, device_bytes=room, gpus=1)
    assert (mp.dtype, mp.placement) != (torch.float32, "resident")


def test_the_plan_refuses_with_the_shortfall_when_nothing_fits():
    from evomerge.merge.inplace.memory import choose_plan

    smallest = _per_gpu(torch.bfloat16, "stream", method="ties")
    room = smallest / 2
    with pytest.raises(ValueError) as err:
        choose_plan(_SHAPES, "ties", 3, device_bytes=room)
    text = str(err.value)
    assert "no memory plan fits ties" in text and "bfloat16, stream" in text
    assert f"{smallest / 1e9:.1f} GB per GPU of {room / 1e9:.1f} GB" in text
    assert f"{(smallest - room) / 1e9:.1f} GB short" in text
    # a placement the config fixes is the only one tried
    with pytest.raises(ValueError, match="float32, resident"):
        choose_plan(_SHAPES, "ties", 3, device_bytes=smallest, dtype="float32",
                    placement="resident")
