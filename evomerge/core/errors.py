"""One error hierarchy. Every error that a user's input can cause is an `EvomergeError`; the CLI
prints those (and pydantic validation errors) as one ``error:`` line with exit code 2, and shows a
traceback for anything else (an internal bug).

The classes also derive from ValueError where they did before the hierarchy existed, so code
that caught ValueError keeps working.
"""

from __future__ import annotations


class EvomergeError(Exception):
    """Base class of evomerge's user-facing errors; the message says what to do."""


class ConfigError(EvomergeError, ValueError):
    """A search config that cannot run; the message names the file and the field."""


class ModelFolderError(EvomergeError, ValueError):
    """A path that is not a usable causal-LM folder; the message says why."""


class ArchitectureError(EvomergeError, ValueError):
    """A model type that data-flow merging does not support."""


class RecipeError(EvomergeError, ValueError):
    """A recipe that cannot be used; the message names the offending field."""


class MergeError(EvomergeError, ValueError):
    """A merge that cannot run (bad sources, incompatible models, bad output folder)."""


class FoldError(EvomergeError, ValueError):
    """A path that cannot be folded into a plain model or a passthrough recipe."""


class UnknownTaskError(EvomergeError, ValueError):
    """A task name that no task folder defines."""


class EvaluationError(EvomergeError, RuntimeError):
    """A task that could not be scored (bad data, a metric that is not finite)."""


class RunFolderError(EvomergeError, ValueError):
    """A run folder that cannot be used (missing, locked, from another format, inconsistent)."""


class JobError(EvomergeError, RuntimeError):
    """A Ray job or cluster request that failed (submit, jobs)."""


class UsageError(EvomergeError, ValueError):
    """Command-line arguments that do not fit together, or an output that would overwrite one."""


class ExecutionError(EvomergeError, RuntimeError):
    """Workers that could not start or all died (Ray), with what to check."""


class ZooError(EvomergeError, ValueError):
    """A zoo folder that is missing, or holds another build."""
