"""multislerp: barycentric interpolation of any number of models (or task vectors) on the
hypersphere, through the tangent space at their weighted mean direction."""

from __future__ import annotations

import torch

from evomerge.methods.base import Paper, ParamScope, ParamSpec
from evomerge.methods.whole import BasePolicy, Inputs, WholeTensorMerge, weights_of


def _merge(inputs: Inputs, shared, per_source) -> torch.Tensor:
    if len(inputs.others) == 1:
        return inputs.others[0]
    eps = shared["eps"]
    base = inputs.base
    x = torch.stack(inputs.others, dim=0)
    if base is not None:
        x -= base
    flat = x.view(x.shape[0], -1)
    weights = torch.tensor(weights_of(inputs, per_source), dtype=x.dtype, device=x.device)
    if shared["normalize_weights"]:
        weights = weights / weights.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if x.shape[0] != 2:
            raise ValueError(
                f"multislerp: the weighted sum of the unit inputs is zero for {inputs.name} "
                "(antipodal inputs whose weights balance out); try other weights")
        res = (x[0] * weights[0] + x[1] * weights[1]).view(x.shape[1:])  # linear fallback
        return res if base is None else res + base
    mean = mean / mean_norm
    dots = (units * mean).sum(-1, keepdim=True)
    tangent = ((units - dots * mean) * weights.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = result * (norms.squeeze(-1) * weights).sum()  # the weighted mean norm
    result = result.view(x.shape[1:])
    return result if base is None else result + base


METHOD = WholeTensorMerge(
    name="multislerp",
    paper=Paper("Multi-SLERP (Goddard)", "",
                link="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"),
    params=(
        ParamSpec("weight", float, ParamScope.NON_BASE),
        ParamSpec("normalize_weights", bool, ParamScope.SHARED, True),
        ParamSpec("eps", float, ParamScope.SHARED, 1e-8),
    ),
    fn=_merge,
    base_policy=BasePolicy.OPTIONAL,
    min_non_base=1,
)
