"""cli/app.py: the commands `--help` lists, in order, and the guard that makes an expected failure or
Ctrl-C one line on stderr with a non-zero exit (no process started, no model loaded)."""
from __future__ import annotations

import pytest
import typer

from llava_gguf.cli.app import COMMANDS, GROUPS, HELP_ORDER, app, guarded
from llava_gguf.errors import LlavaGgufError


def test_every_command_is_registered_in_order():
    names = [c.name for c in app.registered_commands]
    assert names == [name for name, _ in COMMANDS] == ["convert", "quantize", "imatrix", "quality", "inspect", "repair",
                                                       "verify", "chat", "serve", "batch", "doctor", "demo"]
    # the help text is the command function's docstring, kept through the guard
    assert all(c.callback.__doc__ and c.callback.__doc__ == fn.__doc__ for c, (_, fn) in zip(app.registered_commands,
                                                                                              COMMANDS))


def test_help_lists_commands_and_groups_in_order():
    """`--help` lists the export group among the commands (typer alone would put groups last), and each
    group's commands keep their docstrings through the guard."""
    import typer.main

    group = typer.main.get_command(app)
    listed = group.list_commands(None)
    assert listed == list(HELP_ORDER) == ["convert", "quantize", "imatrix", "quality", "inspect", "repair", "verify",
                                          "chat", "serve", "batch", "export", "doctor", "demo"]
    assert [name for name, _, _ in GROUPS] == ["export"]
    export = group.commands["export"]
    assert export.list_commands(None) == ["ollama", "lmstudio"]
    for sub, fn in GROUPS[0][2]:
        assert export.commands[sub].callback.__doc__ == fn.__doc__


def test_group_commands_are_guarded(tmp_path):
    """An expected failure inside a group's command is one line and exit 1, like any command's."""
    from typer.testing import CliRunner

    r = CliRunner().invoke(app, ["export", "ollama", str(tmp_path)])
    assert r.exit_code == 1 and r.output.strip().startswith("error: no .gguf files in"), r.output


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
