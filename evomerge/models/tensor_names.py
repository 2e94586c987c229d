"""Checkpoint tensor names and a loaded model's tensors: one map, transformers' own rules.

A model folder stores tensors under checkpoint names; transformers 5 renames or fuses some when it
loads them (its conversion mapping: gpt_neox's ``embed_out`` is the model's ``lm_head``, Mixtral's
per-expert ``block_sparse_moe.experts.E.w1/w3/w2`` are slices of fused ``mlp.experts.gate_up_proj``
and ``down_proj``) and ties heads to embeddings. Merges, the in-place merger and the vLLM swap all
speak checkpoint names, so they go through this map:

- ``checkpoint_state(model)``: what ``save_pretrained`` would write (tied copies dropped,
  conversions reverted): the names vLLM's ``load_weights`` expects;
- ``checkpoint_views(model)``: checkpoint name -> a writable view of the model tensor that holds
  it (the model's own tensor for a plain or renamed one, a strided view into the fused tensor for
  a fused one), found by reverting the conversion on the tensors' element indices.
"""

from __future__ import annotations

import torch

from evomerge.core.errors import MergeError


def _saved_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as save_pretrained takes it, tied copies and ignored keys dropped."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = model.state_dict()
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(key, None)
    return remove_tied_weights_from_state_dict(state, model)


def _revert(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, state)


def checkpoint_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under checkpoint names, as save_pretrained writes them."""
    return _revert(model, _saved_state(model))


def checkpoint_views(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Checkpoint name -> a view of the model's tensor holding it (writing it writes the model)."""
    state = _saved_state(model)
    out = _revert(model, dict(state))
    by_id = {id(t): n for n, t in state.items()}
    views = {k: t for k, t in out.items() if id(t) in by_id}
    converted = [k for k in out if k not in views]
    if not converted:
        return views
    # The converted tensors: revert their element indices to find each one's place.
    used = {by_id[id(t)] for t in views.values()}
    offsets, index_state, start = {}, {}, 0
    for n, t in state.items():
        if n not in used:
            offsets[n] = start
            index_state[n] = torch.arange(start, start + t.numel()).view(t.shape)
            start += t.numel()
    positions = _revert(model, index_state)
    for k in converted:
        views[k] = _view_of(k, positions[k], state, offsets)
    return views


def _view_of(name: str, index: torch.Tensor, state: dict[str, torch.Tensor],
             offsets: dict[str, int]) -> torch.Tensor:
    first = int(index.reshape(-1)[0])
    owner = next((n for n, o in offsets.items() if o <= first < o + state[n].numel()), None)
    if owner is None:
        raise MergeError(f"{name}: no tensor of the loaded model holds it")
    local = index - offsets[owner]
    param = state[owner]
    if int(local.min()) < 0 or int(local.max()) >= param.numel():
        raise MergeError(f"{name}: transformers builds it from more than one loaded tensor; this "
                         "architecture cannot be merged in place")
    offset = int(local.reshape(-1)[0])
    strides = []
    for d, size in enumerate(local.shape):
        if size == 1:
            strides.append(1)
            continue
        step = [0] * local.dim()
        step[d] = 1
        strides.append(int(local[tuple(step)]) - offset)
    flat = torch.arange(param.numel())
    if any(s < 0 for s in strides) or not torch.equal(
            flat.as_strided(tuple(local.shape), tuple(strides), offset), local):
        raise MergeError(f"{name}: transformers stores it inside {owner} in a way that is not one "
                         "strided view; this architecture cannot be merged in place")
    return param.as_strided(tuple(local.shape), tuple(strides), param.storage_offset() + offset)
