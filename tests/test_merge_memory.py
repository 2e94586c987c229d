"""The merge engine streams: inputs read (not mapped) tensor by tensor, each merged tensor written
into its shard and released, so a model bigger than the memory a process may allocate merges."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

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
