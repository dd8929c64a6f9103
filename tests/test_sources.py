"""Video files made with ffmpeg and PyAV, decoded for real, sampled by timestamp."""

import shutil
import subprocess

import numpy as np
import pytest

from stream.sources import VideoError, VideoFile, sample, write_video
from stream.synthetic import make_video

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
