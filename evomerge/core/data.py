"""Where the search spaces (search_spaces/) and the zoo tasks (evals/) are.

The repository's top-level folders are the source of truth. A wheel carries copies of them under
``evomerge/_data/`` (made by setup.py at build time); an editable install or a checkout has none
and reads the repository's folders.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DATA = Path(__file__).resolve().parents[1] / "_data"
REPO_ROOT = Path(__file__).resolve().parents[2]


def data_dir(name: str) -> Path:
    """``search_spaces`` or ``evals``: the installed copy, else the repository's folder."""
    packaged = PACKAGE_DATA / name
    return packaged if packaged.is_dir() else REPO_ROOT / name
