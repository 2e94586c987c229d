"""TSV-Merge, Iso-C and Iso-CTS against direct float64 NumPy implementations of the papers'
formulas (written here, independently of evomerge/methods/{tsv,iso}.py: the orthogonal polar
factor through an eigendecomposition, not an SVD), their fallback for tensors that are not layer
matrices, and the properties the papers state (a flat spectrum; decorrelated singular vectors)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evomerge.methods.registry import TensorGroup, get_method

MATRIX = "model.layers.0.mlp.up_proj.weight"


def merge(name: str, base: np.ndarray, others: list[np.ndarray], weights=None,
          tensor_name: str = MATRIX, **shared) -> np.ndarray:
    method = get_method(name)
    values = {p.name: p.default for p in method.params if p.scope.value == "shared"}
    values.update(shared)
    weights = weights or [1.0] * len(others)
    tensors = {0: torch.from_numpy(base)} | {i + 1: torch.from_numpy(x)
                                              for i, x in enumerate(others)}
    per = {0: {}} | {i + 1: {"weight": w} for i, w in enumerate(weights)}
    out = method.merge(TensorGroup(tensor_name, tensors, base=0), values, per, mask_seed=0)
    return out.numpy()


def family(shape=(12, 9), n=3, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(shape)
    # fine-tunes: the base plus task updates of moderate rank
    return base, [base + rng.standard_normal((shape[0], 4)) @ rng.standard_normal((4, shape[1]))
                  + 0.1 * rng.standard_normal(shape) for _ in range(n)]


def orth_cols(a: np.ndarray) -> np.ndarray:
    """a (a^T a)^(-1/2): the closest matrix with orthonormal columns (eigendecomposition)."""
    w, q = np.linalg.eigh(a.T @ a)
    return a @ q @ np.diag(w ** -0.5) @ q.T


def tsv_reference(base, others, weights, k_frac, alpha):
    """Gargiulo et al. (2025), Alg. 1 per layer: Delta_i = U_i S_i V_i^T truncated to the top
    k = frac * min(m, n) / T; U = [U_1..U_T], V = [V_1..V_T] (as columns); U_perp, V_perp their
    orthogonal Procrustes projections; merged = U_perp blockdiag(S_i) V_perp^T."""
    deltas = [w * (x - base) for w, x in zip(weights, others, strict=True)]
    t, full = len(deltas), min(base.shape)
    k = max(1, min(full // t, int(full * k_frac / t)))
    us, ss, vs = [], [], []
    for d in deltas:
        u, s, vt = np.linalg.svd(d, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vt[:k].T)
    u_perp = orth_cols(np.concatenate(us, axis=1))
    v_perp = orth_cols(np.concatenate(vs, axis=1))
    return base + alpha * u_perp @ np.diag(np.concatenate(ss)) @ v_perp.T


def iso_c_reference(base, others, weights, alpha):
    """Marczak et al. (2025), eq. (5): Delta_TA = sum_i Delta_i = U S V^T;
    Delta_iso = sigma_bar U V^T with sigma_bar the mean singular value."""
    d = sum(w * (x - base) for w, x in zip(weights, others, strict=True))
    u, s, vt = np.linalg.svd(d, full_matrices=False)
    return base + alpha * s.mean() * u @ vt


def iso_cts_reference(base, others, weights, frac, alpha):
    """Marczak et al. (2025), Alg. 1: the common subspace (top k of Delta_TA), each task's own
    top s directions of (I - U_k U_k^T) Delta_i, k + T s = r; U, V orthogonalized (Procrustes),
    every singular value replaced by the mean of the kept ones."""
    deltas = [w * (x - base) for w, x in zip(weights, others, strict=True)]
    t, r = len(deltas), min(base.shape)
    s_task = round((r - int(r * frac)) / t)
    k = r - s_task * t
    u, sv, vt = np.linalg.svd(sum(deltas), full_matrices=False)
    uk, vk, sk = u[:, :k], vt[:k].T, sv[:k]
    cols_u, cols_v, sigmas = [uk], [vk], [sk]
    for d in deltas:
        ut, st, vtt = np.linalg.svd(d - uk @ uk.T @ d, full_matrices=False)
        cols_u.append(ut[:, :s_task])
        cols_v.append(vtt[:s_task].T)
        sigmas.append(st[:s_task])
    u_perp = orth_cols(np.concatenate(cols_u, axis=1))
    v_perp = orth_cols(np.concatenate(cols_v, axis=1))
    return base + alpha * np.concatenate(sigmas).mean() * u_perp @ v_perp.T


@pytest.mark.parametrize("shape", [(12, 9), (7, 15)])
def test_tsv_equals_the_papers_formula(shape):
    base, others = family(shape)
    for k_frac, alpha, weights in ((1.0, 1.0, [1.0] * 3), (0.5, 0.7, [0.5, 1.2, 0.9])):
        got = merge("tsv", base, others, weights, rank_fraction=k_frac, alpha=alpha)
        want = tsv_reference(base, others, weights, k_frac, alpha)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_tsv_keeps_one_task_exactly_and_decorrelates_several():
    base, others = family((10, 10), n=2)
    # one task at full rank: its own matrix back (nothing to decorrelate)
    np.testing.assert_allclose(merge("tsv", base, others[:1]), others[0], atol=1e-9)
    # two rank-2 tasks in orthogonal subspaces, 2 triplets kept of each (int(10 * 0.4 / 2)):
    # summed unchanged (no interference to remove)
    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((10, 10)))
    d1, d2 = q[:, :2] @ np.diag([3.0, 1.0]) @ q[:, :2].T, q[:, 5:7] @ np.diag([2.0, 0.5]) @ q[:, 7:9].T
    np.testing.assert_allclose(merge("tsv", base, [base + d1, base + d2], rank_fraction=0.4),
                               base + d1 + d2, atol=1e-9)
    # overlapping tasks: the merged update's left singular vectors come out orthonormal, and
    # its singular values are the kept ones of every task
    got = merge("tsv", base, others, rank_fraction=0.4) - base
    kept = np.sort(np.concatenate([np.linalg.svd(x - base, compute_uv=False)[:2]
                                   for x in others]))
    np.testing.assert_allclose(np.sort(np.linalg.svd(got, compute_uv=False))[-4:], kept,
                               rtol=1e-9)


@pytest.mark.parametrize("shape", [(12, 9), (7, 15)])
def test_iso_c_equals_the_papers_formula_and_its_spectrum_is_flat(shape):
    base, others = family(shape)
    weights = [0.8, 1.0, 1.3]
    got = merge("iso_c", base, others, weights, alpha=1.4)
    np.testing.assert_allclose(got, iso_c_reference(base, others, weights, 1.4), rtol=1e-9,
                               atol=1e-9)
    s = np.linalg.svd(got - base, compute_uv=False)
    np.testing.assert_allclose(s, np.full_like(s, s.mean()), rtol=1e-9)


@pytest.mark.parametrize("frac", [0.8, 0.5, 0.0])
def test_iso_cts_equals_the_papers_formula(frac):
    base, others = family((12, 9))
    weights = [1.0, 0.6, 1.1]
    got = merge("iso_cts", base, others, weights, common_space_fraction=frac, alpha=1.2)
    want = iso_cts_reference(base, others, weights, frac, 1.2)
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-8)
    s = np.linalg.svd(got - base, compute_uv=False)  # isotropic too
    np.testing.assert_allclose(s, np.full_like(s, s.mean()), rtol=1e-8)


def test_iso_cts_with_the_whole_rank_common_is_iso_c():
    base, others = family((12, 9))
    np.testing.assert_allclose(merge("iso_cts", base, others, common_space_fraction=1.0),
                               merge("iso_c", base, others), atol=1e-9)


@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts"])
def test_other_tensors_fall_back_to_the_mean_task_vector(name):
    rng = np.random.default_rng(3)
    for shape, tensor_name in (((9,), "model.layers.0.input_layernorm.weight"),
                               ((20, 6), "model.embed_tokens.weight"), ((20, 6), "lm_head.weight")):
        base = rng.standard_normal(shape)
        others = [base + rng.standard_normal(shape) for _ in range(3)]
        weights = [0.5, 1.0, 2.0]
        want = base + 0.9 * np.mean([w * (x - base) for w, x in zip(weights, others, strict=True)],
                                    axis=0)
        got = merge(name, base, others, weights, tensor_name=tensor_name, alpha=0.9)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts"])
def test_float32_and_bfloat16_inputs_keep_their_dtype(name):
    base, others = family((8, 6))
    method = get_method(name)
    values = {p.name: p.default for p in method.params if p.scope.value == "shared"}
    for dtype in (torch.float32, torch.bfloat16):
        tensors = {i: torch.from_numpy(x).to(dtype) for i, x in enumerate([base, *others])}
        per = {i: {"weight": 1.0} for i in range(4)}
        out = method.merge(TensorGroup(MATRIX, tensors, base=0), values, per, mask_seed=0)
        assert out.dtype == dtype and out.shape == (8, 6) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="needs the base model"):
        method.merge(TensorGroup(MATRIX, {0: torch.zeros(2, 2), 1: torch.ones(2, 2)}, base=None),
                     values, {0: {"weight": 1.0}, 1: {"weight": 1.0}}, mask_seed=0)


@pytest.mark.parametrize("space_name,dim", [("ps_tsv", 3 * 4 + 1), ("ps_tsv_fine", 3 * 10 + 1)])
def test_the_tsv_spaces_decode_to_tsv_recipes_on_the_zoo(zoo_dir, space_name, dim):
    from pathlib import Path

    from evomerge.models.sources import load_source
    from evomerge.search.codecs.parameter import Codec
    from evomerge.search.spaces.parameter import SearchSpace

    space = SearchSpace.load(Path(__file__).resolve().parents[1] / "search_spaces"
                             / f"{space_name}.yaml")
    specs = [str(zoo_dir / f"spec_{s}") for s in ("add", "rev", "sub")]
    codec = Codec(space, specs, str(zoo_dir / "base"), load_source(str(zoo_dir / "base")).layout)
    assert codec.dim == dim
    recipe = codec.to_recipe(codec.x0)  # the start: weight 1.5 everywhere, rank fraction 0.5
    assert recipe.merge_method == "tsv" and recipe.base_model == str(zoo_dir / "base")
    text = recipe.to_yaml()
    assert "rank_fraction: 0.5" in text and "value: 1.5" in text


def test_the_quality_config_validates():
    from pathlib import Path

    import yaml

    from evomerge.search.config import SearchConfig

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/zoo_quality.yaml").read_text())
    cfg = SearchConfig.from_dict(raw)
    assert cfg.space.method == "tsv" and cfg.budget.generations * cfg.optimizer.popsize == 150


def test_a_mergekit_export_of_a_spectral_recipe_says_mergekit_cannot_run_it():
    from evomerge.recipes.mergekit import mergekit_yaml
    from evomerge.recipes.parameter_space import Recipe

    for name in ("tsv", "iso_c", "iso_cts"):
        recipe = Recipe.from_dict({"merge_method": name, "base_model": "b",
                                   "models": [{"model": "x"}, {"model": "y"}]})
        assert f"# {name} is evomerge's own method: mergekit 0.1.5 cannot run" in mergekit_yaml(recipe)
    ties = Recipe.from_dict({"merge_method": "ties", "base_model": "b",
                             "models": [{"model": "x", "parameters": {"weight": 1.0}}]})
    assert "cannot run" not in mergekit_yaml(ties)
