"""Every input is checked before the model loads, in one line: a config (every section says an unknown
key the same way), a video file, an --http address, a state folder. "Before the model loads" is seen
in the output: a command prints its model's label right after loading it, and here it never does."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from stream.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
LOADED = " layers; layer groups of "  # in the label every command prints once its model has loaded


def cli(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stream", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd)


def refused_before_the_model(result: subprocess.CompletedProcess, *messages: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert LOADED not in result.stdout, f"the model loaded first: {result.stdout}"
    assert "Traceback" not in result.stderr, result.stderr
    error = result.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("emloc-stream: error: "), result.stderr
    for message in messages:
        assert message in error[0], result.stderr


@pytest.mark.parametrize("section, text", [
    ("emloc", "emloc:\n  token_buget: 5\n"),
    ("emloc", "emloc:\n  preset: videomme_online\n  token_buget: 5\n"),  # over a preset as well
    ("model", "model:\n  token_buget: 5\n"),
    ("mqtt", "mqtt:\n  token_buget: 5\n"),
    ("streams[0]", "streams:\n  - id: a\n    source: x\n    token_buget: 5\n"),
    ("config", "token_buget: 5\n"),
])
def test_every_section_names_an_unknown_key_the_same_way(tmp_path, section, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value).startswith(f"{path}: unknown key(s) ['token_buget'] in {section}; known keys are [")


def test_a_preset_names_an_unknown_setting_as_from_dict_does():
    """The Python API (and lmms-eval's model_args): a preset with an unknown override is named, not a TypeError."""
    from emloc import EMLoCSettings, SettingsError, preset

    for build in (lambda: preset("videomme_online", token_buget=5),
                  lambda: EMLoCSettings.from_dict({"token_buget": 5})):
        with pytest.raises(SettingsError, match=r"unknown EMLoC setting\(s\) \['token_buget'\]; known settings are"):
            build()


def test_a_config_section_of_the_wrong_kind_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    for text, message in [("emloc: [1]\n", "emloc must be a mapping"), ("model: 3\n", "model must be a mapping"),
                          ("model:\n  fps: fast\n", "model.fps must be > 0, got fast"),
                          ("emloc:\n  preset: [videomme_online]\n", r"unknown preset \['videomme_online'\]"),
                          ("emloc:\n  preset: videomme_online\n  ratios: fast\n", "ratios must be a list of numbers"),
                          ("emloc:\n  ratios: [0.1, fast]\n", "ratios must be a list of numbers")]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(path)


@pytest.mark.slow  # the CLI in a subprocess
def test_a_config_typo_is_refused_before_the_model(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("emloc:\n  token_buget: 5\n")
    result = cli("demo", "--config", str(path))
    refused_before_the_model(result, "unknown key(s) ['token_buget'] in emloc; known keys are [", "'token_budget'")


@pytest.mark.slow  # the CLI in a subprocess
def test_an_unreadable_video_is_refused_before_the_model(tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 1000)
    refused_before_the_model(cli("run", str(broken), "--ask", "what ?"), f"{broken}: cannot decode video")
    empty = tmp_path / "images"
    empty.mkdir()
    (empty / "a.png").write_bytes(b"not a png")
    refused_before_the_model(cli("run", str(empty), "--ask", "what ?"), "a.png: cannot read image")


@pytest.mark.slow  # the CLI in a subprocess
def test_a_taken_http_port_is_refused_before_the_model(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        message = f"the HTTP server could not start on 127.0.0.1:{port}: Address already in use"
        refused_before_the_model(cli("serve", "--http", f"127.0.0.1:{port}", cwd=tmp_path), message)
        refused_before_the_model(cli("live", "udp://127.0.0.1:5000", "--http", f"127.0.0.1:{port}", cwd=tmp_path),
                                 message)


@pytest.mark.slow  # the CLI in a subprocess
def test_a_damaged_state_is_refused_before_the_model(tmp_path):
    from stream.sources import write_video
    from stream.suites.synthetic import make_video

    video = write_video(tmp_path / "v.mp4", make_video(seed=1, frames=16).frames, fps=2.0)
    state = tmp_path / "state"
    state.mkdir()
    (state / "manifest.json").write_text("{not json")
    refused_before_the_model(cli("run", str(video), "--ask", "what ?", "--state", str(state)),
                             "the state manifest is not valid JSON")
    (state / "manifest.json").write_text(json.dumps({"format": "emloc-stream-state/1"}))
    refused_before_the_model(cli("run", str(video), "--ask", "what ?", "--state", str(state)),
                             "from another version of emloc-stream")
    taken = tmp_path / "file"
    taken.write_text("x")
    refused_before_the_model(cli("run", str(video), "--ask", "what ?", "--state", str(taken)), "a file, not a folder")


@pytest.mark.slow  # the CLI in a subprocess
def test_an_answers_file_that_cannot_be_written_is_refused_before_the_model(tmp_path):
    """live --jsonl, a served stream's jsonl: and batch --out: a folder, or a path under a file."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    refused_before_the_model(cli("live", "udp://127.0.0.1:9", "--jsonl", str(tmp_path), cwd=tmp_path),
                             f"--jsonl {tmp_path}: a folder, not a file")
    refused_before_the_model(cli("live", "udp://127.0.0.1:9", "--jsonl", str(a_file / "a.jsonl"), cwd=tmp_path),
                             f"{a_file} is a file, not a folder")
    site = tmp_path / "site.yaml"
    site.write_text(f"streams:\n  - id: gate\n    source: udp://127.0.0.1:9\n    jsonl: {a_file / 'a.jsonl'}\n")
    refused_before_the_model(cli("serve", "--config", str(site), cwd=tmp_path), f"{a_file} is a file, not a folder")
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "a.mp4").write_bytes(b"\x00" * 100)
    refused_before_the_model(cli("batch", str(videos), "--ask", "what ?", "--out", str(a_file / "a.jsonl")),
                             f"--out {a_file / 'a.jsonl'}: {a_file} is a file, not a folder")
