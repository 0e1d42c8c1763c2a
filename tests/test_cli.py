import subprocess
import sys

from pocketrlhf import __version__
from pocketrlhf.cli import main


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "sft" in out and "env" in out and "demo" in out


def test_unknown_command_suggests(capsys):
    assert main(["stf"]) == 2
    assert "unknown command 'stf' (did you mean 'sft'?)" in capsys.readouterr().err


def test_command_help_lists_options(capsys):
    assert main(["sft", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--quantization" in out and "none|8bit|4bit" in out and "--resume" in out


def test_unknown_option_is_one_line(capsys):
    assert main(["sft", "--lerning-rate", "1e-4"]) == 2
    assert capsys.readouterr().err == "error: unknown option --lerning-rate (did you mean --learning-rate?)\n"


def test_env_reports_versions_and_bitsandbytes_kernels(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "transformers" in out and "peft" in out
    assert "bitsandbytes 8bit on cpu: ok" in out and "bitsandbytes 4bit-nf4 on cpu: ok" in out


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "pocketrlhf", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == __version__
