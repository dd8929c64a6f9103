"""Save and resume: safetensors + a checksummed manifest; resumed answers equal uninterrupted ones."""

import json
import os
import re
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from emloc import EMLoCSettings, StreamContext
from emloc.adapters import adapter_for
from emloc.integrity import CHECKSUM, json_sha256, seal
from emloc.tiny import tiny_qwen2_vl
from stream.config import StreamConfig
from stream.service import LiveStream
from stream.sources import write_video
from stream.state import StateError, load_state, save_state
from stream.suites.synthetic import make_video

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


@pytest.mark.slow
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
    with pytest.raises(StateError, match="cache-2.safetensors: truncated or modified after it was saved .its tensors "
                                         "do not match the checksum in its manifest.; refusing to resume from it"):
        load_state(tmp_path, StreamContext(qwen2_vl, tokenizer, SETTINGS))
    cache.write_bytes(bytes(data[:100]))  # truncated
    with pytest.raises(StateError, match="cache-2.safetensors: not a readable state: not a safetensors file, or "
                                         "truncated"):
        load_state(tmp_path, StreamContext(qwen2_vl, tokenizer, SETTINGS))
    (tmp_path / "manifest.json").write_text('{"format": "emloc-stream-state/1", "cache": ')
    with pytest.raises(StateError, match="not valid JSON"):
        load_state(tmp_path, StreamContext(qwen2_vl, tokenizer, SETTINGS))
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "emloc-stream-state/1", "cache": "x"}))
    with pytest.raises(StateError, match="another version of emloc-stream"):
        load_state(tmp_path, StreamContext(qwen2_vl, tokenizer, SETTINGS))
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "pickle"}))
    with pytest.raises(StateError, match="not an emloc-stream state"):
        load_state(tmp_path, StreamContext(qwen2_vl, tokenizer, SETTINGS))


def answers(stdout: str) -> list[str]:
    return re.findall(r"^  A: (.*)$", stdout, flags=re.M)


@pytest.mark.slow
def test_cli_run_killed_and_resumed_gives_the_same_answers(tmp_path):
    video = make_video(3_300_000, frames=192)
    path = write_video(tmp_path / "clip.mp4", video.frames, video.fps)
    config = tmp_path / "c.yaml"
    config.write_text("emloc:\n  preset: reference_code\n  chunk_frames: 16\n")
    args = [console_script(), "run", str(path), "--model", "builtin:random", "--config", str(config),
            "--ask", "what colour was the triangle ?", "--ask", "what digit is on screen now ?",
            "--max-new-tokens", "3"]
    env = {"HF_HUB_OFFLINE": "1", "PATH": os.environ["PATH"], "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
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


# --- tampering: each case the issue found, and a forger who recomputes every checksum ---------------------
@pytest.fixture(scope="module")
def pristine(qwen2_vl, tokenizer, tmp_path_factory):
    """One saved state (3 chunks) that each tampering test copies."""
    folder = tmp_path_factory.mktemp("pristine")
    save_state(folder, folded(qwen2_vl, tokenizer, range(3)), {"last_time": 11.5, "questions": []})
    return folder


def saved(pristine, folder):
    import shutil

    shutil.copytree(pristine, folder)
    return json.loads((folder / "manifest.json").read_text())


def rewrite(folder, manifest, tensors=None):
    """What a forger would do: change what they like, then recompute the cache's and the manifest's checksums."""
    if tensors is not None:
        save_file(tensors, str(folder / manifest["cache"]))
        manifest = seal(manifest, tensors)
    manifest[CHECKSUM] = json_sha256(manifest, CHECKSUM)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def refused(model, tokenizer, folder, match):
    with pytest.raises(StateError, match=match):
        load_state(folder, StreamContext(model, tokenizer, SETTINGS))


def as_previous_format(folder):
    """Rewrites the state in `folder` as format 3 wrote it, before emloc/integrity.py: the cache file's
    `bytes` and `sha256`, `manifest_sha256` over the rest, questions with `text` for their text."""
    import hashlib

    manifest = json.loads((folder / "manifest.json").read_text())
    manifest = {k: v for k, v in manifest.items() if k not in ("sha256", "tensors_sha256")}
    cache = folder / manifest["cache"]
    manifest.update(format="emloc-stream-state/3", bytes=cache.stat().st_size,
                    sha256=hashlib.sha256(cache.read_bytes()).hexdigest())
    for question in manifest["stream"].get("questions", []):
        question["text"] = question.pop("question")
    manifest["manifest_sha256"] = hashlib.sha256(json.dumps(manifest, sort_keys=True,
                                                            separators=(",", ":")).encode()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def test_a_state_of_the_previous_format_resumes_and_is_saved_again_in_the_current_one(qwen2_vl, tokenizer,
                                                                                       pristine, tmp_path):
    """Saved state is user data: a state written before emloc/integrity.py resumes (checked by the scheme it
    was written with), is saved again in the current one, and refuses the same edits with the same messages."""
    folder = tmp_path / "s"
    saved(pristine, folder)
    as_previous_format(folder)
    straight = folded(qwen2_vl, tokenizer, range(3))
    context = StreamContext(qwen2_vl, tokenizer, SETTINGS)
    assert load_state(folder, context) == {"last_time": 11.5, "questions": []}
    assert context.cache.lengths() == straight.cache.lengths() and context.chunks_folded == 3
    save_state(folder, context, {"last_time": 11.5})
    again = json.loads((folder / "manifest.json").read_text())
    assert again["format"] == "emloc-stream-state/4" and "manifest_sha256" not in again
    assert load_state(folder, StreamContext(qwen2_vl, tokenizer, SETTINGS)) == {"last_time": 11.5}

    manifest = as_previous_format(folder)
    manifest["context"]["chunks_folded"] = 1  # edited, checksum not recomputed
    (folder / "manifest.json").write_text(json.dumps(manifest))
    refused(qwen2_vl, tokenizer, folder, "manifest.json: the state's manifest was modified after it was saved "
                                         r"\(its checksum does not match\); refusing to resume from it")
    save_state(folder, context, {"last_time": 11.5})
    cache = folder / as_previous_format(folder)["cache"]
    data = bytearray(cache.read_bytes())
    data[-5] ^= 0xFF
    cache.write_bytes(bytes(data))
    refused(qwen2_vl, tokenizer, folder, f"{cache.name}: truncated or modified after it was saved "
                                         r"\(its tensors do not match the checksum in its manifest\)")


@pytest.mark.parametrize("field, value", [("last_time", 99.0), ("max_position", 7), ("chunks_folded", 1)])
def test_an_edited_manifest_is_named(qwen2_vl, tokenizer, pristine, tmp_path, field, value):
    tmp_path = tmp_path / "s"
    manifest = saved(pristine, tmp_path)
    section = manifest["stream"] if field == "last_time" else manifest["context"]
    section[field] = value
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    refused(qwen2_vl, tokenizer, tmp_path, "manifest.json: the state's manifest was modified after it was saved "
                                           r"\(its checksum does not match\); refusing to resume from it")


@pytest.mark.parametrize("field, value, match", [
    ("max_position", 5000, "says max_position = 5000 but the cache file .* was saved with"),
    ("tokens_seen", 10**6, "says tokens_seen = 1000000"),
    ("time_span", [0.0, 99.0], "last_time 11.5 is not the end of the folded video"),
    ("sink_tokens", 3, "says sink_tokens = 3"),
    ("temporal_halvings", 1, "says temporal_halvings = 1 but the cache file"),
    ("video_layout", "x", "video_layout must be a list of"),
    ("video_layout", [[0, 0, 1.5]], "video_layout must be a list of"),
    ("video_layout", [], "does not add up"),
    ("video_layout", [[9, 0, 12]], "does not add up"),  # wrong first origin, tokens per step
])
def test_fields_that_contradict_the_cache_are_refused_even_with_checksums_recomputed(
        qwen2_vl, tokenizer, pristine, tmp_path, field, value, match):
    tmp_path = tmp_path / "s"
    manifest = saved(pristine, tmp_path)
    manifest["context"][field] = value
    rewrite(tmp_path, manifest)
    refused(qwen2_vl, tokenizer, tmp_path, match)


def test_times_edited_in_both_places_of_the_manifest_are_refused(qwen2_vl, tokenizer, pristine, tmp_path):
    tmp_path = tmp_path / "s"
    manifest = saved(pristine, tmp_path)
    manifest["context"]["time_span"], manifest["stream"]["last_time"] = [0.0, 99.0], 99.0
    rewrite(tmp_path, manifest)
    refused(qwen2_vl, tokenizer, tmp_path, "times .* differ from the cache file's")


@pytest.mark.parametrize("edit, match", [
    (lambda t: t["layers.1.origins"][..., -1].add_(1000), "layer 1 holds tokens beyond"),
    (lambda t: t["layers.0.origins"][..., 0].fill_(9), "layer 0 lost its attention-sink tokens"),
    (lambda t: t["layers.2.origins"][..., -1].copy_(t["layers.2.origins"][..., -2]), "layer 2 holds a token twice"),
    (lambda t: t["layers.3.keys"][..., 0, 0].fill_(float("nan")), "not finite"),
    (lambda t: t.pop("layers.3.values"), "saved cache has no 'layers.3.values'"),
    (lambda t: t.update(extra=torch.zeros(2)), "unexpected tensors"),
    (lambda t: t["state.counters"].__setitem__(4, 7), "says max_position = .* saved with 7"),
    (lambda t: t["state.layout"].add_(1), "video_layout differs from the cache file's"),
    (lambda t: t.pop("state.layout"), "video_layout differs from the cache file's"),
])
def test_tampered_cache_tensors_are_refused_even_with_checksums_recomputed(qwen2_vl, tokenizer, pristine, tmp_path,
                                                                          edit, match):
    tmp_path = tmp_path / "s"
    manifest = saved(pristine, tmp_path)
    tensors = load_file(str(tmp_path / manifest["cache"]))
    edit(tensors)
    rewrite(tmp_path, manifest, tensors)
    refused(qwen2_vl, tokenizer, tmp_path, match)


def test_paths_in_the_manifest_stay_inside_the_state_folder(qwen2_vl, tokenizer, pristine, tmp_path):
    folder, outside = tmp_path / "state", tmp_path / "precious"
    outside.mkdir()
    victim = outside / "cache-1.safetensors"
    manifest = saved(pristine, folder)
    one_chunk = folded(qwen2_vl, tokenizer, range(1))
    victim.write_bytes((folder / manifest["cache"]).read_bytes())
    for name in (str(victim), "../precious/cache-1.safetensors", "sub/cache-1.safetensors", "manifest.json"):
        rewrite(folder, dict(manifest, cache=name))
        refused(qwen2_vl, tokenizer, folder, "only 'cache-<serial>.safetensors' inside the state folder")
        save_state(folder, one_chunk, {})  # the case: this save deleted the victim
        assert victim.exists()
        manifest = json.loads((folder / "manifest.json").read_text())

    (folder / manifest["cache"]).unlink()
    (folder / manifest["cache"]).symlink_to(victim)  # a symlink out, under the expected name
    refused(qwen2_vl, tokenizer, folder, "is a symbolic link")
    save_state(folder, one_chunk, {})
    assert victim.exists() and victim.stat().st_size > 0
    assert sorted(p.name for p in folder.iterdir() if not p.is_symlink()) == [
        json.loads((folder / "manifest.json").read_text())["cache"], "manifest.json"]

    link = tmp_path / "linked"
    link.mkdir()
    (link / "manifest.json").symlink_to(folder / "manifest.json")
    refused(qwen2_vl, tokenizer, link, "the manifest is a symbolic link")


def test_status_after_resume_reports_the_restored_stream(qwen2_vl, tokenizer, tmp_path):
    """Issue 9: the status of a resumed stream names its restored chunks and cache tokens, not 0."""
    adapter = adapter_for(qwen2_vl, tokenizer)
    context = StreamContext(adapter, settings=SETTINGS)
    for k in range(3):
        context.fold(random_frames(8, seed=k), timestamps=[4.0 * k + 0.5 * i for i in range(8)])
    questions = [dict(id="door", text="is anyone at the door ?", at=None, every=2, origin="mqtt", meta={},
                      wait=False)]
    save_state(tmp_path, context, dict(stream_id="cam", last_time=11.5, questions=questions))
    spec = StreamConfig(id="cam", source="udp://127.0.0.1:9", state=str(tmp_path))
    stream = LiveStream(spec, adapter, SETTINGS, fps=2.0, console=False)
    status = stream.status()
    tokens = round(sum(context.cache.lengths()) / adapter.num_layers)
    assert (status["chunks_folded"], status["cache_tokens"], status["stream_time"]) == (3, tokens, 11.5)
    assert stream.queue.counts()["standing"] == 1 and stream.source.start_time == 12.0

    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["stream"]["questions"] = [dict(questions[0], id="x" * 500)]
    rewrite(tmp_path, manifest)
    with pytest.raises(StateError, match="a saved question cannot be restored: 'id' must be 1 to 128"):
        LiveStream(spec, adapter, SETTINGS, fps=2.0, console=False)
    manifest["stream"]["questions"] = [dict(questions[0], code="import os")]
    rewrite(tmp_path, manifest)
    with pytest.raises(StateError, match=r"a saved question cannot be restored: unknown field\(s\) \['code'\]"):
        LiveStream(spec, adapter, SETTINGS, fps=2.0, console=False)


def test_resuming_with_the_other_query_aware_setting_is_named(tmp_path, capsys):
    """Issue 9: a state folded without --query-aware is not silently resumed with it (or the reverse)."""
    from stream.cli import main

    video = make_video(3_300_001, frames=16)
    path = write_video(tmp_path / "clip.mp4", video.frames, video.fps)
    config = tmp_path / "c.yaml"
    config.write_text("emloc:\n  preset: reference_code\n  chunk_frames: 16\n")
    args = ["run", str(path), "--model", "builtin:random", "--config", str(config), "--ask", "what ?",
            "--max-new-tokens", "1", "--state", str(tmp_path / "state")]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args + ["--query-aware"]) == 2
    refused = capsys.readouterr()
    assert "this state was folded without --query-aware; resume it the same way" in refused.err
    assert " layers; layer groups of " not in refused.out, "refused before the model loads (issue 24)"
    other = make_video(3_300_002, frames=16)
    other_path = write_video(tmp_path / "other.mp4", other.frames, other.fps)
    assert main([a if a != str(path) else str(other_path) for a in args]) == 2
    refused = capsys.readouterr()
    assert "this state was folded from another video" in refused.err, refused.err
    assert " layers; layer groups of " not in refused.out, "another video's state, refused before the model loads"
    assert main(args) == 0 and "resumed from" in capsys.readouterr().out


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (a real filesystem that fills), unmounted after the test; skipped where mounting is refused."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {mounted.stderr.strip()[:100]}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk, leave=0):
    """Fills `disk` up to `leave` bytes with one file, returned (remove it to free the room)."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as f:  # unbuffered: the write that fails is inside the loop
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def test_a_full_disk_keeps_the_old_state_and_says_so_in_one_line(qwen2_vl, tokenizer, small_disk):
    adapter = adapter_for(qwen2_vl, tokenizer)
    spec = StreamConfig(id="cam", source="udp://127.0.0.1:9", state=str(small_disk / "state"))
    stream = LiveStream(spec, adapter, SETTINGS, fps=2.0, console=False)
    errors = []
    stream.subscribe(type("Errors", (), {"on_error": lambda self, qid, message: errors.append(message)})())
    video = [(image, i / 2) for i, image in enumerate(random_frames(32, seed=5))]
    from stream.sources import Frame

    for image, t in video[:8]:
        stream.runner.feed(Frame(image, t))
    saved = json.loads((small_disk / "state" / "manifest.json").read_text())
    assert saved["context"]["chunks_folded"] == 1 and saved["stream"]["source"] == {"kind": "live",
                                                                                    "url": "udp://127.0.0.1:9"}
    filler = fill(small_disk)
    for image, t in video[8:24]:  # two more folds: both saves fail, folding goes on
        stream.runner.feed(Frame(image, t))
    assert stream.context.chunks_folded == 3 and stream.runner.status.chunks_folded == 3
    assert len(errors) == 1, "reported once, not every chunk"
    assert re.fullmatch(rf"{small_disk / 'state'}: state not saved: No space left on device \(\d+(\.\d)? (bytes|KiB) "
                        r"free on its disk\); the previous state there is intact; folding goes on, the save is "
                        r"retried every chunk", errors[0]), errors[0]
    assert "fold failed" not in errors[0] and stream.status()["detail"].startswith(str(small_disk / "state"))
    assert sorted(p.name for p in (small_disk / "state").iterdir()) == ["cache-1.safetensors", "manifest.json"]
    other = StreamContext(adapter, settings=SETTINGS)
    assert load_state(small_disk / "state", other)["last_time"] == 3.5 and other.chunks_folded == 1
    filler.unlink()  # room again: the next fold's save goes through
    for image, t in video[24:]:
        stream.runner.feed(Frame(image, t))
    assert stream.unsaved == "" and json.loads((small_disk / "state" / "manifest.json").read_text())[
        "context"]["chunks_folded"] == 4


@pytest.mark.slow
def test_cli_run_on_a_full_disk_answers_and_exits_1_with_one_line(tmp_path, small_disk, capsys):
    from stream.cli import main

    video = make_video(3_300_002, frames=16)
    path = write_video(tmp_path / "clip.mp4", video.frames, video.fps)
    config = tmp_path / "c.yaml"
    config.write_text("emloc:\n  preset: reference_code\n  chunk_frames: 8\n")
    (small_disk / "state").mkdir()
    fill(small_disk)
    code = main(["run", str(path), "--model", "builtin:random", "--config", str(config), "--ask", "what ?",
                 "--max-new-tokens", "1", "--state", str(small_disk / "state")])
    out, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in err
    assert "what ?" in out, "the answers are still given"
    lines = [line for line in err.splitlines() if "state not saved" in line]
    assert len(lines) == 2 and "No space left on device" in lines[0] and "free on its disk" in lines[0], err
    assert list((small_disk / "state").iterdir()) == [], "no partial file left behind"


def test_a_state_is_refused_for_another_video_at_the_same_path(tmp_path, capsys):
    from stream.cli import main
    from stream.state import source_fingerprint

    path, state = tmp_path / "clip.mp4", tmp_path / "state"
    config = tmp_path / "c.yaml"
    config.write_text("emloc:\n  preset: reference_code\n  chunk_frames: 16\n")
    args = ["run", str(path), "--model", "builtin:random", "--config", str(config), "--ask", "what ?",
            "--max-new-tokens", "1", "--state", str(state)]
    first = make_video(3_300_003, frames=16)
    write_video(path, first.frames, first.fps)
    assert main(args) == 0
    saved = json.loads((state / "manifest.json").read_text())["stream"]["source"]
    assert saved == json.loads(json.dumps(source_fingerprint(path)))
    moved = tmp_path / "moved.mp4"
    path.rename(moved)  # the same video elsewhere resumes
    assert main([*args[:1], str(moved), *args[2:]]) == 0 and "resumed from" in capsys.readouterr().out
    second = make_video(3_300_004, frames=16)  # another video, same path, same length and size class
    write_video(path, second.frames, second.fps)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "this state was folded from another video" in err and len(err.strip().splitlines()) == 1, err
    # a state saved before fingerprints: resumed by its path, as then, with a note
    manifest = json.loads((state / "manifest.json").read_text())
    del manifest["stream"]["source"]
    manifest["stream"]["video"] = str(path.resolve())
    manifest[CHECKSUM] = json_sha256(manifest, CHECKSUM)
    (state / "manifest.json").write_text(json.dumps(manifest))
    assert main(args) == 0
    assert "saved before states recorded their source" in capsys.readouterr().out


def test_a_live_state_is_refused_for_another_url_unless_the_camera_moved(qwen2_vl, tokenizer, tmp_path):
    adapter = adapter_for(qwen2_vl, tokenizer)
    context = folded(qwen2_vl, tokenizer, [0])
    save_state(tmp_path, context, dict(stream_id="cam", last_time=3.5, questions=[],
                                       source={"kind": "live", "url": "rtsp://10.0.0.5/stream"}))
    spec = StreamConfig(id="cam", source="rtsp://10.0.0.9/stream", state=str(tmp_path))
    with pytest.raises(StateError, match="folded from 'rtsp://10.0.0.5/stream', not 'rtsp://10.0.0.9/stream'; "
                                         "if the camera moved there, resume with --source-moved"):
        LiveStream(spec, adapter, SETTINGS, fps=2.0, console=False)
    stream = LiveStream(spec, adapter, SETTINGS, fps=2.0, console=False, source_moved=True)
    assert stream.context.chunks_folded == 1
