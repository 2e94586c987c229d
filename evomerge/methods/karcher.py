"""karcher: the Karcher (Riemannian) mean of the models' directions on the unit hypersphere,
scaled by their mean norm; equal weights, every source an input (the base too)."""

from __future__ import annotations

import torch

from evomerge.methods.base import Paper, ParamScope, ParamSpec
from evomerge.methods.whole import BasePolicy, Inputs, WholeTensorMerge, work_dtype


def karcher_mean(tensors: list[torch.Tensor], alphas: list[float], max_iter: int,
                 tol: float) -> torch.Tensor:
    """Riemannian gradient descent from the normalized weighted mean of the unit inputs:
    at most max_iter steps, stopping when the tangent's norm falls below tol. Norms are taken
    in float32 (float64 stays); inputs whose norm is at most tol take no part in the mean."""
    if len(tensors) == 1:
        return tensors[0]
    dtype = work_dtype(tensors[0])
    norms, units = [], []
    for x in tensors:
        norm = torch.linalg.vector_norm(x.to(dtype))
        norms.append(norm)
        units.append(torch.zeros_like(x) if norm.item() == 0.0 else (x / norm).to(x.dtype))
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return sum(x * 0 for x in tensors)  # type: ignore[return-value]
    alpha_sum = sum(alphas[i] for i in valid)
    weights = [alphas[i] / alpha_sum for i in valid]
    points = [units[i] for i in valid]
    mean = torch.zeros_like(points[0])
    for w, u in zip(weights, points, strict=True):
        mean += w * u
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = points[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for w, u in zip(weights, points, strict=True):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += w * (theta / torch.sin(theta)) * (u - dot * mean)  # log map
        tangent_norm = torch.linalg.vector_norm(tangent.to(dtype))
        if tangent_norm.item() < tol:
            break
        mean = (torch.cos(tangent_norm) * mean
                + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(mean.dtype)  # exp map
        unit_norm = torch.linalg.vector_norm(mean.to(dtype))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    scale = sum(a * n for a, n in zip(alphas, norms, strict=True))
    return scale * mean


def _merge(inputs: Inputs, shared, per_source) -> torch.Tensor:
    tensors = list(inputs.others)  # base ignored: every source is one of them
    if len(tensors) == 1:
        return tensors[0]
    alphas = [1.0 / len(tensors)] * len(tensors)
    return karcher_mean(tensors, alphas, shared["max_iter"], shared["tol"])


METHOD = WholeTensorMerge(
    name="karcher",
    paper=Paper("Karcher mean merging (the paper mergekit 0.1.5 cites)", "2603.04972"),
    params=(
        ParamSpec("max_iter", int, ParamScope.SHARED, 10),
        ParamSpec("tol", float, ParamScope.SHARED, 1e-5),
    ),
    fn=_merge,
    base_policy=BasePolicy.IGNORED,
)
