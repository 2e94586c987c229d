"""The CPU kernels the zoo trains with, pinned so that a zoo key names one set of weights on every
x86-64 machine (torch imported nowhere here: the pins must be set before it is).

torch picks its vectorized kernels by processor (AVX-512 where there is one, else AVX2) and MKL its
BLAS code path too; they round differently, so a zoo trained on one machine differed from one
trained on another. The pins are the parity goldens' (tests/cpu_kernels.py): AVX2, which every
x86-64 machine of the last decade runs. Elsewhere (ARM) none applies.
"""

from __future__ import annotations

import os
import platform
import sys

X86_64 = platform.machine().lower() in ("x86_64", "amd64")
KERNEL_PINS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}


def pinned() -> bool:
    """Whether this process trains with the pinned kernels: on x86-64, the pins are set (by this
    process before torch was imported, or by its parent); elsewhere there is nothing to pin."""
    return not X86_64 or all(os.environ.get(k) == v for k, v in KERNEL_PINS.items())


def pin_kernels() -> bool:
    """Sets the pins if torch has not been imported yet; returns ``pinned()``."""
    if X86_64 and "torch" not in sys.modules:
        for k, v in KERNEL_PINS.items():
            os.environ.setdefault(k, v)
    return pinned()
