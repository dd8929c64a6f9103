"""A non-editable install carries the shipped models: the wheel holds them, and the installed package
finds them and runs the demo with nothing of the source tree on its path."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from stream.models import CAMERA_MODEL, DEFAULT_MODEL, EXAMPLES_MODEL

ROOT = Path(__file__).resolve().parents[1]
LOADED_FILES = ["model.safetensors", "config.json", "generation_config.json", "preprocessor_config.json",
                "tokenizer.json", "tokenizer_config.json", "README.md"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """The wheel `pip wheel` builds from this checkout, and a folder it is installed into (pip --target).

    Built from a copy of the files git tracks or would track: an old build/ folder in the checkout
    could otherwise put modules that no longer exist into the wheel."""
    source = tmp_path_factory.mktemp("source")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(source)], check=True, cwd=out)
    wheel = next(out.glob("emloc_stream-*.whl"))
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, cwd=out)
    return wheel, target


def run_installed(target: Path, *args: str) -> subprocess.CompletedProcess:
    """Python with only the installed copy importable: the checkout is neither the working folder nor on the path."""
    env = {**os.environ, "PYTHONPATH": str(target), "PYTHONSAFEPATH": "1"}
    return subprocess.run([sys.executable, *args], cwd=target.parent, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_the_wheel_holds_every_shipped_model(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for model in (DEFAULT_MODEL, CAMERA_MODEL, EXAMPLES_MODEL):
        for name in LOADED_FILES:
            assert f"stream/models/{model.name}/{name}" in names
    assert not any(name.startswith("research/") or "/attempt-" in name for name in names)


@pytest.mark.slow
def test_the_installed_package_finds_its_models_and_runs_the_demo(installed):
    _, target = installed
    found = run_installed(target, "-c", "import stream, stream.models as m; print(stream.__file__); "
                          "print(m.DEFAULT_MODEL); print(m.CAMERA_MODEL); print(m.EXAMPLES_MODEL)")
    assert found.returncode == 0, found.stderr
    package, *models = found.stdout.split()
    assert Path(package).is_relative_to(target)
    for model in models:
        assert Path(model).is_relative_to(target) and (Path(model) / "model.safetensors").is_file()
    demo = run_installed(target, "-m", "stream", "demo", "--frames", "32")
    assert demo.returncode == 0, demo.stderr
    assert "4/4 answers match the ground truth" in demo.stdout
