"""nearswap: take the other model's value where it is near the base's (|a - b| < t), and
interpolate toward it by t / |a - b| elsewhere."""

from __future__ import annotations

import torch

from evomerge.methods.base import Paper, ParamScope, ParamSpec
from evomerge.methods.whole import BasePolicy, Inputs, WholeTensorMerge


def _merge(inputs: Inputs, shared, per_source) -> torch.Tensor:
    assert inputs.base is not None
    a, b = inputs.base, inputs.others[0]
    weight = (shared["t"] / torch.abs(a - b).clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * a


METHOD = WholeTensorMerge(
    name="nearswap",
    paper=Paper("NearSwap (alchemonaut, QuartetAnemoi-70B)", "",
                link="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"),
    params=(ParamSpec("t", float, ParamScope.SHARED),),
    fn=_merge,
    base_policy=BasePolicy.REQUIRED,
    min_inputs=2,
    max_inputs=2,
)
