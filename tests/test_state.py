"""Save and resume: safetensors + a checksummed manifest; resumed answers equal uninterrupted ones."""

import json
import os
import re
import signal
import subprocess
import time

import pytest
import torch

from emloc import EMLoCSettings, StreamContext
from emloc.tiny import tiny_qwen2_vl
from stream.sources import write_video
from stream.state import StateError, load_state, save_state
from stream.synthetic import make_video

from .reference import random_frames
from .test_cli import console_script

SETTINGS = EMLoCSettings(layer_group_size=2, delta=0.05, ratios=(0.1, 0.5, 1.0), chunk_frames=8, token_budget=120)
QUESTION = "what colour was the triangle ?"


def folded(model, tokenizer, chunks, settings=SETTINGS):
    context = StreamContext(model, tokenizer, settings)
    for k in chunks:
        context.fold(random_frames(8, seed=k), questions=["how many times did a star appear ?"] if k == 1 else (),
                     timestamps=[4.0 * k + 0.5 * i for i in range(8)])
    return context


def test_resumed_stream_answers_as_if_never_stopped(qwen2_vl, tokenizer, tmp_path):
    straight = folded(qwen2_vl, tokenizer, range(5))
    first = folded(qwen2_vl, tokenizer, range(3))
    save_state(tmp_path, first, {"last_time": 11.5})
    resumed = StreamContext(qwen2_vl, tokenizer, SETTINGS)
    assert load_state(tmp_path, resumed) == {"last_time": 11.5}
    for k in (3, 4):
        resumed.fold(random_frames(8, seed=k), timestamps=[4.0 * k + 0.5 * i for i in range(8)])
    a = straight.answer(QUESTION, max_new_tokens=4, return_logits=True)
    b = resumed.answer(QUESTION, max_new_tokens=4, return_logits=True)
    assert a.token_ids == b.token_ids and a.time_span == b.time_span
    assert torch.equal(a.prompt_logits, b.prompt_logits)
    assert resumed.cache.lengths() == straight.cache.lengths()
    for x, y in zip(straight.cache.layers, resumed.cache.layers):
        assert torch.equal(x.keys, y.keys) and torch.equal(x.committed_origins(), y.committed_origins())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache-1.safetensors", "manifest.json"]


def test_bad_states_are_refused(qwen2_vl, tokenizer, tmp_path):
    save_state(tmp_path, folded(qwen2_vl, tokenizer, range(2)), {})
    save_state(tmp_path, folded(qwen2_vl, tokenizer, range(2)), {})  # a second save replaces the first
    cache = tmp_path / "cache-2.safetensors"
    assert not (tmp_path / "cache-1.safetensors").exists()

    other_weights = tiny_qwen2_vl(tokenizer, init_std=0.15, seed=2)
    with pytest.raises(StateError, match="another model.*weights_sha256"):
        load_state(tmp_path, StreamContext(other_weights, tokenizer, SETTINGS))
    other = EMLoCSettings(layer_group_size=2, delta=0.02, ratios=(0.1, 0.5, 1.0), chunk_frames=8, token_budget=120)
    with pytest.raises(StateError, match="other settings.*delta"):
        load_state(tmp_path, StreamContext(qwen2_vl, tokenizer, other))

    data = bytearray(cache.read_bytes())
    data[-5] ^= 0xFF  # tampered, same size
    cache.write_bytes(bytes(data))
    with pytest.raises(StateError, match="truncated or modified"):
        load_state(tmp_path, StreamContext(qwen2_vl, tokenizer, SETTINGS))
    cache.write_bytes(bytes(data[:100]))  # truncated
    with pytest.raises(StateError, match="truncated or modified"):
        load_state(tmp_path, StreamContext(qwen2_vl, tokenizer, SETTINGS))
    (tmp_path / "manifest.json").write_text('{"format": "emloc-stream-state/1", "cache": ')
    with pytest.raises(StateError, match="not valid JSON"):
        load_state(tmp_path, StreamContext(qwen2_vl, tokenizer, SETTINGS))
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "pickle"}))
    with pytest.raises(StateError, match="not an emloc-stream state"):
        load_state(tmp_path, StreamContext(qwen2_vl, tokenizer, SETTINGS))


def answers(stdout: str) -> list[str]:
    return re.findall(r"^  A: (.*)$", stdout, flags=re.M)


def test_cli_run_killed_and_resumed_gives_the_same_answers(tmp_path):
    video = make_video(3_300_000, frames=192)
    path = write_video(tmp_path / "clip.mp4", video.frames, video.fps)
    config = tmp_path / "c.yaml"
    config.write_text("emloc:\n  preset: reference_code\n  chunk_frames: 16\n")
    args = [console_script(), "run", str(path), "--model", "builtin:random", "--config", str(config),
            "--ask", "what colour was the triangle ?", "--ask", "what digit is on screen now ?",
            "--max-new-tokens", "3"]
    env = {"HF_HUB_OFFLINE": "1", "PATH": os.environ["PATH"], "OMP_NUM_THREADS": "1"}
    straight = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert straight.returncode == 0, straight.stderr

    state = tmp_path / "state"
    first = subprocess.Popen(args + ["--state", str(state)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env)
    deadline = time.time() + 240
    while time.time() < deadline and first.poll() is None:
        manifest = state / "manifest.json"
        if manifest.exists() and json.loads(manifest.read_text())["serial"] >= 3:
            break
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert first.returncode == -signal.SIGKILL, "the run was meant to be interrupted mid-video"
    resumed = subprocess.run(args + ["--state", str(state)], capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and resumed.stdout.count("chunk ") < straight.stdout.count("chunk ")
    assert answers(resumed.stdout) == answers(straight.stdout) and len(answers(straight.stdout)) == 2

    other = subprocess.run(args[:1] + ["run", str(path), "--state", str(state), "--ask", "what ?"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert other.returncode == 2 and "another model" in other.stderr
