"""`emloc-stream --help`, a command's --help and a mistyped flag answer without importing torch or
transformers (seconds each): heavy modules are imported where a command needs them, not to parse
its arguments. Checked on what Python imports (-X importtime), not on a time."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "ray", "fastapi", "uvicorn", "av", "decord", "safetensors")


def imported(*args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Runs `python -m stream ARGS` and returns it with the top-level packages it imported."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "stream", *args], capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    packages = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    return result, packages


@pytest.mark.parametrize("args, code, says", [
    (["--help"], 0, "usage: emloc-stream"),
    (["run", "--help"], 0, "--max-new-tokens"),
    (["serve", "--help"], 0, "--http"),
    (["run", "video.mp4", "--ask", "what ?", "--max-new-tokes", "3"], 2, "unrecognized arguments: --max-new-tokes"),
    (["rn"], 2, "invalid choice: 'rn'"),
])
def test_help_and_argument_errors_import_no_model_code(args, code, says):
    result, packages = imported(*args)
    assert result.returncode == code, result.stderr[-2000:]
    assert says in result.stdout + result.stderr
    assert "stream.cli" in result.stderr, "no import times recorded"
    assert not packages & set(HEAVY), f"{' '.join(args)} imported {sorted(packages & set(HEAVY))}"


def test_the_model_code_is_still_there_when_asked_for():
    """The lazy package exports every name it lists, each the object its module defines."""
    import emloc
    from emloc.context import StreamContext
    from emloc.task_pack import TaskPack

    assert emloc.StreamContext is StreamContext and emloc.TaskPack is TaskPack
    for name in emloc.__all__:
        assert getattr(emloc, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        emloc.Nothing  # noqa: B018
