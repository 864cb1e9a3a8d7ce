"""Serving speed: `llava-gguf serve` vs llama.cpp's llama-server vs llama-cpp-python's server, side by side in
one run, same files, through the official `openai` client over loopback, 2 threads each.

Files: LLaVA-1.5-7B geometry (random weights) Q4_K_M + F16 mmproj, built as bench/chat.py builds them (~35 GB
free needed the first time, kept in the work directory for the other benchmarks); `--quick`: the tests' tiny
random LLaVA (devkit/tiny.py) as Q4_K_M + F16 mmproj in a temporary directory (a minute in all; random weights
like the 7B geometry's, so answers run long — the shipped shapes-llava answers in one word). Contenders, one at a
time (each alone on the machine), each started as a child process on a free port and stopped after:
  - ours: `python -m llava_gguf serve LLM --mmproj MMPROJ --parallel 4 --ctx C --threads 2`;
  - llama-server (bench/build_llama_server.sh builds it from the same llama.cpp, stock libmtmd) with
    `-np 4 --kv-unified -c 4C -t 2`, its best settings for parallel clients, and LLaVA-1.5's prompt format;
  - llama-cpp-python's server, `--chat_format llava-1-5 --n_ctx C --n_threads 2` (its extra dependencies are
    installed into this venv when missing). It loads our libllama/libmtmd (native/library.py): same speed.
Measures, each on images the server has not seen (a warm-up request comes first):
  1. one client: time to first token, generation tokens/s (ratio to llama-server's);
  2. 4 clients at once, 4 different images, answers of up to 64 tokens (temperature 0; random weights may end
     early: the tokens actually generated are counted): generation tokens/s while all 4 generate, all tokens
     over the wall time, p50/p95 request latency;
  3. 4 clients one after the other about the same image (different questions): their time to first token as
     a fraction of the first client's.
Peak RSS (VmHWM) of each server process and the wall time of its whole session.

    .venv/bin/python -m bench.serve [--quick] [--workdir DIR] [--tokens N] [--ctx N] [--only ours,...] [--no-doc]

writes its table into docs/benchmarks.md (section `serve`; a `--quick` or `--only` run just prints it).
"""
from __future__ import annotations

import argparse
import base64
import ctypes
import importlib.util
import io
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import BENCHMARKS_DOC, ROOT, free_gb, update_doc
from bench.convert import build_checkpoint
from devkit.tiny import TinySpec, make_tiny_llava, sample_image
from llava_gguf.convert import convert_checkpoint
from llava_gguf.native import library

PARALLEL = 4
CONTENDERS = ("ours", "llama-server", "llama-cpp-python")
LLAMA_SERVER = "llama-server (stock libmtmd)"
MODEL = "bench"
QUESTIONS = ("Describe everything you see in this image in great detail.",
             "What colours and shapes are in the picture, and where are they?",
             "Write a long story about the objects in this image.",
             "List every object in the image and describe each of them.")
# LLaVA-1.5's prompt (what ours and llama-cpp-python's llava-1-5 format give) for llama-server, which fills
# in a media marker where the image goes: pinned by LLAMA_MEDIA_MARKER so the template can put it first
MARKER = "<__media__>"
TEMPLATE = ("{%- for m in messages -%}{%- if m['role'] == 'user' -%}USER: {{ m['content'] | replace('" + MARKER
            + "', '" + MARKER + "\n') }} ASSISTANT:{%- endif -%}{%- endfor -%}")
SERVER_DEPS = {"sse_starlette": "sse-starlette", "starlette_context": "starlette-context",
               "pydantic_settings": "pydantic-settings"}
DEFAULT_LLAMA_SERVER = Path(os.environ.get("LLAVA_GGUF_SERVER_BUILD") or
                            Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                            / "llava-gguf" / "llama-server-build") / "bin" / "llama-server"


@dataclass
class Answer:
    """One streamed request: when it was sent, when each content chunk came, and the tokens generated."""
    sent: float
    chunks: list[float]
    end: float
    tokens: int
    cached: int | None

    @property
    def ttft(self) -> float:
        return (self.chunks[0] if self.chunks else self.end) - self.sent

    @property
    def tok_s(self) -> float:
        span = self.end - self.chunks[0] if self.chunks else 0.0
        return (self.tokens - 1) / span if self.tokens > 1 and span > 0 else float("nan")


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: no orphan server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server as a child process: started, waited for until it answers, its peak RSS read, stopped."""

    def __init__(self, label: str, cmd: list[str], port: int | None, env: dict | None = None) -> None:
        self.label, self.cmd, self.port, self.env = label, cmd, port, {**os.environ, **(env or {})}
        self.log = tempfile.NamedTemporaryFile("w+", prefix="bench-serve-", suffix=".log")
        self.proc: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{port}" if port else ""

    def start(self, timeout: float) -> None:
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, env=self.env,
                                     preexec_fn=_die_with_parent)
        threading.Thread(target=self._read_stdout, daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if self.url and self._ready():
                return
            time.sleep(0.5)
        self.log.seek(0)
        tail = self.log.read()[-3000:]
        self.stop()
        sys.exit(f"{self.label} did not start (exit {self.proc.returncode}): {tail}")

    def _read_stdout(self) -> None:  # ours prints the URL it listens on (port 0: any free one)
        for line in self.proc.stdout:
            found = re.search(r"(http://127\.0\.0\.1:\d+)", line)
            if found and not self.url:
                self.url = found.group(1)

    def _ready(self) -> bool:
        for path in ("/health", "/v1/models"):  # llama-cpp-python's server has no /health
            try:
                with urllib.request.urlopen(self.url + path, timeout=5) as r:
                    return r.status == 200 and b"loading" not in r.read(4096)
            except OSError as e:
                if getattr(e, "code", None) != 404:  # llama-server: 503 while loading
                    return False
        return False

    def peak_rss_mb(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024

    def stop(self) -> float:
        """Stop it; the wall time of its session."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return time.perf_counter() - self.started


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def ask(client, png: bytes, question: str, max_tokens: int) -> Answer:
    """One streamed chat completion about an image, timed chunk by chunk."""
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(png)}},
                                             {"type": "text", "text": question}]}]
    sent, chunks, usage = time.perf_counter(), [], None
    stream = client.chat.completions.create(model=MODEL, messages=messages, stream=True, max_tokens=max_tokens,
                                            temperature=0, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            chunks.append(time.perf_counter())
    end = time.perf_counter()
    tokens = usage.completion_tokens if usage is not None else len(chunks)  # llama-cpp-python sends no usage
    details = getattr(usage, "prompt_tokens_details", None) if usage is not None else None
    cached = getattr(details, "cached_tokens", None) if details is not None else None
    return Answer(sent, chunks, end, tokens, cached)


def concurrent(client, images: list[bytes], max_tokens: int) -> list[Answer]:
    """The images asked about by PARALLEL clients at once (one thread each, released together)."""
    out: list[Answer | None] = [None] * len(images)
    errors: list[BaseException] = []
    gate = threading.Barrier(len(images))

    def one(i: int) -> None:
        try:
            gate.wait(60)
            out[i] = ask(client, images[i], QUESTIONS[i % len(QUESTIONS)], max_tokens)
        except BaseException as e:  # noqa: BLE001 - reported after the join
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(1800)
    if errors or any(a is None for a in out):
        raise RuntimeError(f"a concurrent request failed: {errors[:1]}")
    return out  # type: ignore[return-value]


def all_generating_tok_s(answers: list[Answer]) -> float:
    """Chunks received while every client was generating (from the last first token to the first end), per
    second: batched decode at its width. NaN when the answers hardly overlapped (a server that answers one
    request at a time: none at all)."""
    if any(not a.chunks for a in answers):
        return float("nan")
    start, stop = max(a.chunks[0] for a in answers), min(a.end for a in answers)
    n = sum(1 for a in answers for t in a.chunks if start < t <= stop)
    return n / (stop - start) if n >= 2 * len(answers) else float("nan")


def measure(server: Server, images: dict[str, list[bytes]], max_tokens: int) -> dict:
    # why: the openai client is a benchmark-only dependency, imported when a benchmark runs
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="none", timeout=1800, max_retries=0)
    ask(client, images["warm"][0], "What is this?", 4)  # lazy set-up (libmtmd's context, caches) not timed
    one = ask(client, images["one"][0], QUESTIONS[0], max_tokens)
    t0 = time.perf_counter()
    many = concurrent(client, images["many"], max_tokens)
    wall = max(a.end for a in many) - t0
    same = [ask(client, images["same"][0], QUESTIONS[i], max_tokens) for i in range(PARALLEL)]
    latencies = [a.end - a.sent for a in many]
    return {"one": one, "many": many, "same": same, "many_wall": wall,
            "many_all_tok_s": all_generating_tok_s(many), "many_total_tok_s": sum(a.tokens for a in many) / wall,
            "p50": float(np.percentile(latencies, 50)), "p95": float(np.percentile(latencies, 95)),
            "rss_mb": server.peak_rss_mb()}


def ensure_server_deps() -> None:
    missing = [pkg for mod, pkg in SERVER_DEPS.items() if importlib.util.find_spec(mod) is None]
    if missing:
        print(f"installing llama-cpp-python's server dependencies into this venv: {' '.join(missing)}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", *missing],
                       check=True)


def llama_server_binary(given: Path | None) -> Path:
    path = given or DEFAULT_LLAMA_SERVER
    if not path.is_file():
        print("building llama-server with bench/build_llama_server.sh (once; ~20 min on 2 cores)", flush=True)
        out = subprocess.run(["bash", str(ROOT / "bench" / "build_llama_server.sh")], check=True,
                             stdout=subprocess.PIPE, text=True).stdout
        path = Path(out.strip().splitlines()[-1])
    return path


def full_files(workdir: Path) -> tuple[Path, Path]:
    """bench/chat.py's files: the 7B-geometry F16 GGUF (converted once) quantized to Q4_K_M once."""
    f16 = workdir / "f16" / "llava-1.5-7b-geometry-F16.gguf"
    mmproj = workdir / "f16" / "mmproj-llava-1.5-7b-geometry-F16.gguf"
    q4 = workdir / "f16" / "llava-1.5-7b-geometry-Q4_K_M.gguf"
    if not q4.is_file() and not f16.is_file():
        workdir.mkdir(parents=True, exist_ok=True)
        if free_gb(workdir) < 35:
            sys.exit("need ~35 GB free to build the 7B-geometry checkpoint and its F16 GGUF")
        ckpt = build_checkpoint(workdir / "llava-1.5-7b-geometry")
        subprocess.run([sys.executable, "-m", "llava_gguf", "convert", str(ckpt), "-o", str(f16.parent), "--outtype",
                        "f16", "--force"], check=True)
    if not q4.is_file():
        subprocess.run([sys.executable, "-m", "llava_gguf", "quantize", str(f16), "--type", "Q4_K_M", "--threads",
                        "2"], check=True)
    return q4, mmproj


def quick_files(outdir: Path) -> tuple[Path, Path]:
    """The tests' tiny random LLaVA (devkit/tiny.py) as Q4_K_M + F16 mmproj: random weights, like the 7B
    geometry's, so answers run to the token limit (the trained shapes-llava answers in one word)."""
    ckpt = make_tiny_llava(outdir / "checkpoint", TinySpec())
    r = convert_checkpoint(ckpt, outdir / "gguf", outtype="q4_k_m", mmproj_type="f16", name="tiny")
    return r.llm, r.mmproj


def contenders(llm: Path, mmproj: Path, ctx: int, server_bin: Path | None, only: set[str],
               flash_attn: str = "auto", reverse: bool = False) -> list[Server]:
    """The three servers, same files, 2 threads, PARALLEL conversations of `ctx` positions where they have them."""
    m, p, port_b, port_c = str(llm), str(mmproj), free_port(), free_port()
    ours = [sys.executable, "-m", "llava_gguf", "serve", m, "--mmproj", p, "--port", "0", "--parallel",
            str(PARALLEL), "--ctx", str(ctx), "--threads", "2", "--model-alias", MODEL]
    stock = [str(server_bin), "-m", m, "--mmproj", p, "-np", str(PARALLEL), "--kv-unified", "-c", str(ctx * PARALLEL), "-fa", flash_attn,
             "-t", "2", "-tb", "2", "--host", "127.0.0.1", "--port", str(port_b), "--alias", MODEL,
             "--jinja", "--chat-template", TEMPLATE]
    lcp = [sys.executable, "-m", "llama_cpp.server", "--model", m, "--clip_model_path", p, "--chat_format",
           "llava-1-5", "--n_ctx", str(ctx), "--n_threads", "2", "--n_threads_batch", "2", "--host", "127.0.0.1",
           "--port", str(port_c), "--model_alias", MODEL,
           "--interrupt_requests", "false"]  # by default a new request cancels the one running
    servers = [Server("llava-gguf serve (ours)", ours, None),
               Server(LLAMA_SERVER, stock, port_b, {"LLAMA_MEDIA_MARKER": MARKER}),
               Server("llama-cpp-python server", lcp, port_c)]
    return [s for key, s in zip(CONTENDERS, servers) if key in only][::-1 if reverse else 1]


def fmt(x: float, spec: str = ".2f") -> str:
    return "—" if x != x else f"{x:{spec}}"


def table(results: dict[str, dict]) -> str:
    anchor = results.get(LLAMA_SERVER, {}).get("one")
    rows = ["| | 1 client: time to first token | 1 client: generation | vs llama-server | 4 clients: tokens "
            "generated | 4 clients: generation tok/s while all 4 generate | 4 clients: all tokens / wall | latency "
            "p50 / p95 | same image, clients 2-4: time to first token / client 1's | cached tokens (clients 2-4) | "
            "peak RSS | wall |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        one, same = r["one"], r["same"]
        ratio = one.tok_s / anchor.tok_s if anchor is not None else float("nan")
        later = " / ".join(f"{a.ttft / same[0].ttft:.3f}" for a in same[1:])
        cached = ", ".join("—" if a.cached is None else str(a.cached) for a in same[1:])
        rows.append(f"| {label} | {one.ttft:.2f} s | {fmt(one.tok_s)} tok/s ({one.tokens} tok) | "
                    f"{fmt(ratio, '.3f')}x | {' + '.join(str(a.tokens) for a in r['many'])} | "
                    f"{fmt(r['many_all_tok_s'])} | {r['many_total_tok_s']:.2f} tok/s in {r['many_wall']:.1f} s | "
                    f"{r['p50']:.2f} / {r['p95']:.2f} s | {later} (client 1: {same[0].ttft:.2f} s) | {cached} | "
                    f"{r['rss_mb']:.0f} MB | {r['wall']:.0f} s |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tiny random model instead of the 7B geometry")
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("LLAVA_GGUF_BENCH_DIR", "/tmp/llava-gguf-bench")))
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=1024, help="positions per conversation (image + prompt + answer fit)")
    ap.add_argument("--llama-server", type=Path, default=None, help=f"the binary (default {DEFAULT_LLAMA_SERVER})")
    ap.add_argument("--only", default=",".join(CONTENDERS), help="some of " + ",".join(CONTENDERS))
    ap.add_argument("--reverse", action="store_true", help="run the contenders in the reverse order (alternating "
                    "rounds on a noisy machine)")
    ap.add_argument("--llama-server-flash-attn", choices=("auto", "on", "off"), default="auto",
                    help="llama-server's -fa (auto, its default, turns it on here; off: like for like with ours, "
                         "which runs without flash attention as llama-cpp-python does); not auto: not written to the doc")
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()
    only = set(args.only.split(","))
    if not only <= set(CONTENDERS):
        sys.exit(f"--only: choose from {', '.join(CONTENDERS)}")
    library.configure()  # llama-cpp-python's server (a child) inherits the paths of our libraries
    if "llama-cpp-python" in only:
        ensure_server_deps()
    server_bin = llama_server_binary(args.llama_server) if "llama-server" in only else None
    today, load = time.strftime("%Y-%m-%d"), " / ".join(f"{x:.1f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="llava-gguf-bench-serve-") as tmp:
        llm, mmproj = quick_files(Path(tmp)) if args.quick else full_files(args.workdir)
        sizes = {key: [] for key in ("warm", "one", "many", "same")}
        seeds = iter(range(100, 200))
        for key, n in (("warm", 1), ("one", 1), ("many", PARALLEL), ("same", 1)):
            for _ in range(n):
                buf = io.BytesIO()
                sample_image(336, seed=next(seeds)).save(buf, format="PNG")
                sizes[key].append(buf.getvalue())
        results: dict[str, dict] = {}
        for server in contenders(llm, mmproj, args.ctx, server_bin, only, args.llama_server_flash_attn,
                                 args.reverse):
            print(f"{server.label}: starting", flush=True)
            server.start(timeout=900)
            try:
                r = measure(server, sizes, args.tokens)
            finally:
                r_wall = server.stop()
            r["wall"] = r_wall
            results[server.label] = r
            print(f"{server.label}: 1 client {r['one'].ttft:.2f} s to first token, {fmt(r['one'].tok_s)} tok/s; "
                  f"4 clients {fmt(r['many_all_tok_s'])} tok/s; peak RSS {r['rss_mb']:.0f} MB", flush=True)
        model_desc = (f"`--quick`: the tests' tiny random LLaVA (devkit/tiny.py) as Q4_K_M "
                      f"({llm.stat().st_size / 1e6:.1f} MB) + F16 mmproj — a check of the pipeline and the servers' "
                      f"overheads, not of llama.cpp's compute"
                      if args.quick else f"LLaVA-1.5-7B geometry (random weights) Q4_K_M "
                      f"({llm.stat().st_size / 1e9:.2f} GB) + F16 mmproj")
    text = table(results)
    body = (f"{model_desc}; 336x336 images, temperature 0, up to {args.tokens} answer tokens, 2 threads each, "
            f"{args.ctx} positions per conversation; {os.cpu_count()} cores; one server at a time, each a child "
            f"process on a loopback port, driven by the official `openai` client (streaming).\n\n{text}\n\n"
            "Contenders: ours `llava-gguf serve --parallel 4`; llama-server built by bench/build_llama_server.sh from "
            "the same llama.cpp (pinned llama-cpp-python sdist) with the stock libmtmd, `-np 4 --kv-unified` "
            "(its best for parallel clients) and LLaVA-1.5's prompt format; llama-cpp-python's server with "
            "`--chat_format llava-1-5 --interrupt_requests false` (one request at a time behind its lock; by "
            "default a new request would cancel the running one) — it loads our libllama/libmtmd "
            "(native/library.py): its LLaVA handler drives libmtmd as llama-cpp-python ships it, and the speed is "
            "the library's. Tokens: what each server reports as generated (`usage`; llama-cpp-python's server "
            "sends no usage when streaming: its content chunks); random weights may end an answer early. "
            "Generation while all 4 generate: chunks received between the last client's first token and the first "
            "client's end, per second. Same image: 4 clients one after the other, different questions, the image "
            "first in each prompt; cached tokens as the server reports them (`prompt_tokens_details`; llama-server "
            "gives a request the idle slot whose cached prompt is most like it, so it can reuse a prefix too). "
            f"Load average of the machine (shared) when the run began: {load}. Peak RSS: "
            "the server process's VmHWM; wall: its whole session (start, load, all requests, stop).\n\n"
            f"Command: `python -m bench.serve{' --quick' if args.quick else ''}` ({today})")
    if not args.no_doc and not args.quick and only == set(CONTENDERS) and args.llama_server_flash_attn == "auto":  # the doc: the full side by side only
        update_doc(BENCHMARKS_DOC, "serve", "serve (OpenAI-compatible server)", body)
    print(text)


if __name__ == "__main__":
    main()
