"""Recipes of the whole-tensor methods (slerp ... ramplus_tl, tsv, iso_c, iso_cts, passthrough) over a family
[base, ft1, ft2, ft3], with gradients, filters and per-slice parameters, for the tests."""

from __future__ import annotations

from typing import Any

# method -> (how many fine-tunes, whether the base is a source, shared parameters,
# per-model parameters of fine-tune i, per-slice parameters of slice j)
WHOLE: dict[str, tuple[int, bool, dict, Any, Any]] = {
    "slerp": (1, True, {"t": [{"filter": "self_attn", "value": [0.1, 0.9]}, {"value": 0.6}]},
              None, lambda j: {"t": 0.3 + 0.2 * j}),
    "nuslerp": (2, True, {"nuslerp_flatten": False,
                          "nuslerp_row_wise": [{"filter": "mlp", "value": True}, {"value": False}]},
                lambda i: {"weight": [0.2 + 0.3 * i, 0.7]}, lambda j: {"nuslerp_flatten": j == 1}),
    "multislerp": (3, True, {}, lambda i: {"weight": 0.2 + 0.1 * i},
                   lambda j: {"normalize_weights": j != 1}),
    "karcher": (3, True, {"max_iter": 5}, None, lambda j: {"tol": 1e-5 * (1 + j)}),
    "model_stock": (3, True, {"filter_wise": [{"filter": "mlp", "value": True}, {"value": False}]},
                    None, lambda j: {"filter_wise": j == 0}),
    "nearswap": (1, True, {"t": [0.001, 0.05]}, None, lambda j: {"t": 0.01 * (j + 1)}),
    "arcee_fusion": (1, True, {}, None, lambda j: {}),
    "sce": (3, True, {"select_topk": [0.3, 1.0]}, None, lambda j: {"select_topk": 0.2 + 0.3 * j}),
    "ram": (3, True, {"epsilon": 0.04}, None, lambda j: {"epsilon": 0.02 * (j + 1)}),
    "ramplus_tl": (3, True, {"r": 0.3, "alpha": 0.5, "epsilon": 0.04}, None,
                   lambda j: {"r": 0.1 * (j + 1)}),
    "tsv": (3, True, {"rank_fraction": [0.5, 1.0], "alpha": [{"filter": "mlp", "value": 0.8},
                                                              {"value": 1.0}]},
            lambda i: {"weight": [0.5 + 0.2 * i, 1.0]}, lambda j: {"alpha": 0.6 + 0.2 * j}),
    "iso_c": (3, True, {"alpha": [0.5, 1.5]}, lambda i: {"weight": 0.5 + 0.25 * i},
              lambda j: {"alpha": 0.8 + 0.1 * j}),
    "iso_cts": (3, True, {"common_space_fraction": [0.5, 0.9]}, lambda i: {"weight": 1.0},
                lambda j: {"common_space_fraction": 0.3 * j, "alpha": 1.2}),
    "passthrough": (1, False, {}, lambda i: {"scale": [{"filter": "o_proj", "value": 0.5},
                                                       {"value": 1.0}]}, lambda j: {}),
}


def whole_sources(method: str, fam: list[str]) -> tuple[list[str], str | None]:
    """(the merger's models, its base_model) for `method` over fam = [base, ft1, ...]."""
    n, with_base, *_ = WHOLE[method]
    return fam[1:1 + n], fam[0] if with_base else None


def whole_recipe(method: str, fam: list[str], dtype: str = "float32", *, slices: bool = False,
                 bounds=(0, 2, 5, 6)) -> dict:
    """A recipe dict; `slices`: the same sources over layer groups with per-slice parameters."""
    _, _, shared, per_model, per_slice = WHOLE[method]
    models, base = whole_sources(method, fam)
    data: dict = {"merge_method": method, "dtype": dtype, "parameters": dict(shared)}
    if base is not None:
        data["base_model"] = base
    if dtype != "float32":
        data["out_dtype"] = dtype  # arcee_fusion's mask is float32: its result too, else

    def params(i: int) -> dict:
        return {"parameters": per_model(i)} if per_model else {}

    if not slices:
        data["models"] = [{"model": m, **params(i)} for i, m in enumerate(models)]
        return data
    order = [*models, *([base] if base else [])]  # the models-form order: the base last
    data["slices"] = [
        {"sources": [{"model": m, "layer_range": [lo, hi], **(params(i) if m != base else {})}
                     for i, m in enumerate(order)], "parameters": per_slice(j)}
        for j, (lo, hi) in enumerate(zip(bounds, bounds[1:], strict=False))]
    return data
