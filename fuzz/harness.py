"""What every atheris harness shares: the property (an input ends in a result or LlavaGgufError, within a time
limit, with no warning other than ours), where findings go, and how libFuzzer is started.

Fuzzing (bin/fuzz): a finding is recorded once per site — exception type and innermost frame in llava_gguf —
as `<site>.bin` (the smallest input seen) and `<site>.txt` (its traceback) in $LLAVA_GGUF_FUZZ_FINDINGS, and
the search goes on; native crashes, libFuzzer timeouts and out-of-memory stop the process, libFuzzer writes
the input under -artifact_prefix, and bin/fuzz starts the target again. Reproducing (`python -m
fuzz.fuzz_<target> FILE...` from the repository root): the property's failure is raised with its traceback."""
from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# bin/'s editable install imports llava_gguf through scikit-build's redirecting finder, a custom loader that
# atheris does not instrument (no coverage, a blind search). The source tree, first on sys.path (a harness
# runs as `python -m fuzz.fuzz_<target>` from the repository root), holds the same modules, and the native
# library finder locates the built libraries in site-packages either way.
sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "ScikitBuildRedirectingFinder"]

TIME_LIMIT = 5.0  # seconds for one small input; libFuzzer's -timeout (bin/fuzz: 60) catches native hangs


class Hang(BaseException):
    """No result within TIME_LIMIT (a BaseException: no `except Exception` or `except OSError` on the way
    may turn it into an ordinary error)."""


class ForeignWarning(Exception):
    """A warning that reached the user in someone else's words (issue 23 item 12)."""


def scratch_dir() -> Path:
    """A private directory for the file each input becomes (tmpfs when there is one: inputs are rewritten
    thousands of times a minute)."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="llava-gguf-fuzz-", dir=base))


def _site(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/llava_gguf/" in f.filename] or frames[-1:]
    where = f"{Path(ours[-1].filename).stem}-{ours[-1].lineno}" if ours else "unknown"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{type(exc).__name__}-{where}")


class Property:
    """Runs `target(data)` for one input and judges the outcome."""

    def __init__(self, name: str, target: Callable[[bytes], object], time_limit: float = TIME_LIMIT) -> None:
        from llava_gguf.errors import LlavaGgufError, LlavaGgufWarning

        self.name, self.target, self.time_limit = name, target, time_limit
        self.ours, self.our_warning = LlavaGgufError, LlavaGgufWarning
        self.raise_findings = False
        self.findings = Path(os.environ.get("LLAVA_GGUF_FUZZ_FINDINGS", ROOT / "out" / "fuzz" / "findings" / name))
        self.seen: dict[str, int] = {}

    def __call__(self, data: bytes) -> None:
        def on_alarm(signum, frame):
            raise Hang(f"no result after {self.time_limit} s")

        signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, self.time_limit)
        try:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                try:
                    self.target(data)
                except self.ours as e:
                    if "\n" in e.one_line():
                        raise AssertionError(f"a multi-line error: {e.one_line()!r}") from None
            foreign = [w for w in seen if not issubclass(w.category, self.our_warning)]
            if foreign:
                w = foreign[0]
                raise ForeignWarning(f"{w.category.__name__} at {Path(w.filename).name}:{w.lineno}: {w.message}")
        except (Exception, Hang) as e:  # the finding: anything but our one-line error
            signal.setitimer(signal.ITIMER_REAL, 0)
            if self.raise_findings:
                raise
            self.record(data, e)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    def record(self, data: bytes, exc: BaseException) -> None:
        """Keep the smallest input per site."""
        site = _site(exc)
        if isinstance(exc, ForeignWarning):
            site = "ForeignWarning-" + re.sub(r"[^A-Za-z0-9_.-]", "_", str(exc).split(":")[0].replace(" at ", "-"))
        if site in self.seen and self.seen[site] <= len(data):
            return
        new = site not in self.seen
        self.seen[site] = len(data)
        self.findings.mkdir(parents=True, exist_ok=True)
        (self.findings / f"{site}.bin").write_bytes(data)
        text = "".join(traceback.format_exception(exc))
        (self.findings / f"{site}.txt").write_text(f"input: {site}.bin ({len(data)} bytes, sha1 "
                                                   f"{hashlib.sha1(data).hexdigest()})\n{text}")
        if new:
            print(f"\n#FINDING {self.name} {site} ({len(data)} bytes)", file=sys.stderr, flush=True)


def main(name: str, target: Callable[[bytes], object], mutator: Callable[[bytes, int, int], bytes] | None = None,
         time_limit: float = TIME_LIMIT) -> None:
    """Start libFuzzer on `target` (argv: libFuzzer's), or run the given files once and raise (reproduce)."""
    import atheris

    prop = Property(name, target, time_limit)
    files = [a for a in sys.argv[1:] if not a.startswith("-")]
    if files and all(Path(f).is_file() for f in files):
        prop.raise_findings = True  # reproducing: show the traceback
        for f in files:
            print(f"running {f}", file=sys.stderr)
            prop(Path(f).read_bytes())
            print(f"{f}: ends in a result or our error", file=sys.stderr)
        return
    if mutator is not None:
        atheris.Setup(sys.argv, prop, custom_mutator=mutator)
    else:
        atheris.Setup(sys.argv, prop)
    atheris.Fuzz()


def mixed_mutator(structured: Callable[[bytes, random.Random], bytes], share: float = 0.7):
    """A custom mutator: `share` of the time the format-aware `structured(data, rng)`, else libFuzzer's own."""

    def mutate(data: bytes, max_size: int, seed: int) -> bytes:
        import atheris

        rng = random.Random(seed)
        if rng.random() < share:
            try:
                out = structured(data, rng)
                if 0 < len(out) <= max_size:
                    return out
            except (ValueError, TypeError, KeyError, IndexError, RecursionError, OverflowError, UnicodeError):
                pass
        return atheris.Mutate(data, max_size)

    return mutate
