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
