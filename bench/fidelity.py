"""Fidelity table: every family and layout the converter takes x output type -> image-embedding cosine,
next-token KL, top-1 agreement and identical greedy answers against transformers, measured by
`llava-gguf verify` (the CLI, one process per row) on tiny random checkpoints built here in each family's
real key layout (devkit.tiny). One row also runs the stock, unpatched libmtmd.

    .venv/bin/python -m bench.fidelity [--no-doc]

writes its table into docs/fidelity.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench.common import ROOT, update_doc
from devkit.tiny import TinySpec, make_tiny_liuhaotian, make_tiny_llava
from llava_gguf.demo.run import SHIPPED_MODEL

OUTTYPES = ("f32", "f16", "q8_0", "Q4_K_M")


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llava_gguf", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def fixtures(work: Path) -> list[tuple[str, Path, list[str]]]:
    """(description, checkpoint, extra convert/verify arguments)."""
    out = [("shapes-llava (trained, shipped), llava-hf transformers-5", SHIPPED_MODEL, [])]
    for layout in ("transformers<4.52", "transformers-4.52", "transformers-5"):
        spec = replace(TinySpec(), layout=layout, dtype="float16")
        out.append((f"llava-1.5, llava-hf {layout}", make_tiny_llava(work / f"l15-{layout}".replace("<", "lt"), spec), []))
    out.append(("bakllava (Mistral), llava-hf transformers<4.52",
                make_tiny_llava(work / "bak", TinySpec(layout="transformers<4.52", dtype="float16", text_model="mistral")),
                []))
    out.append(("llava-1.6 (anyres), llava-hf transformers-5",
                make_tiny_llava(work / "l16", TinySpec(dtype="float16", anyres=True)), []))
    out.append(("llava-1.6, LLaMA-3 text model (BPE, llama3 template)",
                make_tiny_llava(work / "l16-llama3", TinySpec(dtype="float16", anyres=True, tokenizer="llama3")), []))
    out.append(("llava-1.6, Yi text model (ChatML template)",
                make_tiny_llava(work / "l16-yi", TinySpec(dtype="float16", anyres=True, tokenizer="chatml")), []))
    hf = make_tiny_llava(work / "base", TinySpec(dtype="float16"))
    out.append(("llava-original (liuhaotian), sharded .bin + CLIPModel",
                make_tiny_liuhaotian(hf, work / "lh", work / "clip-full", clip_kind="full", weights_format="bin",
                                     shards=2), ["--clip", str(work / "clip-full")]))
    out.append(("LLaVA v1 (linear projector), liuhaotian + CLIPVisionModel",
                make_tiny_liuhaotian(hf, work / "v1", work / "clip-v", weights_format="safetensors",
                                     linear_projector=True), ["--clip", str(work / "clip-v")]))
    hfm = make_tiny_llava(work / "base-m", TinySpec(dtype="float16", text_model="mistral"))
    out.append(("llava-original-mistral (LLaVA-Med layout), safetensors",
                make_tiny_liuhaotian(hfm, work / "lhm", work / "clip-m", weights_format="safetensors"),
                ["--clip", str(work / "clip-m")]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="llava-fidelity-") as tmp:
        work = Path(tmp)
        for desc, ckpt, extra in fixtures(work):
            for outtype in OUTTYPES:
                out = work / "gguf" / f"{ckpt.name}-{outtype}"
                p = cli("convert", str(ckpt), "-o", str(out), "--outtype", outtype, *extra)
                if p.returncode != 0:
                    raise SystemExit(f"convert {desc} {outtype}: {p.stderr}")
                runtimes = ("fixed", "stock") if outtype == "f32" and desc.startswith("llava-1.5, llava-hf transformers-5") \
                    else ("fixed",)
                for runtime in runtimes:
                    v = cli("verify", str(ckpt), str(out), "--runtime", runtime, "--json", *extra)
                    if v.returncode not in (0, 1) or not v.stdout.strip():
                        raise SystemExit(f"verify {desc} {outtype}: {v.stderr}")
                    r = json.loads(v.stdout.strip().splitlines()[-1])
                    rows.append((desc, outtype, runtime, r))
                    print(f"{desc:58} {outtype:7} {runtime:5} cosine {r['cosine_mean']:.7f} top1 {r['top1']:.3f} "
                          f"greedy {r['greedy_identical']}/{len(r['images'])} {'PASS' if r['passed'] else 'FAIL'}",
                          flush=True)
    minutes = (time.perf_counter() - t0) / 60
    lines = [
        "| family, layout | LLM type | mmproj | libmtmd | image cosine mean (min) | next-token KL mean | top-1 | "
        "identical greedy answers | verify |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for desc, outtype, runtime, r in rows:
        mm = Path(r["mmproj"]).stem.rsplit("-", 1)[-1]
        lines.append(f"| {desc} | {outtype.upper()} | {mm} | {runtime} | {r['cosine_mean']:.7f} ({r['cosine_min']:.7f}) | "
                     f"{r['kl_mean']:.2e} | {100 * r['top1']:.1f}% | {r['greedy_identical']}/{len(r['images'])} | "
                     f"{'pass' if r['passed'] else 'FAIL'} |")
    body = ("The shipped shapes-llava (a trained model, `llava_gguf/data/shapes-llava`), then tiny random checkpoints\n"
            "(CLIP 3 layers, width 64, 112 px / 14; LLaMA or Mistral 2 layers, width 256) in each family's real key\n"
            "layout, converted by `llava-gguf convert` and checked by `llava-gguf verify` against transformers fp32:\n"
            "3 built-in images (square at the tower's resolution; for 1.6 one square, one wide, one tall), 16 answer tokens, the same token ids on both sides.\n"
            "Random weights make a poor quantization test (no margin between their top tokens), so the Q4_K_M rows\n"
            "of the random checkpoints fall below verify's default top-1 bound. The trained model answers verify's\n"
            "generic images and question (\"What is in the image?\", outside its task) in one token, where a near\n"
            "tie can flip, and one flipped answer of the three is a third of the top-1 figure; what quantization costs it on its own task\n"
            "is in docs/benchmarks.md (2,500 test questions). The stock row is the same F32 files through the unpatched libmtmd\n"
            "(upstream #25814), i.e. what other llama.cpp-based apps compute from them.\n\n"
            + "\n".join(lines)
            + f"\n\n{len(rows)} rows in {minutes:.1f} min on 2 cores. Command: `.venv/bin/python -m bench.fidelity`")
    print(body)
    if not args.no_doc:
        doc = ROOT / "docs" / "fidelity.md"
        if not doc.exists():
            doc.write_text(FIDELITY_INTRO)
        update_doc(doc, "fidelity", "Every family against transformers", body)


FIDELITY_INTRO = """# Fidelity: our GGUF files against transformers

What `llava-gguf verify SRC OUTDIR` measures, for every checkpoint family and layout `convert` takes:

- **image-embedding cosine**: the rows our runtime (`LLaVA.embed_image`) feeds the language model against
  the ones transformers' `get_image_features` gives, mean (and min) per token;
- **next-token KL** and **top-1 agreement** at every position of transformers' greedy answer (our runtime fed
  the same tokens);
- **identical greedy answers**: our own greedy answer equals transformers'.

Both sides get the same pixels: an image is padded to a square with LLaVA's background (as libmtmd and
LLaVA-1.5's training do) and resized with PIL to the tower's resolution before either sees it, so neither
resizes again. The reference is transformers' `LlavaForConditionalGeneration` holding the checkpoint's
weights as the converter reads them — for the original liuhaotian layout built from its `mm_*` config and
the separate CLIP tower, and for LLaVA v1 with its `nn.Linear` projector (the GGUF carries it as an exact
GELU pair, see README). A 7B model that does not fit in memory in float32 is referenced in bfloat16, and
the report says so.

How the path is faithful: our libmtmd is built from the llama.cpp that llama-cpp-python 0.3.36 vendors with
one patch (`native/patches/0001-llava-cls-first.patch`: CLIP's class embedding first, upstream #25814), and
every mmproj we write carries `clip.vision.feature_layer` with exactly the layers it needs (upstream #25817;
`llava-gguf repair` adds it to files made elsewhere). LLaVA-1.6 (anyres): the runtime cuts tiles in Python
exactly as transformers' processor does, has libmtmd encode each as a plain square image, and packs the rows
with unpadding and image_newline as transformers does (README, "LLaVA-1.6").
"""


if __name__ == "__main__":
    main()
