"""Video files made with ffmpeg and PyAV, decoded for real, sampled by timestamp."""

import shutil
import subprocess
import time

import numpy as np
import pytest

from stream.sources import VideoError, VideoFile, sample, write_video
from stream.suites.synthetic import make_video

ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")


def run_ffmpeg(*args):
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True)


@pytest.mark.parametrize("backend", ["decord", "av"])
def test_written_video_reads_back(tmp_path, backend):
    video = make_video(1, frames=32)
    path = write_video(tmp_path / "v.mp4", video.frames, fps=video.fps)
    frames = list(VideoFile(path, backend=backend).frames())
    assert len(frames) == 32
    assert [f.time for f in frames] == pytest.approx([i / video.fps for i in range(32)], abs=1e-3)
    # per-pixel colour noise is lost to 4:2:0 chroma subsampling; what a 28 x 28 token sees survives
    def cells(x):
        return x.astype(np.float32).reshape(32, 2, 28, 2, 28, 3).mean(axis=(2, 4))
    decoded = np.stack([f.image for f in frames])
    assert np.abs(cells(decoded) - cells(video.frames)).max() < 6


def test_written_video_is_the_same_bytes_every_time(tmp_path):
    # The demo and the benchmarks encode their synthetic videos with write_video: the same frames must give
    # the same file whatever the process did before (libx264's macroblock tree read memory it never wrote,
    # so the file depended on the heap: the demo's kept tokens changed from run to run).
    video = make_video(7, frames=64)
    rng = np.random.default_rng(0)
    files = []
    for i in range(4):
        junk = [rng.integers(0, 256, size=int(n), dtype=np.uint8) for n in rng.integers(1_000, 300_000, size=100)]
        del junk  # freed memory full of noise, which the encoder may be handed next
        files.append(write_video(tmp_path / f"{i}.mp4", video.frames, fps=video.fps).read_bytes())
    assert all(f == files[0] for f in files[1:])


@ffmpeg
@pytest.mark.parametrize("backend", ["decord", "av"])
def test_constant_rate_sampled_at_target_fps(tmp_path, backend):
    path = tmp_path / "cfr.mp4"
    run_ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x64:rate=10:duration=4", "-pix_fmt", "yuv420p", str(path))
    times = [f.time for f in VideoFile(path, backend=backend).frames(fps=2)]
    assert times == pytest.approx([0.5 * k for k in range(8)], abs=1e-3)


@ffmpeg
@pytest.mark.parametrize("backend", ["decord", "av"])
def test_variable_rate_sampled_by_timestamp(tmp_path, backend):
    # 20 frames 0.1 s apart (0..1.9 s), then 6 frames 0.5 s apart (2.0..4.5 s)
    path = tmp_path / "vfr.mp4"
    run_ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x64:rate=10:duration=2.6",
               "-vf", "setpts='if(lt(N,20),N*0.1,2+(N-20)*0.5)/TB'", "-fps_mode", "vfr",
               "-video_track_timescale", "1000", "-pix_fmt", "yuv420p", str(path))
    all_times = [f.time for f in VideoFile(path, backend=backend).frames()]
    assert all_times == pytest.approx([0.1 * i for i in range(20)] + [2 + 0.5 * i for i in range(6)], abs=2e-3)
    times = [f.time for f in VideoFile(path, backend=backend).frames(fps=4)]
    # every 0.25 s while frames are dense; every frame once they are sparser than the target rate
    expected = [0.0, 0.3, 0.5, 0.8, 1.0, 1.3, 1.5, 1.8] + [2 + 0.5 * i for i in range(6)]
    assert times == pytest.approx(expected, abs=2e-3)


def test_sample_keeps_first_frame_at_or_after_each_instant():
    class F:
        def __init__(self, t):
            self.time = t
    kept = [f.time for f in sample([F(t) for t in (0.0, 0.2, 0.45, 0.5, 0.9, 1.7, 1.75, 2.1)], fps=2)]
    assert kept == [0.0, 0.5, 1.7, 2.1]


def test_truncated_file_names_the_file(tmp_path):
    video = make_video(2, frames=32)
    good = write_video(tmp_path / "good.mp4", video.frames, fps=2)
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    with pytest.raises(VideoError, match="broken.mp4"):
        list(VideoFile(bad).frames())
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video" * 100)
    with pytest.raises(VideoError, match="junk.mp4"):
        list(VideoFile(junk).frames())
    with pytest.raises(VideoError, match="missing.mp4"):
        VideoFile(tmp_path / "missing.mp4")


@ffmpeg
def test_container_decord_cannot_read_falls_back_to_pyav(tmp_path):
    path = tmp_path / "clip.gif"
    run_ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x64:rate=10:duration=3", str(path))
    with pytest.raises(VideoError, match="clip.gif"):
        list(VideoFile(path, backend="decord").frames())
    source = VideoFile(path)
    times = [f.time for f in source.frames(fps=2)]
    assert source.used == "av" and times == pytest.approx([0.5 * k for k in range(6)], abs=1e-3)


def test_image_folder_is_a_stream(tmp_path):
    from PIL import Image

    from stream.sources import ImageFolder, open_source

    video = make_video(4, frames=16)
    for i, image in enumerate(video.frames):
        Image.fromarray(image).save(tmp_path / f"frame_{i:04d}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    frames = list(open_source(tmp_path, fps_for_images=4).frames(fps=2))
    assert [f.time for f in frames] == [0.5 * k for k in range(8)]
    assert np.array_equal(frames[1].image, video.frames[2])  # PNG is lossless
    Image.fromarray(video.frames[0][:28]).save(tmp_path / "frame_9999.png")
    with pytest.raises(VideoError, match="frame_9999.png.*one size"):
        list(ImageFolder(tmp_path).frames())
    (tmp_path / "frame_9999.png").write_bytes(b"broken")
    with pytest.raises(VideoError, match="frame_9999.png: cannot read image"):
        list(ImageFolder(tmp_path).frames())
    with pytest.raises(VideoError, match="not a folder of images"):
        ImageFolder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VideoError, match="no images"):
        ImageFolder(tmp_path / "empty")


@ffmpeg
def test_rotation_metadata_is_applied_as_ffmpeg_shows_it(tmp_path):
    """A phone video (display matrix: turn 90 degrees) comes out upright from every reader, as FFmpeg itself
    shows it: PyAV turns it; decord 0.6 cannot read such a file (its frames come out the wrong size), so
    `auto` falls back to PyAV; a live source turns it too."""
    from stream.live import LiveSource

    plain, turned = tmp_path / "plain.mp4", tmp_path / "turned.mp4"
    run_ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=10:duration=1", "-pix_fmt", "yuv420p", str(plain))
    try:  # FFmpeg 6+: an input option; before it, the muxer turned the "rotate" tag into the display matrix
        run_ffmpeg("-display_rotation", "90", "-i", str(plain), "-c", "copy", str(turned))
    except subprocess.CalledProcessError:
        run_ffmpeg("-i", str(plain), "-c", "copy", "-metadata:s:v:0", "rotate=90", str(turned))
    shown = subprocess.run(["ffmpeg", "-v", "error", "-i", str(turned), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                           capture_output=True, check=True).stdout  # FFmpeg turns it by default
    reference = np.frombuffer(shown, np.uint8).reshape(-1, 64, 48, 3).astype(int)
    assert len(reference) == 10

    def close(frames):
        got = np.stack([f.image for f in frames]).astype(int)
        return got.shape == reference.shape and np.abs(got - reference).mean() < 2

    assert close(list(VideoFile(turned, backend="av").frames()))
    source = VideoFile(turned)
    assert close(list(source.frames()))
    try:
        assert close(list(VideoFile(turned, backend="decord").frames())), "decord reads it, but not upright"
    except VideoError:
        assert source.used == "av"
    assert not close(list(VideoFile(plain, backend="av").frames()))  # the reference really is turned
    live = LiveSource(str(turned), fps=10, buffer=64, backoff=(5.0, 5.0)).start()
    try:
        frames = [f for f in iter(lambda: live.get(1.0), None)][:10]
    finally:
        live.stop()
    assert close(frames)


@ffmpeg
def test_audio_only_file_says_no_video_stream(tmp_path):
    audio = tmp_path / "talk.m4a"
    run_ffmpeg("-f", "lavfi", "-i", "sine=duration=1", str(audio))
    with pytest.raises(VideoError, match=r"talk.m4a: no video stream \(audio only\)$"):
        list(VideoFile(audio).frames())


def test_decoder_noise_is_silenced_our_message_stays(tmp_path, capfd):
    """FFmpeg's and decord's own log lines ("moov atom not found", "[time] /their/build/path.cc:83: ERROR")
    are not printed; the error names the file and what is wrong, once."""
    video = make_video(2, frames=32)
    good = write_video(tmp_path / "good.mp4", video.frames, fps=2)
    for name, data in [("cut.mp4", good.read_bytes()[: good.stat().st_size // 3]), ("junk.mp4", b"junk" * 500)]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(VideoError) as error:
            list(VideoFile(tmp_path / name).frames())
        message = str(error.value)
        assert message.startswith(f"{tmp_path / name}: cannot decode video") and ".cc:" not in message
        assert "Errno" not in message and "\n" not in message
    out, err = capfd.readouterr()
    assert err == "" and out == "", (out, err)


def test_live_source_that_sends_nothing_says_so():
    import socket

    from stream.live import LiveSource

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"udp://127.0.0.1:{port}"
    source = LiveSource(url, open_timeout=0.5, read_timeout=0.5, backoff=(5.0, 5.0)).start()
    try:
        deadline = time.time() + 10
        while source.state != "reconnecting" and time.time() < deadline:
            time.sleep(0.05)
        assert source.last_error == f"no data from {url} for 0.5 s"
    finally:
        source.stop()
