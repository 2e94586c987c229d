"""model_stock: interpolate between the base and the fine-tunes' average by a ratio t set by
the mean angle between their task vectors (whole tensors, or per row with filter_wise)."""

from __future__ import annotations

import torch

from evomerge.methods.base import Paper, ParamScope, ParamSpec
from evomerge.methods.whole import BasePolicy, Inputs, WholeTensorMerge


def _merge(inputs: Inputs, shared, per_source) -> torch.Tensor:
    assert inputs.base is not None
    w0, ws = inputs.base, list(inputs.others)
    shape = w0.shape
    if shared["filter_wise"]:
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos_theta
    # at the singularity there is no finite estimate: keep the base for that row
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos_theta), (n * cos_theta) / safe)
    average = sum(ws) / n
    return (t * average + (1 - t) * w0).reshape(shape)


METHOD = WholeTensorMerge(
    name="model_stock",
    paper=Paper("Model Stock: All we need is just a few fine-tuned models", "2403.19522"),
    params=(ParamSpec("filter_wise", bool, ParamScope.SHARED, False),),
    fn=_merge,
    base_policy=BasePolicy.REQUIRED,
    min_inputs=3,
)
