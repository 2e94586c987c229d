"""Merge methods: one module per method (metadata plus tensor math), collected by `registry`."""

from evomerge.methods.registry import (
    MergeMethod,
    Paper,
    ParamScope,
    ParamSpec,
    TensorGroup,
    get_method,
    merge_group,
    method_names,
    param_spec,
    registered_methods,
    uses_random_masks,
)

__all__ = [
    "MergeMethod",
    "Paper",
    "ParamScope",
    "ParamSpec",
    "TensorGroup",
    "get_method",
    "merge_group",
    "method_names",
    "param_spec",
    "registered_methods",
    "uses_random_masks",
]
