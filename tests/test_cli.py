import subprocess
import sys

import pytest

from uqcit.cli import build_parser, main


@pytest.mark.parametrize("cmd", ["compress", "eval", "inspect", "fetch-data", "recipes"])
def test_every_command_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert "usage: uqcit " + cmd in capsys.readouterr().out


def test_inspect_of_a_foreign_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "uqcit_metadata.json" in capsys.readouterr().err


def test_unknown_recipe_is_a_clear_error(tmp_path, capsys):
    assert main(["compress", "--model", "tiny-llama", "--recipe", "nope", "--out", str(tmp_path / "p")]) == 2
    assert "no built-in recipe 'nope'" in capsys.readouterr().err


def test_recipes_lists_builtins(capsys):
    assert main(["recipes"]) == 0
    assert "uqcit-default" in capsys.readouterr().out


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "uqcit.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "compress" in out.stdout
    assert build_parser().prog == "uqcit"
