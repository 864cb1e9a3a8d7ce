"""The `export` commands: a converted pair handed to Ollama (a Modelfile) or LM Studio (its models folder).
Each parses its options, calls llava_gguf.export and prints what it did; cli/app.py registers them as the
`export` group."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from llava_gguf.cli.progress import copy_progress
from llava_gguf.cli.render import print_json
from llava_gguf.export import export_lmstudio, export_ollama

_PAIR_HELP = "directory that convert/quantize wrote (an LLM .gguf and its mmproj), or an LLM .gguf"


def ollama(
    path: Path = typer.Argument(..., help=_PAIR_HELP),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="directory for the Modelfile (default: the pair's)"),
    name: Optional[str] = typer.Option(None, "--name", help="Ollama model name (default: from the model's name)"),
    model: Optional[Path] = typer.Option(None, "--model", help="the LLM .gguf, when the directory has several"),
    mmproj: Optional[Path] = typer.Option(None, "--mmproj", help="the mmproj .gguf"),
    force: bool = typer.Option(False, "--force", help="replace an existing Modelfile"),
    json_out: bool = typer.Option(False, "--json", help="one JSON line with the paths and the command"),
) -> None:
    """Write an Ollama Modelfile for the pair: FROM the LLM, FROM the mmproj, a TEMPLATE that prompts as
    `llava-gguf chat` does, stop strings and a context that holds an image; prints the `ollama create` line."""
    r = export_ollama(path, out, name=name, model=model, mmproj=mmproj, force=force)
    if json_out:
        print_json({"modelfile": str(r.modelfile), "name": r.name, "command": r.command, "chat_format": r.chat_format,
                    "num_ctx": r.num_ctx, "llm": str(r.llm), "mmproj": str(r.mmproj)})
        return
    typer.echo(f"wrote {r.modelfile} ({r.llm.name} + {r.mmproj.name}, chat format {r.chat_format}, "
               f"num_ctx {r.num_ctx})")
    typer.echo("create the Ollama model with:")
    typer.echo(f"  {r.command}")


def lmstudio(
    path: Path = typer.Argument(..., help=_PAIR_HELP),
    models_dir: Optional[Path] = typer.Option(None, "--models-dir",
                                              help="LM Studio's models folder (default: the one LM Studio uses)"),
    model: Optional[Path] = typer.Option(None, "--model", help="the LLM .gguf, when the directory has several"),
    mmproj: Optional[Path] = typer.Option(None, "--mmproj", help="the mmproj .gguf"),
    force: bool = typer.Option(False, "--force", help="replace different files of the same names"),
    json_out: bool = typer.Option(False, "--json", help="one JSON line with the paths and how each was placed"),
) -> None:
    """Put the pair in LM Studio's models folder as <publisher>/<model>/ with the mmproj- file beside the
    model, so that LM Studio loads it with vision; hard links where possible, else copies."""
    with copy_progress(sys.stderr.isatty() and not json_out) as progress:  # a copy across file systems
        r = export_lmstudio(path, models_dir, model=model, mmproj=mmproj, force=force, progress=progress)
    if json_out:
        print_json({"folder": str(r.folder),
                    "files": [{"path": str(p.path), "how": p.how} for p in (r.llm, r.mmproj)]})
        return
    typer.echo(f"LM Studio model folder: {r.folder}")
    for p in (r.llm, r.mmproj):
        typer.echo(f"  {p.path.name}: {p.how}")
    typer.echo("LM Studio prompts the model with the chat template inside the .gguf")
