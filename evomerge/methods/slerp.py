"""slerp: spherical linear interpolation between the base and one other model, by t."""

from __future__ import annotations

import torch

from evomerge.methods.base import Paper, ParamScope, ParamSpec
from evomerge.methods.whole import BasePolicy, Inputs, WholeTensorMerge, work_dtype

DOT_THRESHOLD = 0.9995  # |cos| above it: (nearly) collinear, interpolate linearly
EPS = 1e-8
CHUNK_ELEMENTS = 1024 * 1024  # mergekit's norm chunks: the norm is a norm of chunk norms


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """(sin((1-t)θ) v0 + sin(tθ) v1) / sin θ over the whole flattened tensor, θ the angle of
    v0 and v1; linear where |cos θ| > DOT_THRESHOLD. Coefficients in float32 (float64 stays),
    the result in the inputs' dtype, with mergekit 0.1.5's reductions (chunked norms and dot)."""
    dtype = work_dtype(v0)
    flat = v0.reshape(1, -1)
    tt = torch.tensor([t], dtype=dtype, device=v0.device).reshape(-1, 1)
    if not flat.shape[1]:
        return ((1 - tt) * flat + tt * v1.reshape(1, -1)).reshape(v0.shape).to(v0.dtype)
    # converted once, not once per pass (three passes read them): the same values, one tensor's
    # worth of work-dtype copies held
    a, b = flat.to(dtype), v1.reshape(1, -1).to(dtype)
    spans = [(lo, lo + CHUNK_ELEMENTS) for lo in range(0, a.shape[1], CHUNK_ELEMENTS)]
    norm_a = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(a[:, lo:hi], dim=1, keepdim=True) for lo, hi in spans]),
        dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(b[:, lo:hi], dim=1, keepdim=True) for lo, hi in spans]),
        dim=0)
    norm_a = torch.where(norm_a > EPS, norm_a, 1)
    norm_b = torch.where(norm_b > EPS, norm_b, 1)
    # normalized before multiplying, so the raw dot cannot overflow
    dot = torch.stack([((a[:, lo:hi] / norm_a) * (b[:, lo:hi] / norm_b))
                       .sum(dim=1, keepdim=True) for lo, hi in spans]).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    result = torch.empty_like(flat)
    for lo, hi in spans:
        result[:, lo:hi] = coef_a * a[:, lo:hi] + coef_b * b[:, lo:hi]
    return result.reshape(v0.shape)


def _merge(inputs: Inputs, shared, per_source) -> torch.Tensor:
    assert inputs.base is not None
    return slerp(shared["t"], inputs.base, inputs.others[0])


METHOD = WholeTensorMerge(
    name="slerp",
    paper=Paper("Animating rotation with quaternion curves (Shoemake, SIGGRAPH 1985)", "",
                link="https://en.wikipedia.org/wiki/Slerp"),
    params=(ParamSpec("t", float, ParamScope.SHARED),),
    fn=_merge,
    base_policy=BasePolicy.REQUIRED,
    min_inputs=2,
    max_inputs=2,
)
