"""evomerge: evolutionary model-merge optimizer."""
__version__ = "0.1.0"
