"""Packaging only: the metadata is in pyproject.toml.

search_spaces/ and evals/ at the top of the repository are the source of truth. A wheel (or a
regular install) carries copies of them as package data under evomerge/_data/, made here at build
time; an editable install has none and reads the repository's folders (evomerge/core/data.py).
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

DATA_FOLDERS = ("search_spaces", "evals")


class BuildPyWithData(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        root = Path(__file__).resolve().parent
        for name in DATA_FOLDERS:
            dst = Path(self.build_lib) / "evomerge" / "_data" / name
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(root / name, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildPyWithData})
