"""The command line: `evomerge <command>`."""

from evomerge.core.env import use_huge_pages

use_huge_pages()  # before evomerge.cli.main imports torch

from evomerge.cli.main import main  # noqa: E402

__all__ = ["main"]
