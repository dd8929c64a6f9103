"""The `emloc-stream` console script, run for real in a subprocess, and its config files."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from emloc import EMLoCSettings
from stream.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def console_script() -> str:
    beside = Path(sys.executable).with_name("emloc-stream")
    found = str(beside) if beside.exists() else shutil.which("emloc-stream")
    assert found, "the emloc-stream console script is not installed (pip install -e .)"
    return found


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([console_script(), *args], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


def test_demo_folds_and_answers():
    result = run_cli("demo", "--model", "builtin:random", "--config", "configs/reference_code.yaml", "--frames",
                     "96", "--ask", "what colour was the square ?", "--budget", "40", "--max-new-tokens", "3")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "28 layers; layer groups of 7, delta 0.05" in out and "budget 40/layer" in out
    assert out.count("chunk ") == 2 and "[   96/96 frames]" in out
    assert "Q: what colour was the square ?" in out and "tokens/layer" in out


def test_default_demo_prints_answers_next_to_ground_truth(tmp_path):
    """The README's main command: the shipped model on a generated video, written and decoded."""
    video = tmp_path / "demo.mp4"
    result = run_cli("demo", "--frames", "128", "--save-video", str(video))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "shipped, trained here" in out and "4 layers; layer groups of 2, delta 0.04" in out
    assert out.count("(expected: ") == 4 and "answers match the ground truth" in out
    assert out.count("observer=question") == 2  # the questions guide pruning unless --probe
    assert video.stat().st_size > 0


def test_run_answers_about_a_video_file(tmp_path):
    from stream.sources import write_video
    from stream.synthetic import make_video

    video = make_video(3_100_000, frames=96)
    path = write_video(tmp_path / "clip.mp4", video.frames, video.fps)
    result = run_cli("run", str(path), "--ask", video.question("state").text, "--query-aware")
    assert result.returncode == 0, result.stderr
    assert "clip.mp4 [0.0-47.5s] Q: what digit is on screen now ?" in result.stdout
    assert result.stdout.count("chunk ") == 2


def test_run_names_a_broken_file(tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 1000)
    result = run_cli("run", str(broken), "--ask", "what digit is on screen now ?")
    assert result.returncode == 2 and "broken.mp4" in result.stderr


def test_bad_config_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("emloc:\n  preset: videomme_online\n  group_size: 7\n")
    result = run_cli("demo", "--config", str(bad))
    assert result.returncode == 2
    assert f"{bad}" in result.stderr and "group_size" in result.stderr


def test_shipped_configs_load_and_validate(tmp_path):
    online = load_config(ROOT / "configs" / "videomme_online.yaml")
    assert online.emloc == EMLoCSettings(layer_group_size=14, delta=0.04, ratios=(0.02, 0.1, 0.5, 1.0),
                                         chunk_frames=64, scorer="observer", probe_answer_tokens=0,
                                         merge_dropped=False)  # the paper's method, exactly
    assert load_config(ROOT / "configs" / "query_agnostic.yaml").emloc == EMLoCSettings()  # one default
    assert online.model.max_frame_pixels == 336 * 336
    assert load_config(ROOT / "configs" / "reference_code.yaml").emloc.layer_group_size == 7
    site = load_config(ROOT / "configs" / "site.example.yaml")
    assert [s.id for s in site.streams] == ["gate", "yard"] and site.emloc.token_budget == 4096
    override = tmp_path / "o.yaml"
    override.write_text("emloc:\n  preset: reference_code\n  delta: 0.02\n  token_budget: 2048\n")
    assert (load_config(override).emloc.delta, load_config(override).emloc.token_budget) == (0.02, 2048)
    for text, message in [("model:\n  fps: 0\n", "fps must be > 0"), ("cameras: []\n", "unknown key"),
                          ("emloc:\n  ratios: [0.5, 0.1]\n", "ascending"), ("- 1\n", "mapping"),
                          ("emloc: [\n", "not valid YAML")]:
        override.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(override)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")


def test_stream_configs_are_validated(tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text("mqtt:\n  host: broker.local\n  port: 8883\n  tls: true\n  username: cam\n"
                    "streams:\n  - id: gate\n    source: rtsp://10.0.0.5/stream\n    standing: ['is anyone there ?']\n"
                    "    every: 2\n  - id: yard\n    source: /dev/video0\n    format: v4l2\n")
    config = load_config(site)
    assert [s.id for s in config.streams] == ["gate", "yard"] and config.streams[0].standing == ("is anyone there ?",)
    assert config.mqtt.port == 8883 and config.mqtt.tls
    for text, message in [
        ("streams:\n  - id: a\n    source: x\n    colour: red\n", "unknown key"),
        ("streams:\n  - id: a\n", "needs an id and a source"),
        ("streams:\n  - id: a\n    source: x\n  - id: a\n    source: y\n", "unique"),
        ("streams:\n  - id: a/b\n    source: x\n", "stream id"),
        ("streams:\n  - id: a\n    source: x\n    every: 0\n", "every must be"),
        ("mqtt:\n  port: 99999\n", "mqtt.port"),
        ("mqtt:\n  hostname: x\n", "unknown key"),
    ]:
        site.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(site)
    empty = tmp_path / "empty.yaml"
    empty.write_text("emloc:\n  preset: videomme_online\n")
    result = run_cli("serve", "--config", str(empty))
    assert result.returncode == 2 and "no streams" in result.stderr
