"""The ``reparam`` command: usage errors (exit 2, the subcommand's own usage), validation, plain-text help."""

from __future__ import annotations

import argparse
import re

import pytest

from reparam.cli import COMMANDS, build_parser, main


def _run(argv, capsys) -> tuple[int, str, str]:
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own errors and --help
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    found = {}
    for name in COMMANDS:
        parser = build_parser(name)
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        found[name] = action.choices[name]
    return found


def test_no_arguments_prints_the_usage_and_fails(capsys):
    rc, out, err = _run([], capsys)
    assert rc == 2 and out == ""
    assert err.startswith("usage: reparam") and all(name in err for name in COMMANDS)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_unknown_flag_shows_the_subcommands_usage(name, capsys):
    argv = {"demo": ["demo"], "onnx": ["onnx", "in.onnx", "-o", "out.onnx"], "profile": ["profile", "all"]}[name]
    rc, out, err = _run([*argv, "--no-such-flag"], capsys)
    assert rc == 2 and out == ""
    assert err.startswith(f"usage: reparam {name} ")
    assert err.splitlines()[-1] == f"reparam {name}: error: unrecognized arguments: --no-such-flag"


def test_unknown_command(capsys):
    rc, _, err = _run(["nope"], capsys)
    assert rc == 2 and "invalid choice: 'nope'" in err


@pytest.mark.parametrize(("argv", "message"), [
    (["--repeats", "0"], "argument --repeats: expected a positive integer, got 0"),
    (["--repeats", "-3"], "argument --repeats: expected a positive integer, got -3"),
    (["--repeats", "x"], "argument --repeats: expected a positive integer, got 'x'"),
    (["--train-steps", "-1"], "argument --train-steps: expected a non-negative integer, got -1"),
    (["--image-size", "0"], "argument --image-size: expected a positive integer, got 0"),
    (["--model", "no_such_model"], "unknown model 'no_such_model'; choose one of ghostnet_0_5x, "),
])
def test_demo_validates_its_arguments(argv, message, capsys, tmp_path):
    rc, out, err = _run(["demo", *argv, "--out", str(tmp_path / "out")], capsys)
    assert rc == 2 and out == "" and "Traceback" not in err
    assert err.startswith("usage: reparam demo ")
    assert err.splitlines()[-1].startswith(f"reparam demo: error: {message}")
    assert not (tmp_path / "out").exists()


def test_demo_out_must_be_a_directory(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    rc, _, err = _run(["demo", "--out", str(tmp_path / "file")], capsys)
    assert rc == 2 and err.splitlines()[-1].endswith("exists and is not a directory")


@pytest.mark.parametrize(("argv", "message"), [
    (["profile"], "give model name(s), 'all', or --list"),
    (["profile", "all", "--input-size", "1", "2", "3", "4", "5"], "--input-size takes 2, 3 or 4 integers, got 5"),
    (["profile", "all", "--input-size", "0", "3"], "argument --input-size: expected a positive integer, got 0"),
    (["profile", "all", "--num-classes", "0"], "argument --num-classes: expected a positive integer, got 0"),
])
def test_profile_validates_its_arguments(argv, message, capsys):
    rc, out, err = _run(argv, capsys)
    assert rc == 2 and out == ""
    assert err.splitlines()[-1] == f"reparam profile: error: {message}"


def test_every_option_has_plain_text_help(capsys):
    for name, parser in _subparsers().items():
        for action in parser._actions:
            assert action.help, f"reparam {name} {action.option_strings or action.dest}: no help text"
        rc, out, _ = _run([name, "--help"], capsys)
        assert rc == 0
        for markup in ("``", ":func:", ":class:", ":mod:", ":meth:", ".. "):
            assert markup not in out, f"reparam {name} --help shows RST markup {markup!r}:\n{out}"
    rc, out, _ = _run(["--help"], capsys)
    assert rc == 0 and "``" not in out


def test_commands_named_in_help_texts_work(capsys):
    """A help text that points at a command (`reparam profile --list`) points at one that succeeds."""
    texts = [_run(["--help"], capsys)[1]] + [_run([name, "--help"], capsys)[1] for name in COMMANDS]
    named = {c for text in texts for c in re.findall(r"`(reparam [^`]+)`", " ".join(text.split()))}
    runnable = {c for c in named if not re.search(r"[A-Z]{3,}", c)}  # skip placeholders like COMMAND
    assert "reparam profile --list" in runnable
    for command in runnable:
        rc, _, err = _run(command.split()[1:], capsys)
        assert rc == 0, f"`{command}` (named in a help text) exits {rc}: {err}"


def test_version(capsys):
    rc, out, _ = _run(["--version"], capsys)
    assert rc == 0 and out.startswith("reparam 0.")
