"""nuslerp: slerp of two models (or of their task vectors, with a base) by their weights,
over whole tensors, rows or columns."""

from __future__ import annotations

import torch

from evomerge.methods.base import Paper, ParamScope, ParamSpec
from evomerge.methods.whole import BasePolicy, Inputs, WholeTensorMerge, weights_of

EPS = 1e-8


def _unit(x: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=eps)


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, dim: int = -1,
            flatten: bool = False) -> torch.Tensor:
    """Slerp along the last axis (or `dim`, or the whole flattened tensor); linear where
    1 - cos²θ <= eps² (collinear), in the inputs' dtype."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    cos_theta = torch.sum(_unit(v0) * _unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))  # finite on the unused branch
    sin_theta = torch.sin(theta)
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(shape)


def _merge(inputs: Inputs, shared, per_source) -> torch.Tensor:
    weights = weights_of(inputs, per_source)
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    dim = 0 if shared["nuslerp_row_wise"] else -1
    flatten = shared["nuslerp_flatten"]
    a, b = inputs.others
    if inputs.base is None:
        return nuslerp(t, a, b, dim=dim, flatten=flatten)
    base = inputs.base
    return base + nuslerp(t, a - base, b - base, dim=dim, flatten=flatten)


METHOD = WholeTensorMerge(
    name="nuslerp",
    paper=Paper("NuSLERP (mergekit's generalized slerp)", "",
                link="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md"),
    params=(
        ParamSpec("weight", float, ParamScope.NON_BASE),
        ParamSpec("nuslerp_row_wise", bool, ParamScope.SHARED, False),
        ParamSpec("nuslerp_flatten", bool, ParamScope.SHARED, True),
    ),
    fn=_merge,
    base_policy=BasePolicy.OPTIONAL,
    min_non_base=2,
    max_non_base=2,
)
