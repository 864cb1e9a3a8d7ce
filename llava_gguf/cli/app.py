"""The `llava-gguf` command line: the typer app, its commands registered in the order `--help` lists them
(they live in cli/commands_*.py: each parses, calls one library function, renders), and `main`, which makes
every error and warning one line on stderr. The console script and `python -m llava_gguf` call `main`."""
from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from collections.abc import Callable

import typer
from typer.core import TyperGroup

from llava_gguf.cli import (commands_batch, commands_check, commands_export, commands_produce, commands_run,
                            commands_serve)
from llava_gguf.errors import LlavaGgufError, LlavaGgufWarning

try:  # typer >= 0.17 carries its own copy of click; older ones use click itself
    from typer._click import exceptions as click_exceptions
    from typer.exceptions import Abort
except ImportError:  # pragma: no cover - depends on the typer version
    from click import exceptions as click_exceptions
    from click.exceptions import Abort


class _Listed(TyperGroup):
    """`--help` lists the commands and the command groups in HELP_ORDER (typer puts groups last)."""

    def list_commands(self, ctx) -> list[str]:  # noqa: ANN001 - click's Context
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: HELP_ORDER.index(n) if n in HELP_ORDER else len(HELP_ORDER))


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, cls=_Listed,
                  help="Convert LLaVA checkpoints from Hugging Face to GGUF and run them on llama.cpp.")


def guarded(fn: Callable) -> Callable:
    """Every command: an expected failure or Ctrl-C is one line on stderr and a non-zero exit."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LlavaGgufError as e:
            typer.echo(f"error: {e.one_line()}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("error: interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


# name -> the command function (its docstring is the help), in the order `llava-gguf --help` lists them
COMMANDS: tuple[tuple[str, Callable], ...] = (
    ("convert", commands_produce.convert),
    ("quantize", commands_produce.quantize),
    ("imatrix", commands_produce.imatrix),
    ("quality", commands_check.quality),
    ("inspect", commands_check.inspect),
    ("repair", commands_produce.repair),
    ("verify", commands_check.verify_cmd),
    ("chat", commands_run.chat),
    ("serve", commands_serve.serve),
    ("batch", commands_batch.batch),
    ("doctor", commands_check.doctor),
    ("demo", commands_run.demo),
)

# name -> (help, its commands): command groups (`llava-gguf export ollama ...`)
GROUPS: tuple[tuple[str, str, tuple[tuple[str, Callable], ...]], ...] = (
    ("export", "Hand a converted pair to another runtime: an Ollama Modelfile, or LM Studio's models folder.",
     (("ollama", commands_export.ollama), ("lmstudio", commands_export.lmstudio))),
)

# `llava-gguf --help`: the pipeline's order, the exports after the front ends that run the model
HELP_ORDER = ("convert", "quantize", "imatrix", "quality", "inspect", "repair", "verify", "chat", "serve", "batch",
              "export", "doctor", "demo")


def _register() -> None:
    for name, fn in COMMANDS:
        app.command(name)(guarded(fn))
    for name, help_text, commands in GROUPS:
        group = typer.Typer(no_args_is_help=True, help=help_text)
        for sub, fn in commands:
            group.command(sub)(guarded(fn))
        app.add_typer(group, name=name)


_register()


def _quiet_libraries() -> None:
    """gguf-py and transformers log warnings about checkpoint quirks they handle; the CLI's output
    stays ours (llama.cpp's own logs are hidden the same way unless --verbose)."""
    if "--verbose" in sys.argv[1:]:
        return
    for name in ("gguf", "transformers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _one_line_warnings() -> None:
    """Every warning the CLI shows is one line on stderr: ours as `warning: <text>`, anything a library
    raises through Python's warnings as `warning: <Category>: <text>` (no source line, no path)."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        text = " ".join(str(message).split())
        if not issubclass(category, LlavaGgufWarning):
            text = f"{category.__name__}: {text}"
        try:
            sys.stderr.write(f"warning: {text}\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass

    warnings.showwarning = show


def main() -> None:
    _quiet_libraries()
    _one_line_warnings()
    try:
        rv = app(standalone_mode=False)
    except click_exceptions.NoArgsIsHelpError:
        raise SystemExit(0) from None  # the help has been shown
    except click_exceptions.UsageError as e:
        # click's usage errors span several lines; ours are one, like every other error
        where = f" (see {e.ctx.command_path} --help)" if e.ctx else ""
        typer.echo(f"error: {' '.join(e.format_message().split())}{where}", err=True)
        raise SystemExit(2) from None
    except click_exceptions.ClickException as e:
        typer.echo(f"error: {' '.join(e.format_message().split())}", err=True)
        raise SystemExit(e.exit_code) from None
    except (KeyboardInterrupt, Abort):
        typer.echo("error: interrupted", err=True)
        rv = 130
    if rv == 130:
        # Interrupted: outputs are already cleaned up. Exit now rather than wait for native work that
        # cannot be stopped (a quantizer thread) to finish.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    raise SystemExit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
