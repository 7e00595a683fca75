"""Where a generator's random decisions come from.

Both generators of ``verify`` (the differential harness's paging cases and the
lockstep checker's guest programs) make every decision through a ``Chooser``,
so one generator serves two drivers:

- ``RandomChooser``: a seeded ``random.Random``, for campaigns (the same seed
  gives the same cases and programs, which is how a campaign's finding is
  replayed);
- ``HypothesisChooser``: hypothesis's ``draw``, for tests; hypothesis can then
  shrink a failing case.  Every decision shrinks to its simplest value: an
  integer to ``lo``, a choice to the first option, a chance to False.

Seeded streams are part of the interface: campaign results, reproduce lines
and docs/verification.md's reach figures are keyed by seed, so each
``RandomChooser`` method draws exactly what the generator using it drew before
the two chooser families were merged (``integer`` is ``randint``, ``choice``
one ``randrange`` index, ``chance`` one ``random()``).
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Sequence

__all__ = ["Chooser", "RandomChooser", "HypothesisChooser", "permille"]


class Chooser(ABC):
    """A source of decisions: ``integer`` and ``chance`` from the source,
    ``choice`` built on ``integer``."""

    @abstractmethod
    def integer(self, lo: int, hi: int) -> int:
        """An integer in lo..hi, both ends included, uniform."""

    @abstractmethod
    def chance(self, p: float) -> bool:
        """True with probability p."""

    def choice(self, options: Sequence):
        """One of ``options`` (a sequence: tuple, list, range), uniform."""
        return options[self.integer(0, len(options) - 1)]


class RandomChooser(Chooser):
    """Decisions from ``random.Random(seed)`` (seed: an int or a str)."""

    def __init__(self, seed: int | str):
        self.rng = random.Random(seed)

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def chance(self, p: float) -> bool:
        return self.rng.random() < p


class HypothesisChooser(Chooser):
    """Decisions from hypothesis: ``st.data()``'s object, or the ``draw`` of an
    ``st.composite`` strategy.

    Each integer is a few uniform random bytes reduced modulo the range:
    ``st.integers`` favours small values and bounds so strongly that a
    generator's probabilities would be far off (a 50 % flag comes out at about
    30 %), while bytes are drawn uniformly and still shrink to ``lo``.  A chance
    is an integer in per mille, so it shrinks to False."""

    _STRATEGIES: dict[int, object] = {}

    def __init__(self, data):
        self._draw = data.draw if hasattr(data, "draw") else data

    def integer(self, lo: int, hi: int) -> int:
        n = hi - lo + 1
        if n <= 1:
            return lo
        size = (n.bit_length() + 7) // 8 + 1       # one spare byte: modulo bias < 1/256
        s = self._STRATEGIES.get(size)
        if s is None:
            from hypothesis import strategies as st
            s = self._STRATEGIES[size] = st.binary(min_size=size, max_size=size)
        return lo + int.from_bytes(self._draw(s), "little") % n

    def chance(self, p: float) -> bool:
        return permille(self, p)


def permille(ch: Chooser, p: float) -> bool:
    """True with probability p (to 1/1000), drawn as one ``integer(0, 999)``:
    shrinks to False.  The differential harness draws its flags this way from
    either chooser (its seeded cases predate ``chance``); ``HypothesisChooser``
    draws every chance this way."""
    return ch.integer(0, 999) >= 1000 - round(1000 * p)
