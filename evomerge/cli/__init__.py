"""The command line: `evomerge <command>`."""

from evomerge.cli.main import main

__all__ = ["main"]
