"""Every report, rendered: as the lines a terminal shows, and as the one JSON line --json prints. A command
calls `show(json_out, report, <report>_json, <report>_lines)` (`to_json` for a report that defines its
own); nothing else in the CLI formats a report. The JSON shapes are the
CLI's contract (tests and scripts parse them): a key is never renamed here."""
from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import TypeVar

import typer

from llava_gguf.checks.inspect import CheckpointReport, InspectReport, report_from_json
from llava_gguf.checks.quality import QualityReport
from llava_gguf.checks.verify import VerifyReport
from llava_gguf.convert import ConvertResult
from llava_gguf.gguf.inspect import GGUFReport, LlmFacts, MmprojFacts
from llava_gguf.gguf.repair import RepairResult
from llava_gguf.native.doctor import DoctorReport
from llava_gguf.quantize import QuantizeResult, QuantType
from llava_gguf.runtime.imatrix import ImatrixResult
from llava_gguf.runtime.generate import EvalStats

R = TypeVar("R")


def print_json(obj: Mapping) -> None:
    """Every --json output: one single-line JSON object on the last line of stdout."""
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def show(json_out: bool, report: R, as_json: Callable[[R], Mapping], as_lines: Callable[[R], Iterable[str]]) -> None:
    """`report` as one JSON line (--json) or as its lines of text: only the form asked for is built."""
    if json_out:
        print_json(as_json(report))
    else:
        echo_lines(as_lines(report))


def to_json(report: InspectReport | QualityReport | VerifyReport | DoctorReport) -> dict:
    """The --json form of a report that defines its own."""
    return report.to_json()


def echo_lines(lines: Iterable[str], err: bool = False) -> None:
    for line in lines:
        typer.echo(line, err=err)


# ------------------------------------------------------------------------------------------- producers
def convert_json(r: ConvertResult) -> dict:
    return {"llm": str(r.llm), "mmproj": str(r.mmproj), "family": r.family, "layout": r.layout,
            "tensors": r.tensors, "bytes": r.bytes_written}


def convert_lines(r: ConvertResult) -> list[str]:
    return [f"{r.family} ({r.layout} layout) -> {r.llm}",
            f"{' ' * len(r.family)}{' ' * (len(r.layout) + 10)} -> {r.mmproj}"]


def quant_type_lines(types: Iterable[QuantType]) -> list[str]:
    """`quantize --list`: name, bits per weight and note in columns as wide as their widest entry (a
    fixed width misaligned the longest name, MXFP4_MOE)."""
    types = list(types)
    name_width = max((len(t.name) for t in types), default=0)
    bpw_width = max((len(f"{t.bpw:.2f}") for t in types), default=0)
    return [f"{t.name:{name_width}}  {t.bpw:{bpw_width}.2f} bpw  {t.note}"
            + ("  (needs --imatrix)" if t.needs_imatrix else "") for t in types]


def quant_types_json(types: Iterable[QuantType]) -> dict:
    """`quantize --list --json`."""
    return {"types": [{"name": t.name, "bpw": round(t.bpw, 2), "note": t.note, "needs_imatrix": t.needs_imatrix}
                      for t in types]}


def quantize_json(results: Sequence[QuantizeResult]) -> dict:
    return {"outputs": [{"path": str(r.output), "type": r.type, "bytes": r.bytes,
                         "source": str(r.source) if r.source else None} for r in results]}


def quantize_lines(results: Sequence[QuantizeResult]) -> list[str]:
    return [f"{r.type:7} -> {r.output} ({r.bytes / 1e6:.1f} MB, {f'from {r.source.name}' if r.source else 'kept'})"
            for r in results]


def imatrix_json(r: ImatrixResult) -> dict:
    return {"output": str(r.output), "entries": r.entries, "chunks": r.chunks, "n_ctx": r.n_ctx,
            "tokens": r.tokens, "dataset": r.dataset, "images": r.images}


def imatrix_lines(r: ImatrixResult) -> list[str]:
    extra = f" and {r.images} images" if r.images else ""
    return [f"imatrix -> {r.output} ({r.entries} tensors, {r.chunks} chunks of {r.n_ctx} tokens{extra})"]


def repair_json(r: RepairResult) -> dict:
    return {"source": str(r.source), "output": str(r.output) if r.output else None, "fixed": list(r.fixed)}


def repair_lines(r: RepairResult, given: Path) -> list[str]:
    """`given`: the path as the user typed it (named when there is nothing to repair)."""
    if r.output is None:
        return [f"{given}: nothing to repair"]
    return [f"fixed {', '.join(r.fixed)} -> {r.output}"]


# -------------------------------------------------------------------------------------------- checks
def quality_lines(r: QualityReport) -> list[str]:
    lines = [f"base   {r.base} + {Path(r.base_mmproj).name}",
             f"quant  {r.quant} + {Path(r.mmproj).name}",
             f"{r.pairs} prompts with images, {r.positions} answer positions",
             f"KL divergence   mean {r.kl_mean:.6f}  median {r.kl_median:.6f}  p99 {r.kl_p99:.6f}  max {r.kl_max:.6f}",
             f"top-1 agreement {100 * r.top1:.1f}%   identical greedy answers {r.same_answers}/{r.pairs}"]
    if r.mmproj_cosine_mean is not None:
        lines.append(f"image embedding cosine vs base mmproj: mean {r.mmproj_cosine_mean:.6f}  "
                     f"min {r.mmproj_cosine_min:.6f}")
    return lines


def verify_lines(r: VerifyReport) -> list[str]:
    return [f"reference {r.source} (transformers, {r.reference_dtype})",
            f"gguf      {r.llm} + {Path(r.mmproj).name} ({r.runtime} libmtmd)",
            f"images    {len(r.images)}: {', '.join(r.images)}",
            f"image embedding cosine  mean {r.cosine_mean:.7f}  min {r.cosine_min:.7f}",
            f"next-token KL           mean {r.kl_mean:.6f}  max {r.kl_max:.6f}",
            f"top-1 agreement         {100 * r.top1:.1f}%   identical greedy answers {r.greedy_identical}/{len(r.images)}",
            "PASS" if r.passed else "FAIL: " + "; ".join(r.failures)]


def inspect_lines(report: InspectReport | Mapping) -> list[str]:
    """A checkpoint's or a GGUF's report (or its JSON form, as `inspect_path` returns it) as text."""
    r = report_from_json(report) if isinstance(report, Mapping) else report
    if isinstance(r, CheckpointReport):
        return _checkpoint_lines(r)
    return _gguf_lines(r)


def _gguf_lines(r: GGUFReport) -> list[str]:
    types = ", ".join(f"{k} x{v}" for k, v in r.tensor_types.items())
    lines = [f"{r.path}: {r.role} GGUF ({r.architecture}), {r.bytes / 1e6:.1f} MB, "
             f"{r.tensors} tensors, {r.parameters / 1e6:.1f} M parameters, file type {r.file_type}",
             f"tensor types  {types}"]
    f = r.facts
    if isinstance(f, MmprojFacts):
        lines.append(f"projector     {f.projector_type}, {f.image_size} px / {f.patch_size} -> "
                     f"{f.image_tokens} image tokens{' (anyres)' if f.anyres else ''}")
        lines.append(f"vision layers {f.stored_blocks} stored, block_count {f.block_count}, "
                     f"feature layer {f.feature_layer if f.feature_layer else 'not set'}, "
                     f"libmtmd runs {f.layers_run}")
    else:
        lines.extend(_llm_lines(f))
    if not r.defects:
        lines.append("defects       none found")
    for d in r.defects:
        fix = "`llava-gguf repair` fixes it" if d.repairable else "not repairable: convert again"
        lines.append(f"DEFECT {d.code}: {d.message} ({fix})")
    return lines


def _llm_lines(f: LlmFacts) -> list[str]:
    return [f"model         {f.block_count} layers, width {f.embedding_length}, {f.head_count} heads "
            f"({f.head_count_kv} kv), vocab {f.vocab_size} ({f.tokenizer}), context {f.context_length}",
            f"chat template {'yes' if f.chat_template else 'no (chat uses the family default)'}"]


def _checkpoint_lines(r: CheckpointReport) -> list[str]:
    p, w, v, c = r.parameters, r.weights, r.vision, r.convert_writes
    return [
        f"{r.path}: {r.family} checkpoint ({r.architecture}, {r.layout} layout, {r.text_model} text model)",
        f"weights     {w.files} {w.format} file(s), {w.bytes / 1e9:.2f} GB, dtypes "
        + ", ".join(f"{k} x{n}" for k, n in r.dtypes.items()),
        f"parameters  {p.total / 1e6:.1f} M (language model {p.language_model / 1e6:.1f} M, vision tower "
        f"{p.vision_tower / 1e6:.1f} M, projector {p.projector / 1e6:.1f} M)",
        f"vision      {v.layers} layers, {v.image_size} px / {v.patch_size} -> {v.image_tokens} image "
        f"tokens, feature layer {v.feature_layer}",
        f"convert     -> {c.llm} + {c.mmproj} ({c.vision_blocks} vision blocks, feature layer "
        f"{c.feature_layer})",
    ]


def doctor_lines(r: DoctorReport) -> list[str]:
    """native/doctor.py's report, one `field  value` line each in field order (the full system_info only in
    --json)."""
    lines = []
    for key in (f.name for f in fields(r)):
        value = getattr(r, key)
        if key == "system_info":
            continue
        if key == "llava_fix":
            value = "yes" if value else "NO (image features will not match the reference)"
        elif key == "devices":
            value = ", ".join(f"{d.name} ({d.type})" for d in r.devices)
        elif key == "cpu_features":
            value = ", ".join(r.cpu_features)
        lines.append(f"{key:20} {value}")
    return lines


# ---------------------------------------------------------------------------------------------- chat
def chat_json(text: str, st: EvalStats) -> dict:
    """`chat --prompt --json`: the answer and what it cost."""
    return {"text": text.strip(), "prompt_tokens": st.prompt_tokens, "reused_tokens": st.reused_tokens,
            "generated_tokens": st.generated_tokens, "images_encoded": st.images_encoded,
            "prompt_seconds": round(st.prompt_seconds, 4), "first_token_seconds": round(st.first_token_seconds, 4),
            "generation_tokens_per_second": round(st.generation_tokens_per_second, 3)}


def timings(st: EvalStats) -> str:
    """What the last answer cost (`/stats`, `chat --verbose`), said for how it ended: stopped while its
    prompt was prepared or decoded (the time until then, what was decoded), stopped before its first
    token, or answered (one token has no interval to time a rate over)."""
    if st.stopped_in is None and not st.prompt_tokens:
        return "no answer yet"
    before_first = "the answer was stopped before its first token"
    if st.stopped_in == "prompt":
        if not st.prompt_tokens:  # stopped while the images were encoded or the prompt tokenized
            return f"prompt: stopped after {st.prompt_seconds:.2f} s, while it was prepared; {before_first}"
        return (f"prompt: {st.prompt_tokens} tokens ({st.reused_tokens} from the cache, {st.evaluated_tokens} of "
                f"{st.prompt_tokens - st.reused_tokens} decoded, {st.images_encoded} image(s) encoded), stopped "
                f"after {st.prompt_seconds:.2f} s; {before_first}")
    prompt = (f"prompt: {st.prompt_tokens} tokens ({st.reused_tokens} from the cache, {st.evaluated_tokens} decoded, "
              f"{st.images_encoded} image(s) encoded) in {st.prompt_seconds:.2f} s, "
              f"{st.prompt_tokens_per_second:.1f} tok/s")
    if st.stopped_in == "answer" and not st.generated_tokens:
        return f"{prompt}; {before_first}"
    n = st.generated_tokens
    if n == 0:
        answer = "no answer tokens (the model ended its answer at once)"
    elif n == 1:
        answer = "1 token (no generation rate: a single token has no interval to time)"
    else:
        answer = f"{n} tokens at {st.generation_tokens_per_second:.1f} tok/s"
    stopped = " (stopped)" if st.stopped_in == "answer" else ""
    return f"{prompt}; first token after {st.first_token_seconds:.2f} s; {answer}{stopped}"
