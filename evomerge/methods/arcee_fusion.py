"""arcee_fusion: keep the other model's value only where its change is important: |delta|
times the KL divergence of the rows' softmaxes, above median + 1.5 IQR of that importance."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from evomerge.methods.base import Paper
from evomerge.methods.whole import BasePolicy, Inputs, WholeTensorMerge

QUANTILES = (0.25, 0.5, 0.75)


def importance(params: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|params - base| * KL(softmax(params) || softmax(base)) along the last axis."""
    eps = 1e-8
    p = F.softmax(params, dim=-1) + eps
    q = F.softmax(base, dim=-1) + eps
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (params - base).abs() * kl


def quantiles(x: torch.Tensor) -> torch.Tensor:
    """The sorted values at index int(q * (numel - 1)) for q in QUANTILES, over every element
    (mergekit samples 1,000,000 elements at random above that size; evomerge sorts them all,
    so the result is deterministic)."""
    ordered, _ = torch.sort(x.reshape(-1))
    q = torch.tensor(QUANTILES)
    return ordered[(q.to(ordered.device) * (ordered.numel() - 1)).long()]


def _merge(inputs: Inputs, shared, per_source) -> torch.Tensor:
    assert inputs.base is not None
    base, other = inputs.base, inputs.others[0]
    score = importance(other, base)
    q1, median, q3 = quantiles(score)
    mask = (score >= median + 1.5 * (q3 - q1)).float()
    return base + (other - base) * mask


METHOD = WholeTensorMerge(
    name="arcee_fusion",
    paper=Paper("Arcee Fusion (Arcee AI)", "", link="https://arcee.ai"),
    params=(),
    fn=_merge,
    base_policy=BasePolicy.REQUIRED,
    min_inputs=2,
    max_inputs=2,
)
