"""The zoo's skills: small prompt -> answer problems, each drawn from a seeded generator.

Every skill has a full input range (what its specialist learns and what its eval task measures)
and a restricted range (what the base model learns: partial knowledge leaves room for merging).
All randomness comes from an explicit ``numpy.random.Generator``; nothing uses a global stream
or Python's per-process ``hash``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LETTERS = "abcdefghijklmnopqrstuvwxyz"
BASE_LETTERS = LETTERS[:16]  # a..p: the base model sees only these in rev/sub answers
# The substitution cipher ("translation") is a fixed permutation, seeded by a constant so that it
# is the same in every build and every process.
SUB_TABLE = dict(zip(LETTERS, np.random.default_rng(20240229).permutation(list(LETTERS)), strict=True))


@dataclass(frozen=True)
class Item:
    prompt: str
    answer: str


def _word(rng: np.random.Generator, alphabet: str) -> str:
    n = int(rng.integers(3, 6))  # 3..5 letters
    return "".join(alphabet[i] for i in rng.integers(0, len(alphabet), size=n))


@dataclass(frozen=True)
class Skill:
    """One skill: a name, a prompt format and a generator over a full or restricted range."""

    name: str
    description: str

    def item(self, rng: np.random.Generator, restricted: bool = False) -> Item:
        if self.name == "add":
            hi = 60 if restricted else 100
            a, b = (int(x) for x in rng.integers(0, hi, size=2))
            return Item(f"{a}+{b}=", str(a + b))
        if self.name == "rev":
            w = _word(rng, BASE_LETTERS if restricted else LETTERS)
            return Item(f"r:{w}=", w[::-1])
        if self.name == "sub":
            w = _word(rng, BASE_LETTERS if restricted else LETTERS)
            return Item(f"t:{w}=", "".join(SUB_TABLE[c] for c in w))
        if self.name == "copy":
            w = _word(rng, LETTERS)
            return Item(f"c:{w}=", w)
        raise ValueError(f"unknown skill {self.name!r}")


SKILLS: dict[str, Skill] = {
    "add": Skill("add", "two-digit addition: '37+45=' -> '82'"),
    "rev": Skill("rev", "string reversal: 'r:abcd=' -> 'dcba'"),
    "sub": Skill("sub", "letter substitution ('translation'): 't:abc=' -> a fixed permutation"),
    "copy": Skill("copy", "copy: 'c:abc=' -> 'abc' (base-only format skill)"),
}
SPECIALIST_SKILLS = ("add", "rev", "sub")


def sample_items(skill: str, n: int, seed: int, restricted: bool = False) -> list[Item]:
    rng = np.random.default_rng(seed)
    return [SKILLS[skill].item(rng, restricted) for _ in range(n)]


def split_items(skill: str, sizes: dict[str, int], seed: int) -> dict[str, list[Item]]:
    """Disjoint evaluation splits (by prompt), drawn in a fixed order from one seeded stream."""
    rng = np.random.default_rng(seed)
    seen: set[str] = set()
    out: dict[str, list[Item]] = {}
    for split, n in sizes.items():
        items: list[Item] = []
        while len(items) < n:
            it = SKILLS[skill].item(rng)
            if it.prompt not in seen:
                seen.add(it.prompt)
                items.append(it)
        out[split] = items
    return out
