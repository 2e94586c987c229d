"""Pin the CPU kernels that decide the last bits of float32 results (no torch import here).

torch picks its vectorized kernels by CPU (AVX-512 where there is one, else AVX2) and MKL its
BLAS code path by CPU too. Reductions over 16 lanes sum in another order than over 8, and the
kernels' exp/log/acos/sin round differently, so a norm-, softmax- or angle-based merge (karcher,
nuslerp, arcee_fusion) differs by an ulp, or flips a mask element at a threshold, between an
AVX-512 machine and an AVX2 one: mergekit 0.1.5 itself gives other bytes on the two. The parity
goldens (tests/golden) are made, and compared, with the AVX2 kernels, which every x86-64 machine
of the last decade runs; this must run before torch is imported.
"""

from __future__ import annotations

import os
import platform

# What torch.backends.cpu.get_cpu_capability() reports with PINNED in force.
CAPABILITY = "AVX2"
PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}
# The pin and the goldens' kernels are x86-64's; elsewhere neither applies.
X86_64 = platform.machine().lower() in ("x86_64", "amd64")


def pin_cpu_kernels() -> None:
    """Set PINNED in the environment (this process and its children) on x86-64, unless set."""
    if X86_64:
        for name, value in PINNED.items():
            os.environ.setdefault(name, value)
