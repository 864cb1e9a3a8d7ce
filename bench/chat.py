"""Chat speed at LLaVA-1.5-7B geometry, Q4_K_M, 2 threads: our API vs llama-cpp-python's stock
Llava15ChatHandler vs llama.cpp's llama-mtmd-cli, side by side in one run.

Uses the convert/quantize benchmarks' F16 GGUF (building the checkpoint and converting it if needed,
~30 GB outside the repository) and quantizes it to Q4_K_M once. Random weights: speed does not depend
on their values. Each contender runs in its own process (GNU time gives its peak RSS) with the same
files, image (336x336), prompt, greedy sampling and answer length:
  - ours: `LLaVA(...)`, `chat().ask(...)` streamed, then a follow-up question about the same image;
  - stock: `Llama(chat_handler=Llava15ChatHandler(...))` + `create_chat_completion(stream=True)`, then the
    same conversation with the follow-up (the handler clears the cache and encodes the image again);
  - llama-mtmd-cli: one turn (it has no scripted follow-up); its own perf counters give load, prompt and
    generation figures.

    .venv/bin/python -m bench.chat [--workdir DIR] [--tokens N] [--runs N]

writes its table into docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import free_gb, peak_rss_run, update_doc
from bench.convert import build_checkpoint
from devkit.tiny import sample_image
from llava_gguf.native import library as native

ROOT = Path(__file__).resolve().parents[1]

PROMPT = "What is in the image?"
FOLLOW_UP = "And which colours are there?"

OURS = r"""
import json, sys, time
t0 = time.perf_counter()
from llava_gguf import LLaVA
llm, mmproj, image, tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
m = LLaVA(llm, mmproj, n_threads=2, n_ctx=2048)
load = time.perf_counter() - t0
s = m.chat()
out = {"load": load, "model_load": m.engine.ctx.perf().t_load_ms / 1000}
for key, question, imgs in (("first", %r, [image]), ("follow", %r, [])):
    m.engine.ctx.perf_reset()
    t = time.perf_counter()
    n = 0
    for piece in s.ask(question, imgs, stream=True, temperature=0, max_tokens=tokens, repeat_penalty=1.0):
        n += 1
    st = m.last
    perf = m.engine.ctx.perf()
    out[key] = {"ttft": st.first_token_seconds, "tok_s": st.generation_tokens_per_second,
                "tok_s_counter": perf.eval_tokens_per_second,
                "generated": st.generated_tokens, "evaluated": st.evaluated_tokens,
                "images_encoded": st.images_encoded, "total": time.perf_counter() - t}
print(json.dumps(out))
""" % (PROMPT, FOLLOW_UP)

STOCK = r"""
import base64, json, sys, time
from llava_gguf.native import library
from llava_gguf.native.llama import stock_perf
library.configure()
t0 = time.perf_counter()
import llama_cpp
from llama_cpp.llama_chat_format import Llava15ChatHandler
llm, mmproj, image, tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
handler = Llava15ChatHandler(clip_model_path=mmproj, verbose=False)
model = llama_cpp.Llama(model_path=llm, chat_handler=handler, n_ctx=2048, n_threads=2, n_threads_batch=2, verbose=False)
load = time.perf_counter() - t0
uri = "data:image/png;base64," + base64.b64encode(open(image, "rb").read()).decode()
messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                         {"type": "text", "text": %r}]}]
out = {"load": load, "model_load": stock_perf(model).t_load_ms / 1000}
for key in ("first", "follow"):
    stock_perf(model, reset=True)
    t = time.perf_counter()
    first, n, text = None, 0, ""
    # random weights: keep it from ending at once (end-of-sequence banned), like --ignore-eos for the CLI
    for chunk in model.create_chat_completion(messages=messages, stream=True, max_tokens=tokens, temperature=0,
                                              repeat_penalty=1.0, logit_bias={str(model.token_eos()): -1e9}):
        delta = chunk["choices"][0]["delta"]
        if "content" in delta:  # one chunk per token (random weights: often an empty piece)
            n += 1
            text += delta["content"] or ""
            if first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    first = first or end
    perf = stock_perf(model)
    out[key] = {"ttft": first - t, "tok_s": (n - 1) / (end - first) if n > 1 else 0.0, "generated": n, "total": end - t,
                "tok_s_counter": perf.eval_tokens_per_second}
    messages += [{"role": "assistant", "content": text}, {"role": "user", "content": %r}]
print(json.dumps(out))
""" % (PROMPT, FOLLOW_UP)


def best_of(found: list[tuple[dict, float, int]]) -> tuple[dict, float, int]:
    """Each figure's best over the runs (times lowest, speeds highest; peak RSS the highest seen)."""
    r = json.loads(json.dumps(min(found, key=lambda x: x[0]["first"]["ttft"])[0]))
    for key in ("load", "model_load"):
        r[key] = min((x[0][key] for x in found), key=lambda v: (v != v, v))  # NaN (not measured) last
    for turn in ("first", "follow"):
        if turn in r:
            r[turn]["ttft"] = min(x[0][turn]["ttft"] for x in found)
            r[turn]["tok_s_counter"] = max(x[0][turn]["tok_s_counter"] for x in found)
    return r, min(x[1] for x in found), max(x[2] for x in found)


def warm_page_cache(*files: Path) -> None:
    """Read the files once so that each contender's load reads them from memory, not from the disk."""
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def run_script(script: str, args: list[str]) -> tuple[dict, float, int]:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(script)
    out = tempfile.NamedTemporaryFile("r", suffix=".json", delete=False)
    try:
        wall, rss, rc, _ = peak_rss_run(["bash", "-c", f"{sys.executable} {f.name} {' '.join(args)} > {out.name}"])
        if rc != 0:
            sys.exit(f"{script.splitlines()[1]} ... failed (exit {rc})")
        return json.loads(Path(out.name).read_text().strip().splitlines()[-1]), wall, rss
    finally:
        os.unlink(f.name)
        os.unlink(out.name)


def run_mtmd_cli(tool: Path, llm: Path, mmproj: Path, image: Path, tokens: int) -> tuple[dict, float, int]:
    """One turn of llama-mtmd-cli, timed by its own counters (`--perf -lv 4`): load, image encode, prompt
    eval (image rows + text), and per-token eval."""
    template = ("{%- for m in messages -%}{%- if m['role'] == 'user' -%}USER: "
                "{{ m['content'] | replace('<__media__>', '<__media__>\n') }} ASSISTANT:{%- endif -%}{%- endfor -%}")
    cmd = [str(tool), "-m", str(llm), "--mmproj", str(mmproj), "--image", str(image), "-p", PROMPT, "--temp", "0",
           "-n", str(tokens), "--jinja", "--chat-template", template, "-t", "2", "-c", "2048", "--ignore-eos",
           "--perf", "-lv", "4", "--log-timestamps"]
    with tempfile.NamedTemporaryFile("r", suffix=".log", delete=False) as log:
        quoted = " ".join("'" + c.replace("'", "'\\''") + "'" for c in cmd)
        wall, rss, rc, _ = peak_rss_run(["bash", "-c", f"{quoted} > /dev/null 2> {log.name}"])
        text = Path(log.name).read_text(errors="replace")
    os.unlink(log.name)

    def ms(pattern: str) -> float:
        found = re.findall(pattern, text)
        return sum(float(x) for x in found) / 1000 if found else float("nan")

    load = ms(r"llama_perf_context_print:\s+load time =\s+([\d.]+) ms")
    # ready: the log line mtmd-cli prints once its model, context (with its warm-up run) and libmtmd are
    # set up; --log-timestamps prefixes minutes.seconds.milliseconds.microseconds since its start
    stamp = re.search(r"^(\d+)\.(\d+)\.(\d+)\.(\d+) I main: loading model", text, re.M)
    ready = (int(stamp[1]) * 60 + int(stamp[2]) + int(stamp[3]) / 1e3) if stamp else float("nan")
    if rc != 0 or load != load:
        sys.exit(f"llama-mtmd-cli failed (exit {rc}): {text[-500:]}")
    encode = ms(r"image slice encoded in (\d+) ms")
    if encode != encode:  # not logged per slice: the batch line
        encode = ms(r"mtmd batch encoding done in (\d+) ms")
    prompt = ms(r"prompt eval time =\s+([\d.]+) ms")
    m = re.search(r"\seval time =\s+[\d.]+ ms /\s+\d+ runs.*?([\d.]+) tokens per second", text)
    tok_s = float(m.group(1)) if m else float("nan")
    return {"load": ready, "model_load": load, "first": {"ttft": encode + prompt, "tok_s": float("nan"), "tok_s_counter": tok_s}}, wall, rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("LLAVA_GGUF_BENCH_DIR", "/tmp/llava-gguf-bench")))
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=2, help="round-robin runs; the table keeps each figure's best")
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()
    f16 = args.workdir / "f16" / "llava-1.5-7b-geometry-F16.gguf"
    mmproj = args.workdir / "f16" / "mmproj-llava-1.5-7b-geometry-F16.gguf"
    q4 = args.workdir / "f16" / "llava-1.5-7b-geometry-Q4_K_M.gguf"
    if not f16.is_file():
        args.workdir.mkdir(parents=True, exist_ok=True)
        if free_gb(args.workdir) < 35:
            sys.exit("need ~35 GB free to build the 7B-geometry checkpoint and its F16 GGUF")
        ckpt = build_checkpoint(args.workdir / "llava-1.5-7b-geometry")
        subprocess.run([sys.executable, "-m", "llava_gguf", "convert", str(ckpt), "-o", str(f16.parent), "--outtype",
                        "f16", "--force"], check=True)
    if not q4.is_file():
        subprocess.run([sys.executable, "-m", "llava_gguf", "quantize", str(f16), "--type", "Q4_K_M", "--threads", "2"],
                       check=True)
    image = args.workdir / "bench-image.png"
    sample_image(336, seed=7).save(image)
    tool = native.configure().tools_dir / "llama-mtmd-cli"
    a = [str(q4), str(mmproj), str(image), str(args.tokens)]
    contenders = (("llava-gguf API (ours)", lambda: run_script(OURS, a)),
                  ("llama-cpp-python Llava15ChatHandler (stock)", lambda: run_script(STOCK, a)),
                  ("llama-mtmd-cli (native)", lambda: run_mtmd_cli(tool, q4, mmproj, image, args.tokens)))
    runs: dict[str, list] = {label: [] for label, _ in contenders}
    for _ in range(args.runs):  # round-robin, so that a slow spell of this shared VM hits every contender
        for label, fn in contenders:
            os.sync()
            warm_page_cache(q4, mmproj)  # every contender loads its files from memory
            time.sleep(2)
            r, wall, rss = fn()
            runs[label].append((r, wall, rss))
            print(label, json.dumps(r), f"wall {wall:.1f} s, peak RSS {rss / 1024:.0f} MB", flush=True)
    results = {label: best_of(found) for label, found in runs.items()}
    native_tok = results["llama-mtmd-cli (native)"][0]["first"]["tok_s_counter"]
    rows = ["| | ready (process start to loaded) | model load (llama.cpp's counter) | first turn: time to first token | generation, as the caller gets tokens | "
            "generation, llama.cpp's eval counter | vs native | follow-up: time to first token | "
            "follow-up / first | peak RSS |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, (r, wall, rss) in results.items():
        first, follow = r["first"], r.get("follow")
        fu = f"{follow['ttft']:.2f} s" if follow else "— (single turn)"
        ratio = f"{follow['ttft'] / first['ttft']:.3f}" if follow else "—"
        caller = f"{first['tok_s']:.2f} tok/s" if first["tok_s"] == first["tok_s"] else "—"
        ready = f"{r['load']:.1f} s" if r["load"] == r["load"] else "—"
        rows.append(f"| {label} | {ready} | {r['model_load']:.1f} s | {first['ttft']:.1f} s | {caller} | "
                    f"{first['tok_s_counter']:.2f} tok/s | {first['tok_s_counter'] / native_tok:.3f}x | {fu} | "
                    f"{ratio} | {rss / 1024:.0f} MB |")
    table = "\n".join(rows)
    ours = results["llava-gguf API (ours)"][0]
    body = (f"LLaVA-1.5-7B geometry (random weights) quantized to Q4_K_M ({q4.stat().st_size / 1e9:.2f} GB) + F16 mmproj, "
            f"a 336x336 image, greedy, {args.tokens} answer tokens, 2 threads, n_ctx 2048; {os.cpu_count()} cores; "
            f"each contender in its own process, best of {args.runs} round-robin runs (each figure's best), the model files in the page cache before each. The checkpoint's tokenizer has LLaMA's 32,000 "
            f"pieces, learnt from English prose (bench/convert.py), so a question takes about as many tokens as "
            f"with LLaVA's own.\n\n{table}\n\n"
            f"Ready: from the process's start to a model that takes questions (imports, file checks, model, "
            f"context with its KV cache, and for ours and llama-mtmd-cli libmtmd's context too — llama-mtmd-cli also "
            f"runs a warm-up decode; its figure is from its --log-timestamps log; the stock handler creates libmtmd's "
            f"on its first request); model load: llama.cpp's own counter (`llama_perf_context` t_load), the figure llama-mtmd-cli "
            f"prints as its load time.\n\n"
            f"Follow-up: ours decoded {ours['follow']['evaluated']} new positions and encoded "
            f"{ours['follow']['images_encoded']} images (the stock handler clears its cache and encodes the image "
            f"again for every request). llama-mtmd-cli's figures are its own counters (`--perf`): first token = "
            f"image encode + prompt eval (image rows and text), after loading. Generation speed is given twice: "
            f"as the caller receives tokens (sampling and detokenizing included; llama-mtmd-cli prints its tokens "
            f"itself), and from llama.cpp's own eval counter (`llama_perf_context`: time in single-token decodes), "
            f"the same counter in all three, which is the like-for-like figure; \"vs native\" compares that one. The stock handler runs on our libraries "
            f"(it loads libmtmd from MTMD_CPP_LIB), so its image features are correct here too; its speed is what "
            f"matters.\n\nCommand: `python -m bench.chat` ({time.strftime('%Y-%m-%d')})")
    if not args.no_doc:
        update_doc(ROOT / "docs" / "benchmarks.md", "chat", "Chat (chat, Python API)", body)
    print(table)


if __name__ == "__main__":
    main()
