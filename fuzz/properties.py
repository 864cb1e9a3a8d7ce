"""What the property tests (tests/test_fuzz_*.py) share: bounded, deterministic hypothesis settings, the
property itself (`ends_well`: a result or our one-line error, within a time limit), and the strategies that
draw mutation steps (see mutate.py) and JSON."""
from __future__ import annotations

import json
import os
import signal
from contextlib import contextmanager

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

from llava_gguf.errors import LlavaGgufError

from .mutate import INTERESTING, JSON_ODD_VALUES, OPS, json_leaves, json_replace

# By hand, outside the suite: LLAVA_GGUF_FUZZ_SCALE=20 runs 20 times the examples, and
# LLAVA_GGUF_FUZZ_NEW_ONLY=1 skips the explicit (known) examples so that further findings show up.
_SCALE = float(os.environ.get("LLAVA_GGUF_FUZZ_SCALE", "1"))
_PHASES = tuple(p for p in Phase if not (p == Phase.explicit and os.environ.get("LLAVA_GGUF_FUZZ_NEW_ONLY")))


def fuzz_settings(examples: int) -> settings:
    """Deterministic and bounded: the same inputs every run, no database, no deadline (a slow machine
    is not a finding; a hang is, see `time_limit`)."""
    return settings(max_examples=max(1, int(examples * _SCALE)), deadline=None, derandomize=True, database=None,
                    phases=_PHASES, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


class Hang(BaseException):
    """An input that took longer than a parser of a small file has any reason to (a BaseException, so that
    no `except Exception` or `except OSError` on the way turns it into an ordinary error)."""


@contextmanager
def time_limit(seconds: float):
    def on_alarm(signum, frame):
        raise Hang(f"no result after {seconds} s: a hang on a small input")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def ends_well(fn, *args, limit: float = 10.0):
    """fn(*args): its result, or the LlavaGgufError it raised (one line). Any other exception propagates,
    which is what the properties assert against."""
    with time_limit(limit):
        try:
            return fn(*args)
        except LlavaGgufError as e:
            assert "\n" not in e.one_line(), e.one_line()
            return e


steps = st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 2**32 - 1),
                           st.sampled_from(INTERESTING) | st.integers(0, 2**64 - 1)), min_size=1, max_size=3)
json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)


@st.composite
def json_mutation(draw, doc):
    """`doc` with one to three values replaced (by odd or arbitrary JSON), deleted, or wrapped in a list."""
    for _ in range(draw(st.integers(1, 3))):
        paths = json_leaves(doc)
        path = paths[draw(st.integers(0, len(paths) - 1))]
        how = draw(st.sampled_from(("odd", "any", "delete", "wrap")))
        if how == "delete" and path:
            doc = json_replace(doc, path, None, delete=True)
        elif how == "wrap":
            doc = json_replace(doc, path, [json.loads(json.dumps(_at(doc, path)))])
        else:
            doc = json_replace(doc, path, draw(st.sampled_from(JSON_ODD_VALUES) if how == "odd" else json_values))
    return doc


def _at(doc, path: tuple):
    for key in path:
        doc = doc[key]
    return doc
