"""Helpers shared by the benchmarks (`python -m bench.X` from the repository root): peak RSS of a child,
free disk, sections of docs/benchmarks.md."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_DOC = ROOT / "docs" / "benchmarks.md"  # every benchmark's table but fidelity's


def free_gb(path: Path) -> float:
    return shutil.disk_usage(path).free / 1e9


def peak_rss_run(cmd: list[str]) -> tuple[float, int, int, float]:
    """(wall seconds, peak RSS in KiB of the command's largest process, exit code, CPU seconds
    user+system) via GNU time."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        t0 = time.perf_counter()
        p = subprocess.run(["/usr/bin/time", "-f", "RESULT %M %U %S", "-o", tf.name, *cmd])
        wall = time.perf_counter() - t0
        lines = [ln.split() for ln in Path(tf.name).read_text().splitlines() if ln.startswith("RESULT ")]
    if not lines:
        return wall, -1, p.returncode, -1.0
    _, rss, user, system = lines[-1]
    return wall, int(rss), p.returncode, float(user) + float(system)


def update_doc(doc: Path, key: str, title: str, body: str) -> None:
    """Replace (or append) the section between <!-- bench:key --> markers."""
    doc.parent.mkdir(parents=True, exist_ok=True)
    text = doc.read_text() if doc.exists() else "# Benchmarks\n\nEvery table is written by the command under it.\n"
    start, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    section = f"{start}\n## {title}\n\n{body}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda m: section, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    doc.write_text(text)
    os.sync()
