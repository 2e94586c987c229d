"""Permutation alignment of Llama-style models (evomerge/methods/align, docs/zipit.md): every
alignment is a function-preserving re-parameterization, weight matching recovers a known
permutation, and bad inputs are early errors that name the problem."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from evomerge.core.errors import MergeError
from evomerge.methods.align import (
    Alignment,
    BlockShape,
    permute_state,
    permute_tensor,
    weight_matching,
)

SIZES = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             attn_implementation="eager")
FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
            "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


def tiny(family: str = "llama", seed: int = 0, **overrides):
    """A random-init model whose norm weights and biases are random too (so that a permutation
    that forgot them would show)."""
    config_cls, model_cls = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**SIZES, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(torch.rand_like(p) + 0.5 if name.endswith("norm.weight")
                        else torch.randn_like(p) * 0.1)
    return model


def shape_of(model) -> BlockShape:
    return BlockShape.of(model.config.to_dict())


def logits(model, state=None) -> torch.Tensor:
    if state is not None:
        model.load_state_dict(state)
    ids = torch.randint(0, SIZES["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family,tied", [("llama", False), ("llama", True), ("mistral", False),
                                         ("qwen2", True)])
def test_every_alignment_preserves_the_function(family, tied):
    model = tiny(family, tie_word_embeddings=tied)
    shape = shape_of(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = logits(model)
    for seed in range(3):
        alignment = Alignment.random(shape, torch.Generator().manual_seed(seed))
        alignment.check(shape)
        permuted = permute_state(state, alignment, shape)
        assert any(not torch.equal(permuted[k], state[k]) for k in state)  # it did permute
        after = logits(model, permuted)
        assert torch.allclose(after, before, atol=1e-5, rtol=0), (after - before).abs().max()


def test_a_permutation_that_splits_a_head_changes_the_function():
    """The check is sharp: permuting q and k rows within a head (RoPE pairs broken) does not
    preserve the function, which is why heads move whole."""
    model = tiny()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = logits(model)
    hd = SIZES["hidden_size"] // SIZES["num_attention_heads"]
    inside = torch.cat([torch.randperm(hd, generator=torch.Generator().manual_seed(h)) + h * hd
                        for h in range(SIZES["num_attention_heads"])])
    inside_kv = inside[:SIZES["num_key_value_heads"] * hd]
    state["model.layers.0.self_attn.q_proj.weight"] = state[
        "model.layers.0.self_attn.q_proj.weight"][inside]
    state["model.layers.0.self_attn.k_proj.weight"] = state[
        "model.layers.0.self_attn.k_proj.weight"][inside_kv]
    assert not torch.allclose(logits(model, state), before, atol=1e-3)


def test_an_alignment_that_breaks_gqa_groups_is_refused():
    shape = shape_of(tiny())
    a = Alignment.identity(shape)
    broken = Alignment(residual=a.residual, mlp=a.mlp, kv_heads=a.kv_heads,
                       q_heads=(torch.tensor([0, 2, 1, 3]), *a.q_heads[1:]))
    with pytest.raises(MergeError, match="layer 0's query heads leave their key/value groups"):
        broken.check(shape)


@pytest.mark.parametrize("tied", [False, True])
def test_weight_matching_recovers_a_known_permutation(tied):
    model = tiny(tie_word_embeddings=tied)
    shape = shape_of(model)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    hidden = Alignment.random(shape, torch.Generator().manual_seed(7))
    other = permute_state(ref, hidden, shape)
    found = weight_matching(ref, other, shape)
    back = permute_state(other, found, shape)
    assert all(torch.equal(back[k], ref[k]) for k in ref)
    # found undoes hidden: hidden followed by found is the identity
    composed = hidden.then(found)
    identity = Alignment.identity(shape)
    assert torch.equal(composed.residual, identity.residual)
    for layer in range(shape.num_layers):
        assert torch.equal(composed.mlp[layer], identity.mlp[layer])
        assert torch.equal(composed.q_heads[layer], identity.q_heads[layer])
        assert torch.equal(composed.kv_heads[layer], identity.kv_heads[layer])


def test_weight_matching_of_different_inits_is_a_valid_alignment_that_brings_them_closer():
    a, b = tiny(seed=0), tiny(seed=1)
    shape = shape_of(a)
    ra, rb = a.state_dict(), {k: v.clone() for k, v in b.state_dict().items()}
    found = weight_matching(ra, rb, shape)
    found.check(shape)
    aligned = permute_state(rb, found, shape)

    def inner(x):
        return sum(float((ra[k].double() * x[k].double()).sum()) for k in ra)

    assert inner(aligned) > inner(rb)
    assert torch.allclose(logits(b, aligned), logits(b, rb), atol=1e-5, rtol=0)


def test_a_family_the_alignment_does_not_cover_is_named():
    with pytest.raises(MergeError, match="model_type is 'gpt2'"):
        BlockShape.of({"model_type": "gpt2", "n_embd": 64, "n_layer": 2})


def test_an_unknown_tensor_is_named():
    shape = shape_of(tiny())
    with pytest.raises(MergeError, match="model.layers.0.mlp.experts.w1"):
        permute_tensor("model.layers.0.mlp.experts.w1", torch.zeros(3, 3),
                       Alignment.identity(shape), shape)


def test_weight_matching_refuses_different_shapes():
    a, b = tiny(), tiny(intermediate_size=128)
    with pytest.raises(MergeError, match="different shapes of model.layers.0.mlp.gate_proj"):
        weight_matching(a.state_dict(), b.state_dict(), shape_of(a))
