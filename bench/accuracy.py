"""Accuracy of the shipped shapes-llava on the whole test split (every question of the first 500 test
scenes: 2,500 questions) through transformers (fp32) and through our GGUF files: F32, F16, Q8_0 and
Q4_K_M language models (F16 mmproj, F32 with the F32 one), and Q8_0 with a Q8_0 mmproj. Per file type:
accuracy, agreement with the transformers answers, accuracy per question kind, file sizes.

    .venv/bin/python -m bench.accuracy [--model DIR] [--scenes N] [--no-doc]

writes its table into docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from bench.common import BENCHMARKS_DOC, update_doc
from llava_gguf import LLaVA
from llava_gguf.convert import convert_checkpoint
from llava_gguf.demo import shapes
from llava_gguf.demo.run import SHIPPED_MODEL
from llava_gguf.quantize import quantize_gguf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=SHIPPED_MODEL)
    ap.add_argument("--scenes", type=int, default=shapes.TEST_SCENES)
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()
    pairs = shapes.test_split(args.scenes)
    print(f"{len(pairs)} questions", flush=True)

    # heavy (seconds to import): after the arguments are parsed
    import torch
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    torch.set_num_threads(2)
    t = time.perf_counter()
    hf = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.model)
    ref = shapes.hf_answers(hf, tok, pairs)
    rows = [("transformers fp32", "—", ref, time.perf_counter() - t, None)]
    print(f"transformers: {shapes.accuracy(ref, pairs):.4f}", flush=True)
    del hf

    with tempfile.TemporaryDirectory(prefix="llava-gguf-accuracy-") as tmp:
        work = Path(tmp)
        f32 = convert_checkpoint(args.model, work / "f32", outtype="f32", mmproj_type="f32", name="m")
        f16 = convert_checkpoint(args.model, work / "f16", outtype="f16", mmproj_type="f16", name="m")
        llm16, mm16 = Path(f16.llm), Path(f16.mmproj)
        q8 = quantize_gguf(llm16, "Q8_0", work / "m-Q8_0.gguf").output
        q4 = quantize_gguf(llm16, "Q4_K_M", work / "m-Q4_K_M.gguf").output
        mm8 = quantize_gguf(mm16, "Q8_0", work / "mmproj-m-Q8_0.gguf").output
        for label, llm, mm in (("F32", f32.llm, f32.mmproj), ("F16", llm16, mm16), ("Q8_0", q8, mm16),
                               ("Q8_0 + Q8_0 mmproj", q8, mm8), ("Q4_K_M", q4, mm16)):
            t = time.perf_counter()
            with LLaVA(llm, mm, n_threads=2) as m:
                answers = shapes.gguf_answers(m, pairs)
            size = f"{Path(llm).stat().st_size / 1e6:.2f} + {Path(mm).stat().st_size / 1e6:.2f} MB"
            rows.append((label, size, answers, time.perf_counter() - t, ref))
            print(f"{label}: accuracy {shapes.accuracy(answers, pairs):.4f}, agreement "
                  f"{shapes.agreement(answers, ref):.4f}", flush=True)

    kinds = list(shapes.QUESTION_KINDS)
    lines = ["| model file | size (LLM + mmproj) | accuracy | agreement with transformers | "
             + " | ".join(kinds) + " | time |", "|---|---|---|---|" + "---|" * len(kinds) + "---|"]
    for label, size, answers, secs, against in rows:
        by_kind = shapes.accuracy_by_kind(answers, pairs)
        per = [f"{100 * by_kind[kind]:.1f}%" for kind in kinds]
        k = shapes.correct(answers, pairs)
        agree = "—" if against is None else f"{100 * shapes.agreement(answers, against):.2f}%"
        lines.append(f"| {label} | {size} | {100 * k / len(pairs):.2f}% ({k}/{len(pairs)}) | {agree} | "
                     + " | ".join(per) + f" | {secs:.0f} s |")
    table = "\n".join(lines)
    print(table)
    body = (f"The shipped `shapes-llava` ({args.model.name}; trained by `python -m training.train`, see its "
            f"README.md) on the test split: every question of the first {args.scenes} test scenes "
            f"({len(pairs)} questions, scenes the model never saw), greedy. Agreement: the same normalised "
            f"answer as transformers' (fp32, same prompt and pixels). {os.cpu_count()} cores, 2 threads.\n\n"
            f"{table}\n\nCommand: `python -m bench.accuracy` ({time.strftime('%Y-%m-%d')})")
    if not args.no_doc:
        update_doc(BENCHMARKS_DOC, "accuracy", "Accuracy of the shipped model (demo, quantization)",
                   body)


if __name__ == "__main__":
    main()
