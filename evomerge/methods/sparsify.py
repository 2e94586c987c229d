"""Sparsifiers for task vectors (deltas), selected by an enum; stateless functions.

Random masks (DARE, DELLA) come from counter-based uniforms keyed by (mask seed, mask key), not
from a global generator: the same recipe always gives the same mask, on CPU and GPU alike, and a
higher keep probability keeps a superset of the elements that a lower one keeps (mask = U < p).
"""

from __future__ import annotations

import hashlib
import math
from enum import StrEnum

import torch


class Sparsifier(StrEnum):
    MAGNITUDE = "magnitude"  # TIES: keep the top-k |delta|
    RANDOM = "random"  # DARE: keep each element with probability density
    MAGNITUDE_OUTLIERS = "magnitude_outliers"  # breadcrumbs: drop the largest and the smallest
    DELLA_MAGPRUNE = "della_magprune"  # DELLA: keep probability grows with the magnitude rank


class RescaleMode(StrEnum):
    """How `rescale: true` restores the scale of a sparsified delta."""

    L1 = "l1"  # mergekit >= 0.1.0: match the L1 norm of the dense delta (per tensor)
    INVERSE_DENSITY = "inverse_density"  # DARE paper (mergekit < 0.1.0): divide by density


# --- counter-based uniforms (splitmix64 over int64 torch ops) ---------------------------------

_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _signed(value: int) -> int:
    """A 64-bit unsigned constant as the int64 with the same bits (torch has no uint64 math)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    # torch's >> on int64 is arithmetic; clearing the sign-extended bits makes it logical.
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def stream_key(mask_seed: int, key: str) -> int:
    """64-bit stream key: the first 8 bytes (little endian) of sha256(f"{mask_seed}:{key}")."""
    digest = hashlib.sha256(f"{mask_seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def uniforms(mask_seed: int, key: str, shape: torch.Size | tuple[int, ...],
             device: torch.device | str = "cpu") -> torch.Tensor:
    """float64 uniforms in [0, 1): element i (row-major) is splitmix64(stream_key + (i+1)*golden).

    Integer products wrap modulo 2**64 in int64 on CPU and CUDA alike, and the top 53 bits of the
    mixed value become an exact float64, so every device yields the same bits.
    """
    n = math.prod(shape)
    z = torch.arange(1, n + 1, dtype=torch.int64, device=device) * _signed(_GOLDEN)
    z = z + _signed(stream_key(mask_seed, key))
    z = (z ^ _shr(z, 30)) * _signed(_MIX1)
    z = (z ^ _shr(z, 27)) * _signed(_MIX2)
    z = z ^ _shr(z, 31)
    return (_shr(z, 11).to(torch.float64) * 2.0**-53).reshape(shape)


def uniforms_reference(mask_seed: int, key: str, n: int) -> list[float]:
    """Pure-Python twin of `uniforms` (unbounded ints, explicit mod 2**64), for tests and docs."""
    m = (1 << 64) - 1
    out = []
    for i in range(1, n + 1):
        z = (stream_key(mask_seed, key) + i * _GOLDEN) & m
        z = ((z ^ (z >> 30)) * _MIX1) & m
        z = ((z ^ (z >> 27)) * _MIX2) & m
        z ^= z >> 31
        out.append((z >> 11) * 2.0**-53)
    return out


# --- masks and rescaling -----------------------------------------------------------------------


def _work_dtype(tensor: torch.Tensor) -> torch.dtype:
    # float16 arithmetic is not implemented for everything on CPU; use float32 there on all
    # devices so results do not depend on the device.
    return torch.float32 if tensor.dtype == torch.float16 else tensor.dtype


def _apply_mask(tensor: torch.Tensor, mask: torch.Tensor, density: float,
                rescale: RescaleMode | None) -> torch.Tensor:
    masked = tensor * mask
    if rescale is None:
        return masked
    if rescale is RescaleMode.INVERSE_DENSITY:
        return masked / density
    before, after = tensor.abs().sum(), masked.abs().sum()
    if before < 1e-7 or after < 1e-7:  # mergekit's guard: nothing sensible to match
        return masked
    return masked * (before / after)


def sort_key(tensor: torch.Tensor) -> torch.Tensor:
    """|x| flattened as mergekit 0.1.5 sorts it: float32 on CPU (float64 too), the dtype elsewhere.

    The magnitude sparsifiers then call torch's default (non-stable) sort on it, as mergekit
    does: where |x| ties exactly at the density cut, which of the tied elements are kept is what
    that sort gives. It is a function of the values alone for a given torch build and device
    (not of memory layout or thread count), so the same call on the same values selects what
    mergekit selects; across devices (CPU vs CUDA) or torch versions the tied choice may differ.
    """
    w = tensor.abs().reshape(-1)
    return w.float() if w.device.type == "cpu" else w


def magnitude_order(tensor: torch.Tensor, descending: bool) -> torch.Tensor:
    """mergekit's order of |x|: argsort (ties) or sort(...).indices (breadcrumbs), non-stable."""
    key = sort_key(tensor)
    if descending:
        return torch.argsort(key, descending=True)
    return torch.sort(key, descending=False).indices


def magnitude(delta: torch.Tensor, density: float,
              rescale: RescaleMode | None = None) -> torch.Tensor:
    """Keep the k = max(1, int(density * numel)) largest |delta|; zeros for density <= 0."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    top = magnitude_order(delta, descending=True)[:k]
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    mask[top] = 1
    return _apply_mask(delta, mask.reshape_as(delta), density, rescale)


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float = 0.01,
                       rescale: RescaleMode | None = None) -> torch.Tensor:
    """Breadcrumbs: drop the int(gamma*N) largest |delta|, then the smallest, keeping int(d*N).

    Zeros for density <= 0 (as `magnitude`): nothing is kept, and no rescale divides by zero.
    """
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    n = delta.numel()
    target = max(0, int(density * n))
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)  # outlier removal shrinks if the target needs it
    order = magnitude_order(delta, descending=False)
    mask = torch.zeros(n, dtype=delta.dtype, device=delta.device)
    mask[order[n_bot : n_bot + target]] = 1
    return _apply_mask(delta, mask.reshape_as(delta), density, rescale)


def random(delta: torch.Tensor, density: float, *, mask_seed: int, mask_key: str,
           rescale: RescaleMode | None = None) -> torch.Tensor:
    """DARE: keep element j iff U_j < density, U keyed by (mask_seed, mask_key)."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    u = uniforms(mask_seed, mask_key, delta.shape, delta.device)
    work = _work_dtype(delta)
    mask = (u < density).to(work)
    return _apply_mask(delta.to(work), mask, density, rescale).to(delta.dtype)


def check_della_density(density: float, epsilon: float) -> None:
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(
            f"della: density +/- epsilon must lie inside (0, 1); got density={density}, "
            f"epsilon={epsilon} (keep probabilities {density - epsilon:g} to "
            f"{density + epsilon:g})"
        )


def della_ranks(delta: torch.Tensor) -> torch.Tensor:
    """int64 ranks 0..cols-1 of |delta| along dim 1 (stable), as [rows, cols]; 1-D is one row."""
    x = delta.unsqueeze(0) if delta.dim() < 2 else delta
    order = torch.argsort(x.abs().to(torch.float64), dim=1, stable=True)
    return order.argsort(dim=1, stable=True)


def della_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Keep probabilities (float64): (d - eps) + 2*eps*rank_norm, ranks of |delta| along dim 1.

    1-D tensors are one row. A row of one element gets rank_norm 0.5, i.e. probability d
    (mergekit divides 0 by 0 there).
    """
    check_della_density(density, epsilon)
    ranks = della_ranks(delta).to(torch.float64)
    cols = ranks.shape[1]
    rank_norm = ranks / (cols - 1) if cols > 1 else torch.full_like(ranks, 0.5)
    probs = (density - epsilon) + rank_norm * (2 * epsilon)
    return probs.reshape(delta.shape)


def della_magprune(delta: torch.Tensor, density: float, epsilon: float, *, mask_seed: int,
                   mask_key: str, rescale: RescaleMode | None = None) -> torch.Tensor:
    """DELLA: keep element j iff U_j < p_j (magnitude-rank dependent probability)."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    probs = della_probabilities(delta, density, epsilon)
    u = uniforms(mask_seed, mask_key, delta.shape, delta.device)
    work = _work_dtype(delta)
    mask = (u < probs).to(work)
    return _apply_mask(delta.to(work), mask, density, rescale).to(delta.dtype)


def sparsify(delta: torch.Tensor, density: float, method: Sparsifier, *,
             rescale: RescaleMode | None = None, mask_seed: int = 0, mask_key: str = "",
             gamma: float = 0.01, epsilon: float = 0.15) -> torch.Tensor:
    if method is Sparsifier.MAGNITUDE:
        return magnitude(delta, density, rescale)
    if method is Sparsifier.RANDOM:
        return random(delta, density, mask_seed=mask_seed, mask_key=mask_key, rescale=rescale)
    if method is Sparsifier.MAGNITUDE_OUTLIERS:
        return magnitude_outliers(delta, density, gamma, rescale)
    if method is Sparsifier.DELLA_MAGPRUNE:
        return della_magprune(delta, density, epsilon, mask_seed=mask_seed, mask_key=mask_key,
                              rescale=rescale)
    raise ValueError(f"unknown sparsifier {method!r}")
