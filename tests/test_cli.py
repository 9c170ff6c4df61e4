"""The ``mage`` parser is built from ``mage.commands``: every command is there, in order, and its help works."""

import pytest

from mage.cli import build_parser, main
from mage.commands import COMMANDS

NAMES = [
    "train-tokenizer",
    "reconstruct",
    "cache-tokens",
    "pretrain",
    "import-official",
    "generate",
    "inpaint",
    "outpaint",
    "embed",
    "probe",
    "finetune",
    "classify",
    "bench",
    "evaluate",
    "demo",
    "studio",
]


def test_every_command_is_registered_once_in_help_order():
    assert [c.name for c in COMMANDS] == NAMES
    assert all(callable(c.add_arguments) and callable(c.run) and c.help for c in COMMANDS)
    sub = next(a for a in build_parser()._actions if a.dest == "cmd")
    assert list(sub.choices) == NAMES
    assert [a.help for a in sub._choices_actions] == [c.help for c in COMMANDS]


@pytest.mark.parametrize("name", ["", *NAMES])
def test_help_of_every_command(name, capsys):
    with pytest.raises(SystemExit) as info:
        main([name, "--help"] if name else ["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: mage {name}".rstrip())


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out
