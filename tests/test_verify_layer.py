"""The verify/ layer: its choosers keep their seeded streams, and the model's
layers (x86, mmu, vm, guest, the CLI) load without the oracle's dependencies."""

import ast
import random
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, find, settings
from hypothesis import strategies as st
from hypothesis.errors import NoSuchExample

from shadowmmu.verify.choosers import Chooser, HypothesisChooser, RandomChooser, permille

# -------------------------------------------------------------------- layering
CHECK = "import sys, {m}; print(sorted(n for n in ('unicorn', 'hypothesis') if n in sys.modules))"


def loaded_by(module: str) -> list[str]:
    """Which of unicorn and hypothesis importing ``module`` loads, in a fresh interpreter
    (in this one other tests have imported them already)."""
    r = subprocess.run([sys.executable, "-c", CHECK.format(m=module)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return ast.literal_eval(r.stdout)


@pytest.mark.parametrize("module", ["shadowmmu", "shadowmmu.x86", "shadowmmu.mmu", "shadowmmu.vm",
                                    "shadowmmu.guest", "shadowmmu.cli", "shadowmmu.verify"])
def test_the_model_loads_neither_unicorn_nor_hypothesis(module):
    assert loaded_by(module) == []


def test_the_qemu_oracle_is_what_loads_unicorn():
    # the check above can see unicorn: the oracle's own module loads it
    assert loaded_by("shadowmmu.verify.qemu_oracle") == ["unicorn"]


# -------------------------------------------------------------------- choosers
def test_random_chooser_draws_what_random_random_draws():
    """Campaign results are keyed by seed: integer is randint, choice one randrange
    index, chance one random() - the draws each harness made before the choosers were one."""
    ch, ref = RandomChooser(42), random.Random(42)
    options = ("a", "b", "c", "d", "e")
    for _ in range(200):
        assert ch.integer(3, 1000) == ref.randint(3, 1000)
        assert ch.choice(options) == options[ref.randrange(len(options))]
        assert ch.chance(0.3) == (ref.random() < 0.3)
    assert RandomChooser("shadowmmu-differential/5/17").integer(0, 1 << 40) == \
        random.Random("shadowmmu-differential/5/17").randint(0, 1 << 40)


def test_permille_is_one_integer_draw():
    ch, ref = RandomChooser(9), random.Random(9)
    got = [permille(ch, 0.15) for _ in range(300)]
    assert got == [ref.randint(0, 999) >= 850 for _ in range(300)]
    assert 20 <= sum(got) <= 70            # 45 expected
    assert not any(permille(RandomChooser(s), 0.0) for s in range(50))
    assert all(permille(RandomChooser(s), 1.0) for s in range(50))


def test_every_chooser_is_a_chooser():
    assert isinstance(RandomChooser(0), Chooser) and isinstance(HypothesisChooser(lambda s: b""), Chooser)
    with pytest.raises(TypeError):
        Chooser()


QUICK = settings(max_examples=200, database=None, deadline=None, suppress_health_check=list(HealthCheck))


def drawn(f):
    """A strategy of f(HypothesisChooser): hypothesis drives the chooser (as in ``differential.cases``)."""
    return st.composite(lambda draw: f(HypothesisChooser(draw)))()


def test_hypothesis_chooser_shrinks_to_the_simplest_decision():
    # the smallest example hypothesis finds for "anything" is the simplest decision
    assert find(drawn(lambda ch: ch.integer(5, 300)), lambda v: True, settings=QUICK) == 5
    assert find(drawn(lambda ch: ch.choice(("first", "second", "third"))), lambda v: True, settings=QUICK) == "first"
    assert find(drawn(lambda ch: ch.chance(0.9)), lambda v: True, settings=QUICK) is False


def test_hypothesis_chooser_draws_its_whole_range():
    seen = set()

    def record(v):
        seen.add(v)
        return False
    with pytest.raises(NoSuchExample):    # nothing satisfies the predicate: every example is recorded
        find(drawn(lambda ch: (ch.integer(-2, 2), ch.choice("xyz"), ch.chance(0.5))), record, settings=QUICK)
    assert {v[0] for v in seen} == {-2, -1, 0, 1, 2}
    assert {v[1] for v in seen} == {"x", "y", "z"} and {v[2] for v in seen} == {True, False}
    assert HypothesisChooser(lambda s: pytest.fail("no draw for a single value")).integer(7, 7) == 7
