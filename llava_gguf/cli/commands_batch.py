"""`llava-gguf batch`: the options, parsed; the work is llava_gguf.batch (records appended to a resumable
JSONL as they finish; the exit status is the number of records that failed, at most 125)."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from llava_gguf.batch.output import Output, exists_error
from llava_gguf.batch.api import run
from llava_gguf.batch.cluster import Cluster
from llava_gguf.cli.progress import record_progress
from llava_gguf.errors import InvalidSetting
from llava_gguf.runtime.sampling import sampling_settings
from llava_gguf.settings import SAMPLING_DEFAULTS as DEFAULTS


def batch(
    path: Path = typer.Argument(..., help="directory that convert/quantize wrote, or an LLM .gguf"),
    source: Path = typer.Argument(..., metavar="INPUT",
                                  help="a directory of images, a text file of image paths, LLaVA's question JSONL, "
                                       "or a Parquet"),
    out: Path = typer.Option(..., "-o", "--output", help="the answers, JSONL (LLaVA's answer format and ours)"),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="the question where the input has none"),
    image_folder: Optional[Path] = typer.Option(None, "--image-folder", help="where the input's image paths are"),
    image_column: Optional[str] = typer.Option(None, "--image-column",
                                               help="Parquet: the image column (bytes or path)"),
    question_column: Optional[str] = typer.Option(None, "--question-column", help="Parquet: the question column"),
    resume: bool = typer.Option(False, "--resume", help="skip the records OUT already has, append the rest"),
    force: bool = typer.Option(False, "--force", help="replace an existing OUT"),
    system: Optional[str] = typer.Option(None, "--system", help="system prompt"),
    parallel: int = typer.Option(2, "--parallel", "-np", help="records answered at once (sequences)"),
    max_tokens: int = typer.Option(DEFAULTS["max_tokens"], "--max-tokens", help="at least 1"),
    temp: float = typer.Option(DEFAULTS["temperature"], "--temp", help="sampling temperature (0 = greedy)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="0 to 4294967294 (default: random)"),
    n_ctx: Optional[int] = typer.Option(None, "--ctx", min=64, help="positions per sequence"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1,
                                          help="threads (with --ray: each actor's; default cores // workers)"),
    use_ray: bool = typer.Option(False, "--ray", help="answer on Ray Data: a local Ray, or --ray-address's cluster"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="join a running Ray: auto or host:port"),
    workers: Optional[int] = typer.Option(None, "--workers", help="with --ray: model actors (default 2)"),
    model: Optional[Path] = typer.Option(None, "--model", help="the LLM .gguf, when the directory has several"),
    mmproj: Optional[Path] = typer.Option(None, "--mmproj", help="the mmproj .gguf"),
    verbose: bool = typer.Option(False, "--verbose", help="llama.cpp's logs"),
) -> None:
    """Answer every image or question of INPUT into OUT (resumable: --resume after a crash)."""
    if (workers is not None) and not (use_ray or ray_address):
        raise InvalidSetting("--workers is for --ray", "add --ray (a local Ray) or --ray-address (a cluster)")
    cluster = Cluster(2 if workers is None else workers, threads, ray_address) if use_ray or ray_address else None
    if cluster is not None:
        cluster.check()
    sampling = sampling_settings(max_tokens=max_tokens, temperature=temp, seed=seed)
    if os.path.lexists(out) and not (resume or force):  # said before the model loads (Output.open checks again)
        raise exists_error(out)
    done: set[str] = set()
    # inputs and model checked and loaded before OUT is created: a bad input leaves no empty OUT behind
    records = run(path, source, prompt=prompt, image_folder=image_folder, image_column=image_column,
                  question_column=question_column, system=system, parallel=parallel, sampling=sampling,
                  threads=threads, n_ctx=n_ctx, llm=model, mmproj=mmproj, skip=done, ray=cluster, verbose=verbose)
    with records, Output.open(out, resume=resume, force=force) as output:
        done.update(output.done)
        failed = 0
        with record_progress(sys.stderr.isatty(), records.total, output.resumed) as advance:
            for record in records:
                output.write(record)
                bad = record.get("error") is not None
                failed += bad
                advance(bad)
    typer.echo(f"{output.count} records written to {out}" + (f" ({output.resumed} were there already)" if resume else "")
               + (f"; {failed} failed (their `error` says why)" if failed else ""), err=True)
    if failed:
        raise typer.Exit(min(failed, 125))
