"""The `emloc-stream` console script, run for real in a subprocess, and its config files."""

import os
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


def cli_env() -> dict:
    """A bare environment, offline; PYTHONPATH kept so that a worktree on it is the code the script runs."""
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    for kept in ("PYTHONPATH", "OMP_NUM_THREADS"):  # OMP_NUM_THREADS: tests/conftest.py says why
        if kept in os.environ:
            env[kept] = os.environ[kept]
    return env


def run_cli(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([console_script(), *args], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env=cli_env())


@pytest.mark.slow
def test_demo_folds_and_answers():
    result = run_cli("demo", "--model", "builtin:random", "--config", "configs/reference_code.yaml", "--frames",
                     "96", "--ask", "what colour was the square ?", "--budget", "40", "--max-new-tokens", "3")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "28 layers; layer groups of 7, delta 0.05" in out and "budget 40/layer" in out
    assert out.count("chunk ") == 2 and "[   96/96 frames]" in out
    assert "Q: what colour was the square ?" in out and "tokens/layer" in out


@pytest.mark.slow
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


@pytest.mark.slow
def test_the_query_aware_choice_has_one_spelling():
    """--query-aware/--no-query-aware on demo, run and batch; demo's old --probe still works, saying so."""
    new = run_cli("demo", "--frames", "32", "--no-query-aware")
    old = run_cli("demo", "--frames", "32", "--probe")
    assert new.returncode == old.returncode == 0, new.stderr + old.stderr
    assert "observer=probe" in new.stdout and "observer=question" not in new.stdout
    assert "--probe is now spelled --no-query-aware" in old.stderr and "--probe" not in new.stderr
    answers = [[line for line in r.stdout.splitlines() if "(expected: " in line] for r in (new, old)]
    assert len(answers[0]) == 4 and answers[0] == answers[1]
    for command in ("demo", "run", "batch"):
        text = run_cli(command, "--help").stdout
        assert "--query-aware, --no-query-aware" in text, command


@pytest.mark.slow
def test_run_answers_about_a_video_file(tmp_path):
    from stream.sources import write_video
    from stream.suites.synthetic import make_video

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
    assert load_config(ROOT / "configs" / "default.yaml").emloc == EMLoCSettings()  # one default
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


def one_line_error(result, *needles: str) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("emloc-stream: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def main_in_process(capsys, *args: str):
    """The command run in this process (the errors below come before the model is loaded)."""
    from types import SimpleNamespace

    from stream.cli import main

    code = main(list(args))
    out, err = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


def test_bad_model_or_state_refused_in_one_line_before_any_work(tmp_path, capsys):
    """Nothing is loaded, decoded or folded (no model label, no progress) before these are found."""
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00" * 100)  # never opened: the refusals come first
    ask = ("--ask", "what digit is on screen now ?")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    if os.geteuid() == 0:  # root writes anywhere a mode allows; /sys refuses even root
        unwritable = Path("/sys/emloc-state")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        unwritable = locked / "state"
    cases = [
        (("run", str(clip), *ask, "--model", str(tmp_path / "missing-model")), ["missing-model: no such folder"]),
        (("run", str(clip), *ask, "--model", str(a_file)), ["notes.txt: a file"]),
        (("run", str(clip), *ask, "--model", str(tmp_path)), ["no config.json"]),
        (("run", str(clip), *ask, "--state", str(a_file)), ["--state", "notes.txt: a file, not a folder"]),
        (("run", str(clip), *ask, "--state", str(unwritable)), ["--state", "cannot write there"]),
        (("live", "udp://127.0.0.1:9", "--state", str(a_file)), ["a file, not a folder"]),
        (("live", "udp://127.0.0.1:9", "--model", "./missing"), ["./missing: no such folder"]),
    ]
    for args, needles in cases:
        result = main_in_process(capsys, *args)
        one_line_error(result, *needles)
        assert result.stdout == "", result.stdout


def test_run_on_a_folder_of_videos_points_to_batch(tmp_path, capsys):
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "a.mp4").write_bytes(b"\x00" * 100)
    one_line_error(main_in_process(capsys, "run", str(tmp_path / "videos"), "--ask", "what ?"),
                   "use `batch` for a folder of videos")
    from stream.commands.run import _check_folder

    (tmp_path / "videos" / "frame_0001.png").write_bytes(b"")  # with images it is a video of images
    _check_folder(tmp_path / "videos")


@pytest.mark.slow
def test_ctrl_c_during_run_saves_state_and_says_so_in_one_line(tmp_path):
    import signal

    from stream.sources import write_video
    from stream.suites.synthetic import make_video

    video = make_video(3_100_002, frames=256)
    clip = write_video(tmp_path / "clip.mp4", video.frames, video.fps)
    state = tmp_path / "state"
    run = subprocess.Popen([console_script(), "run", str(clip), "--ask", "what digit is on screen now ?",
                            "--state", str(state)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           cwd=ROOT, env=cli_env())
    try:
        for line in run.stdout:  # the first chunk folded: interrupt while the next one folds
            if "frames" in line and "chunk 0:" in line:
                break
        run.send_signal(signal.SIGINT)
        out, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("emloc-stream run: interrupted: ") and f"state saved in {state}" in lines[0], err
    assert (state / "manifest.json").exists()
    import json

    assert json.loads((state / "manifest.json").read_text())["stream"]["last_time"] >= 31.5


def test_batch_questions_file_with_bad_lines_is_refused_listing_each(tmp_path, capsys):
    (tmp_path / "v.mp4").write_bytes(b"\x00" * 100)  # never opened: the file is refused first
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"id": "a", "question": "what digit is on screen now ?"}\n{broken\n\n'
                         '{"id": "a", "question": "again ?"}\n{"question": "x", "colour": 1}\n'
                         '{"id": "b", "question": "x", "at": -1}\n[1]\n')
    result = main_in_process(capsys, "batch", str(tmp_path / "v.mp4"), "--questions", str(questions), "--out",
                             str(tmp_path / "o"))
    assert result.returncode == 2 and result.stdout == "", result.stdout
    err = result.stderr
    assert "5 bad line(s), nothing was run" in err
    for number, why in [(2, "not JSON: Expecting property name"), (4, "duplicate id 'a'"), (5, "unknown field"),
                        (6, "'at' must be"), (7, "a question must be a JSON object, got list")]:
        assert f"line {number}: {why}" in err, err
    assert "line 1:" not in err and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_batch_ask_goes_to_every_video_and_unknown_videos_are_reported(tmp_path):
    import json

    from stream.sources import write_video
    from stream.suites.synthetic import make_video

    folder = tmp_path / "videos"
    for seed in (3_100_004, 3_100_005):
        video = make_video(seed, frames=64)
        write_video(folder / f"v{seed}.mp4", video.frames, video.fps)
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"id": "only", "question": "what colour was the triangle ?", "video": "v3100004.mp4"}\n'
                         '{"id": "lost", "question": "what colour was the triangle ?", "video": "v9.mp4"}\n')
    out = tmp_path / "answers.jsonl"
    result = run_cli("batch", str(folder), "--questions", str(questions), "--ask", "what digit is on screen now ?",
                     "--out", str(out), "--max-new-tokens", "2")
    assert result.returncode == 0, result.stderr
    assert "question 'lost' names video 'v9.mp4', which is not in this batch; not asked" in result.stderr
    pairs = sorted((Path(a["stream_id"]).name, a["question_id"]) for a in map(json.loads, out.read_text().splitlines()))
    assert pairs == [("v3100004.mp4", "ask1"), ("v3100004.mp4", "only"), ("v3100005.mp4", "ask1")]
    assert "[1/2] " in result.stdout and "64 frames, 100%, 1 chunks folded" in result.stdout  # within a video
    again = run_cli("batch", str(folder), "--questions", str(questions), "--ask", "what digit is on screen now ?",
                    "--out", str(out))
    assert again.stdout.count("already answered, skipped") == 2


def test_every_option_of_every_command_is_documented(capsys):
    from stream.cli import main

    for command in ("demo", "run", "batch", "live", "serve"):
        with pytest.raises(SystemExit) as exit:
            main([command, "--help"])
        assert exit.value.code == 0
        options = capsys.readouterr().out.split("options:")[1]
        entries = [e for e in options.split("\n  -") if e.strip()]
        for entry in entries:
            name = entry.split()[0]
            if name.startswith("h,") or name == "-help":
                continue
            words = entry.replace("\n", " ").split()
            assert len(words) > 2, f"{command} {name}: no help text"


def test_every_config_binds_to_the_shipped_model_or_names_the_mismatch():
    """Configs in configs/: those for the shipped model bind to it; those for Qwen2-VL-7B's 28 layers fail
    against it in one line naming the setting, and bind to 28 layers."""
    from emloc import SettingsError
    from stream.engine import DEFAULT_MODEL, build_model

    works, for_7b = [], []
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        config = load_config(path)
        try:
            build_model(config, str(DEFAULT_MODEL))
            works.append(path.name)
        except SettingsError as error:
            assert "layer_group_size" in str(error) and "4 decoder layers" in str(error)
            config.emloc.for_model(28, 2)
            for_7b.append(path.name)
    assert {"site.local.yaml", "layer_wise.yaml", "default.yaml", "site.example.yaml"} <= set(works)
    assert {"videomme_online.yaml", "reference_code.yaml"} == set(for_7b)  # the paper's presets: 14 and 7 layers


@pytest.mark.slow
def test_local_site_config_runs_as_is(tmp_path):
    result = run_cli("serve", "--config", str(ROOT / "configs" / "site.local.yaml"), "--duration", "2",
                     "--status-every", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "stopped front:" in result.stdout and "stopped back:" in result.stdout
    assert (tmp_path / "state" / "front").is_dir() and "Traceback" not in result.stderr


@pytest.mark.slow
def test_batch_refuses_a_deadline_that_is_not_a_positive_number(tmp_path):
    for value, message in (("0", "must be more than 0 seconds"), ("-5", "must be more than 0 seconds"),
                           ("nan", "must be more than 0 seconds"), ("soon", "not a number of seconds")):
        result = run_cli("batch", str(tmp_path), "--out", str(tmp_path / "a.jsonl"), "--ray", "--revive-timeout", value)
        assert result.returncode == 2, result.stderr
        assert "--revive-timeout" in result.stderr and message in result.stderr, result.stderr
    result = run_cli("batch", str(tmp_path), "--out", str(tmp_path / "a.jsonl"), "--worker-timeout", "0")
    assert result.returncode == 2 and "--worker-timeout" in result.stderr, result.stderr
