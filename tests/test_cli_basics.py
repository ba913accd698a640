"""The CLI skeleton: help for every command, stub behaviour, and run_command's exit codes."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import pytest
import typer
from typer.testing import CliRunner

from cli.common import Debug, Overrides, RecipePath, load_cli_recipe, print_config, run_command
from cli.main import app
from difflm.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
EVAL = [["eval", "gsm8k"], ["eval", "alpaca"], ["eval", "fluency"], ["eval", "report"]]
COMMANDS = [["tokenize"], ["sft"], ["r2ft"], ["merge"], *EVAL, ["generate"], ["sweep"], ["eval"]]


@pytest.fixture
def runner():
    return CliRunner()


def test_app_help(runner):
    result = runner.invoke(app, ["--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for name in ("tokenize", "sft", "r2ft", "generate", "eval"):
        assert name in result.output
    assert "Example" in result.output


def test_no_args_shows_help(runner):
    result = runner.invoke(app, [], terminal_width=200)
    assert "Usage" in result.output and "sft" in result.output


@pytest.mark.parametrize("cmd", COMMANDS, ids=" ".join)
def test_every_command_has_help_with_an_example(runner, cmd):
    result = runner.invoke(app, [*cmd, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "Example: difflm " + " ".join(cmd) in result.output


def test_usage_errors_exit_2(runner):
    assert runner.invoke(app, ["sft", "--bogus"]).exit_code == 2
    assert runner.invoke(app, ["nosuchcommand"]).exit_code == 2


def test_version(runner):
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("difflm ")


def test_python_m_cli_main_help():
    out = subprocess.run(
        [sys.executable, "-m", "cli.main", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "Usage: difflm" in out.stdout and "generate" in out.stdout


# --- run_command ------------------------------------------------------------------------------


def _raise(exc):
    def fn():
        raise exc

    return fn


def test_run_command_returns_the_value():
    assert run_command(lambda: 42) == 42


def test_config_error_exits_2_without_traceback(capsys):
    with pytest.raises(typer.Exit) as info:
        run_command(_raise(ConfigError("must be >= 1, got 0", key="decode.top_k")), debug=False)
    assert info.value.exit_code == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: decode.top_k: must be >= 1, got 0"


def test_other_errors_exit_1_with_traceback_only_in_debug(capsys):
    with pytest.raises(typer.Exit) as info:
        run_command(_raise(RuntimeError("boom\nsecond line")), debug=False)
    assert info.value.exit_code == 1
    err = capsys.readouterr().err
    assert err.strip() == "error: RuntimeError: boom second line (rerun with --debug for the traceback)"
    assert "Traceback" not in err

    with pytest.raises(typer.Exit) as info:
        run_command(_raise(RuntimeError("boom")), debug=True)
    assert info.value.exit_code == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in fn" in err
    assert err.strip().splitlines()[-1] == "error: RuntimeError: boom"


def test_interrupt_exits_130(capsys):
    with pytest.raises(typer.Exit) as info:
        run_command(_raise(KeyboardInterrupt()), debug=False)
    assert info.value.exit_code == 130
    assert capsys.readouterr().err.strip() == "error: interrupted; rerun the same command to resume"


def test_typer_exits_pass_through():
    with pytest.raises(typer.Exit) as info:
        run_command(_raise(typer.Exit(0)))
    assert info.value.exit_code == 0
    with pytest.raises(typer.BadParameter):
        run_command(_raise(typer.BadParameter("nope")))


# A command written the way cli/generate.py is: module level, because typer resolves the
# (postponed) annotations against the module's globals.


@dataclass
class DemoCfg:
    steps: int = 8
    name: str = "m"


demo = typer.Typer(pretty_exceptions_enable=False)


@demo.command()
def go(
    recipe: RecipePath = None,
    overrides: Overrides = None,
    steps: Annotated[Optional[int], typer.Option(help="Steps.")] = None,
    debug: Debug = False,
):
    """Demo. Example: demo --steps 3 name=x"""

    def work():
        cfg = load_cli_recipe(DemoCfg, recipe, overrides, {"steps": steps})
        print_config(cfg)
        if cfg.name == "crash":
            raise OSError("disk full")
        typer.echo(f"{cfg.steps} {cfg.name}")

    run_command(work, debug)


def test_a_command_built_with_the_helpers(tmp_path):
    """Options + recipe + overrides through run_command, end to end."""
    path = tmp_path / "r.yaml"
    path.write_text("steps: 4\nname: file\n")
    runner = CliRunner()
    result = runner.invoke(demo, ["--recipe", str(path), "--steps", "5", "name=cli"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "5 cli"
    assert "resolved config" in result.stderr and "steps: 5" in result.stderr

    result = runner.invoke(demo, ["stpes=3"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: unknown key 'stpes' (did you mean 'steps'?); allowed: steps, name"

    result = runner.invoke(demo, ["--recipe", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "recipe file not found" in result.stderr

    result = runner.invoke(demo, ["name=crash"])
    assert result.exit_code == 1 and "error: OSError: disk full (rerun with --debug" in result.stderr
    result = runner.invoke(demo, ["name=crash", "--debug"])
    assert result.exit_code == 1 and "Traceback" in result.stderr


@pytest.mark.parametrize("cmd", ["generate", "tokenize", "sft", "r2ft", "merge"])
def test_pipeline_commands_take_a_recipe_and_key_value_overrides(runner, cmd):
    result = runner.invoke(app, [cmd, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    # the option itself (the help's example also names --recipe)
    assert any("--recipe" in line and "YAML recipe file" in line for line in result.output.splitlines())
    assert "[KEY=VALUE]..." in result.output  # the usage line: overrides as trailing arguments
    assert "Recipe overrides" in result.output


def test_generate_declares_one_option_per_decode_field_from_its_metadata(runner):
    import dataclasses

    from difflm.decoding.config import DecodeConfig

    result = runner.invoke(app, ["generate", "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for f in dataclasses.fields(DecodeConfig):
        flag = "--decode" if f.name == "method" else "--" + f.name.replace("_", "-")
        line = next((ln for ln in lines if ln.lstrip("│ ").startswith(f"{flag} ")), None)  # its row in a panel
        assert line is not None, flag
        assert f.metadata["help"] in line, (flag, line)  # the help comes from the field
        for c in f.metadata.get("choices", ()):
            assert c is None or str(c) in line, (flag, c)
    assert any("--eos-fill" in ln and "--no-eos-fill" in ln for ln in lines)


def test_building_the_cli_does_not_import_torch():
    # the decoding options are made from DecodeConfig (whose package imports torch) only when `generate`
    # is parsed or shown: `difflm --help` and the other commands stay fast
    code = (
        "import sys; from typer.main import get_command; import cli.main; "
        "get_command(cli.main.app); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
