"""The commands that run a model: chat (one answer with --prompt, else the REPL in cli/repl.py) and demo.
Each parses its options, calls the library and renders (cli/render.py); cli/app.py registers them."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from llava_gguf.cli.render import chat_json, print_json, timings
from llava_gguf.cli.repl import run_repl
from llava_gguf.demo.run import DemoReport, run_demo
from llava_gguf.errors import LlavaGgufError
from llava_gguf.gguf.pairing import locate_pair
from llava_gguf.runtime.images import load_image
from llava_gguf.runtime.model import LLaVA
from llava_gguf.runtime.sampling import check_text, sampling_settings
from llava_gguf.settings import SAMPLING_DEFAULTS as DEFAULTS  # the one table (API, chat, serve, batch)


def chat(
    path: Path = typer.Argument(..., help="directory that convert/quantize wrote, or an LLM .gguf"),
    image: Optional[list[str]] = typer.Option(None, "--image", help="image file (repeatable; - reads stdin)"),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="answer this once and exit (default: interactive)"),
    system: Optional[str] = typer.Option(None, "--system", help="system prompt"),
    model: Optional[Path] = typer.Option(None, "--model", help="the LLM .gguf, when the directory has several"),
    mmproj: Optional[Path] = typer.Option(None, "--mmproj", help="the mmproj .gguf"),
    # ranges are checked by the library (sampling_settings), so the CLI and the API say the same thing
    temp: float = typer.Option(DEFAULTS["temperature"], "--temp", help="sampling temperature (0 = greedy)"),
    top_p: float = typer.Option(DEFAULTS["top_p"], "--top-p", help="nucleus sampling, 0 to 1 (0: the most likely token)"),
    top_k: int = typer.Option(DEFAULTS["top_k"], "--top-k", help="0: all tokens"),
    repeat_penalty: float = typer.Option(DEFAULTS["repeat_penalty"], "--repeat-penalty", help="greater than 0 (1: none)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="0 to 4294967294 (default, -1 or 4294967295: random)"),
    max_tokens: int = typer.Option(DEFAULTS["max_tokens"], "--max-tokens", help="at least 1"),
    n_ctx: Optional[int] = typer.Option(None, "--ctx", "--n-ctx", min=64, help="context size (default: fits the image)"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1),
    gpu_layers: Optional[int] = typer.Option(None, "--gpu-layers", help="layers to offload (-1: all)"),
    json_out: bool = typer.Option(False, "--json", help="with --prompt: one JSON object with text, counts, timings"),
    verbose: bool = typer.Option(False, "--verbose", help="llama.cpp's logs, and timings on stderr"),
) -> None:
    """Ask about images: with --prompt one answer streamed to stdout, otherwise an interactive chat."""
    if prompt is None and (json_out or "-" in (image or [])):
        raise LlavaGgufError("--json and --image - need --prompt", "the interactive session reads your questions from stdin")
    sampling = dict(temperature=temp, top_p=top_p, top_k=top_k, repeat_penalty=repeat_penalty, seed=seed,
                    max_tokens=max_tokens)
    sampling_settings(**sampling)  # a bad setting fails now, before anything loads
    for text, what in ((prompt, "the prompt"), (system, "the system prompt")):
        if text is not None:
            check_text(text, what)  # an argument that is not UTF-8 arrives surrogate-escaped
    images = [_read_image_arg(i) for i in image or []]
    for im in images:
        load_image(im)  # a bad image fails now, before the model loads
    llm_path, mmproj_path = locate_pair(path, model, mmproj)
    with LLaVA(llm_path, mmproj_path, n_ctx=n_ctx, n_threads=threads, n_gpu_layers=gpu_layers, seed=seed,
               verbose=verbose) as m:
        session = m.chat(system)
        if prompt is None:
            run_repl(session, images, sampling, verbose=verbose)
            return
        pieces = session.ask(prompt, images, stream=True, **sampling)
        if json_out:
            print_json(chat_json("".join(pieces), m.last))
            return
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        if verbose:
            typer.echo(timings(m.last), err=True)


def _read_image_arg(arg: str) -> str | bytes:
    if arg == "-":
        data = sys.stdin.buffer.read()
        if not data:
            raise LlavaGgufError("--image - read nothing from stdin")
        return data
    return arg


def demo(
    model: Optional[Path] = typer.Option(None, "--model", help="a LLaVA checkpoint directory (default: the shipped "
                                         "shapes-llava)"),
    image: Optional[Path] = typer.Option(None, "--image", help="ask about your own image instead"),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="the question for --image (default: Describe the "
                                         "image.)"),
    questions: int = typer.Option(24, "--questions", min=1, max=10000, help="test questions to ask"),
    json_out: bool = typer.Option(False, "--json", help="one JSON line with the results"),
) -> None:
    """Convert the shipped small LLaVA (trained here on synthetic shapes), quantize it to Q4_K_M and
    ask it questions about test images, with accuracy per file type; --image asks about yours. Image
    features are checked against the Hugging Face reference. --model: any checkpoint, one question. One
    question is always answered by the Q4_K_M file (the output says so)."""
    # the text form is the demo's own progress and answers, echoed as it runs
    report: DemoReport = run_demo(model, image, prompt, echo=(lambda s: None) if json_out else typer.echo,
                                  questions=questions)
    if json_out:
        print_json(report.to_json())
