"""cli/app.py: the commands `--help` lists, in order, and the guard that makes an expected failure or
Ctrl-C one line on stderr with a non-zero exit (no process started, no model loaded)."""
from __future__ import annotations

import pytest
import typer

from llava_gguf.cli.app import COMMANDS, app, guarded
from llava_gguf.errors import LlavaGgufError


def test_every_command_is_registered_in_order():
    names = [c.name for c in app.registered_commands]
    assert names == [name for name, _ in COMMANDS] == ["convert", "quantize", "imatrix", "quality", "inspect", "repair",
                                                       "verify", "chat", "serve", "batch", "doctor", "demo"]
    # the help text is the command function's docstring, kept through the guard
    assert all(c.callback.__doc__ and c.callback.__doc__ == fn.__doc__ for c, (_, fn) in zip(app.registered_commands,
                                                                                              COMMANDS))


def test_guard_makes_errors_one_line(capsys):
    def fails() -> None:
        raise LlavaGgufError("the file is cut", "convert again")

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(typer.Exit) as e:
        guarded(fails)()
    assert e.value.exit_code == 1 and capsys.readouterr().err == "error: the file is cut (convert again)\n"
    with pytest.raises(typer.Exit) as e:
        guarded(interrupted)()
    assert e.value.exit_code == 130 and capsys.readouterr().err == "error: interrupted\n"
    assert guarded(lambda x: x + 1)(1) == 2
