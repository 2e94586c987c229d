"""Process environment: quiet, offline-friendly library settings shared by the CLI and workers."""

from __future__ import annotations


def quiet_libraries() -> None:
    """Silences lm-eval's, datasets' and transformers' per-load warnings and progress bars."""
    import logging

    # lm-eval warns on every task load and every in-memory model; a user's own errors still show.
    for name in ("lm_eval", "lm-eval", "datasets", "transformers", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def use_huge_pages() -> None:
    """Large CPU tensors (2 MB and up) on transparent huge pages, unless the environment says
    otherwise. A merge allocates and frees a model's worth of tensor-sized buffers; faulting
    them in 4 KB pages cost about a third of a 3B merge's time (scripts/bench_scale.py). torch
    reads the variable once, at its first allocation: call this before anything imports torch."""
    import os

    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
