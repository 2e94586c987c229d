"""The package version (one place: the run log header, model cards and the wheel read it)."""

__version__ = "0.1.0"
