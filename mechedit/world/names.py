"""Pronounceable, deterministic synthetic words built from consonant-vowel syllables."""
from __future__ import annotations

import numpy as np

from mechedit.errors import SpecError

ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
VOWELS = ("a", "e", "i", "o", "u")
CODAS = ("", "", "", "n", "l", "r")  # empty coda is more frequent: words stay easy to read
SYLLABLES = tuple(o + v for o in ONSETS for v in VOWELS)


def capacity(syllables: tuple[int, int]) -> int:
    """How many distinct words the generator can make (ignoring codas, a safe lower bound)."""
    lo, hi = syllables
    return sum(len(SYLLABLES) ** n for n in range(lo, hi + 1))


class WordGenerator:
    """Draws distinct words; every word is unique across one world (subjects, objects, relations)."""

    def __init__(self, rng: np.random.Generator, syllables: tuple[int, int], reserved: set[str] = frozenset()):
        self.rng = rng
        self.syllables = syllables
        self.used: set[str] = set(reserved)
        self.capacity = capacity(syllables)

    def word(self) -> str:
        lo, hi = self.syllables
        for _ in range(1000):
            n = int(self.rng.integers(lo, hi + 1))
            parts = [SYLLABLES[int(i)] for i in self.rng.integers(0, len(SYLLABLES), size=n)]
            w = "".join(parts) + CODAS[int(self.rng.integers(0, len(CODAS)))]
            if w not in self.used:
                self.used.add(w)
                return w
        raise SpecError(f"the name generator ran out of words (capacity ~{self.capacity} with syllables "
                        f"{self.syllables}); raise syllables or lower n_subjects")

    def words(self, n: int) -> list[str]:
        if len(self.used) + n > self.capacity // 2:
            raise SpecError(f"the world needs {len(self.used) + n} distinct words but the name generator "
                            f"can make only ~{self.capacity // 2} reliably (syllables {self.syllables}); "
                            f"raise syllables or lower n_subjects")
        return [self.word() for _ in range(n)]
