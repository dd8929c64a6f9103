"""Running the product from a checkout leaves `git status` clean: the folders its configs write to are ignored."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_the_configs_output_folders_are_ignored_by_git():
    written = []
    for config in sorted(ROOT.glob("configs/*.yaml")):
        for stream in (yaml.safe_load(config.read_text()) or {}).get("streams") or []:
            written += [stream[key] for key in ("jsonl", "state") if stream.get(key)]
    assert written, "no config names an output file"
    for path in written:
        assert not Path(path).is_absolute()
        target = f"{path}/snapshot.safetensors" if not path.endswith(".jsonl") else path
        ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", target], cwd=ROOT)
        assert ignored.returncode == 0, f"{target} (written by serve from the repository root) is not ignored by git"
