"""`batch --ray` and `serve --ray` on a real local Ray cluster, against the single-process batch.

    python benchmarks/ray_batch.py [--videos 12] [--frames 128]   # writes docs/benchmarks/ray.{md,json}

- videos per minute, single process and `batch --ray` with 1 and 2 worker processes (one
  node, 2 CPUs): end to end (command start to exit: imports, cluster join, model loads)
  and steady (first answered video to last);
- Ray's overhead against the single-process batch on the same videos;
- recovery after a node kill: batch (2 worker nodes, one killed mid-video: until the driver
  learns it, and until the lost video is answered on the other node) and a live stream
  (`tests/test_ray.py`'s failover scenario: until its actor is up on another node, folding
  again, and the question asked during the outage answered);
- decoding: 1280x720 30 fps H.264 sampled at 2 fps on one core, for the paper estimate;
- on paper: a 10-node GPU cluster from the H200 fold rates in docs/benchmarks/gpu_scale-h200.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stream.sources import write_video  # noqa: E402
from stream.suites.synthetic import make_video  # noqa: E402
from tests.raycluster import HEALTH_CHECK, Cluster  # noqa: E402

ENV = dict(os.environ, OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT))
LOCAL = """
import json, sys, time, torch
torch.set_num_threads(1)
from stream.engine import build_model
from stream.question_files import load_questions
from stream.config import Config
from stream.job import batch_jobs
from pathlib import Path
folder, questions, out = Path(sys.argv[1]), load_questions(sys.argv[2]), open(sys.argv[3], "w")
adapter, settings, _ = build_model(Config(), None)
for job, _ in batch_jobs(sorted(folder.glob("*.mp4")), folder, questions, set()):
    for event in job.answer(adapter, settings, fps=2.0, query_aware=True, max_new_tokens=16).events:
        out.write(json.dumps(event.to_dict()) + "\\n")
    print("VIDEO", time.monotonic(), flush=True)
"""


def videos(folder: Path, count: int, frames: int) -> Path:
    lines = []
    for seed in range(5000, 5000 + count):
        video = make_video(seed, frames=frames)
        write_video(folder / f"v{seed}.mp4", video.frames, video.fps)
        lines += [dict(id=f"{seed}-{q.kind}", question=q.text, video=f"v{seed}.mp4", expected=q.answer)
                  for q in video.questions]
    questions = folder.parent / "questions.jsonl"
    questions.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return questions


def timed(command: list[str]) -> tuple[float, list[tuple[float, str]], int]:
    """Runs a command; its wall time and its output lines, each with the time it arrived."""
    started, lines = time.monotonic(), []
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                               cwd=ROOT)
    for line in process.stdout:
        lines.append((time.monotonic(), line.rstrip()))
    rc = process.wait()
    return time.monotonic() - started, [(t - started, line) for t, line in lines], rc


def rates(count: int, wall: float, done_at: list[float]) -> dict:
    steady = (len(done_at) - 1) / (done_at[-1] - done_at[0]) * 60 if len(done_at) > 1 else None
    return dict(wall_s=round(wall, 1), videos_per_min=round(count / wall * 60, 1),
                steady_videos_per_min=round(steady, 1) if steady else None,
                first_video_s=round(done_at[0], 1), s_per_video_steady=round(60 / steady, 2) if steady else None)


def batch_command(folder: Path, questions: Path, out: Path, address: str, workers: int, **extra) -> list[str]:
    command = [sys.executable, "-m", "stream", "batch", str(folder), "--questions", str(questions), "--out",
               str(out), "--ray", address, "--workers", str(workers), "--max-new-tokens", "16"]
    for key, value in extra.items():
        command += [f"--{key.replace('_', '-')}", value]
    return command


def decode_rate(folder: Path) -> dict:
    """Frames sampled per second (and source frames decoded per second) of a 720p30 H.264 file, one core."""
    clip = folder / "hd.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc2=size=1280x720:rate=30",
                    "-t", "20", "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", str(clip)],
                   check=True)
    script = ("import time, torch; torch.set_num_threads(1); from stream.sources import open_source; "
              f"t = time.monotonic(); n = sum(1 for _ in open_source({str(clip)!r}).frames(fps=2.0)); "
              "print(n, time.monotonic() - t)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=dict(
        ENV, OMP_NUM_THREADS="1"), cwd=ROOT, check=True).stdout.split()
    sampled, seconds = int(out[-2]), float(out[-1])
    return dict(source="1280x720, 30 fps, 20 s, H.264", sampled_frames=sampled, seconds=round(seconds, 2),
                source_frames_per_s=round(20 * 30 / seconds), video_seconds_per_s=round(20 / seconds, 1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--videos", type=int, default=12)
    parser.add_argument("--frames", type=int, default=128)
    parser.add_argument("--live-only", action="store_true", help="rerun only the live failover (and decoding), "
                        "keeping the rest of docs/benchmarks/ray.json")
    args = parser.parse_args()
    docs = ROOT / "docs" / "benchmarks"
    if args.live_only:
        result = json.loads((docs / "ray.json").read_text())
        began = time.time() - 60 * result["minutes"]
        work = Path(tempfile.mkdtemp(prefix="raybench", dir="/tmp"))
        with Cluster("rl") as cluster:
            cluster.start_head(cpus=1)
            result["live_recovery"] = live(cluster, work)
        finish(result, work, began, docs)
        return
    began = time.time()
    work = Path(tempfile.mkdtemp(prefix="raybench", dir="/tmp"))
    folder = work / "videos"
    folder.mkdir()
    questions = videos(folder, args.videos, args.frames)
    result = dict(machine=f"{platform.node()}, {os.cpu_count()} cores (shared with other jobs)",
                  load_average_at_start=round(os.getloadavg()[0], 1), videos=args.videos,
                  frames_per_video=args.frames, model="stream/models/emloc-tiny-qwen2vl", health_check=HEALTH_CHECK)

    wall, lines, rc = timed([sys.executable, "-c", LOCAL, str(folder), str(questions), str(work / "local.jsonl")])
    assert rc == 0, lines
    result["local"] = rates(args.videos, wall, [t for t, line in lines if line.startswith("VIDEO")])
    print("local", result["local"], flush=True)
    reference = {(a["stream_id"], a["question_id"]): a["answer"] for a in map(json.loads, open(work / "local.jsonl"))}

    with Cluster("rb") as cluster:
        cluster.start_head(cpus=2, resources={"emloc_worker": 2})
        for workers in (1, 2):
            out = work / f"ray{workers}.jsonl"
            wall, lines, rc = timed(batch_command(folder, questions, out, cluster.address, workers))
            assert rc == 0, "\n".join(line for _, line in lines)
            answers = {(a["stream_id"], a["question_id"]): a["answer"] for a in map(json.loads, open(out))}
            done_at = [t for t, line in lines if "answers in" in line]
            result[f"ray_{workers}_workers"] = dict(rates(args.videos, wall, done_at),
                                                   answers_equal_local=answers == reference)
            print(workers, result[f"ray_{workers}_workers"], flush=True)
    local, one = result["local"], result["ray_1_workers"]
    result["overhead"] = dict(
        end_to_end_s=round(one["wall_s"] - local["wall_s"], 1),
        end_to_end_pct=round(100 * (one["wall_s"] / local["wall_s"] - 1), 1),
        per_video_s=round(one["s_per_video_steady"] - local["s_per_video_steady"], 3),
        per_video_pct=round(100 * (one["s_per_video_steady"] / local["s_per_video_steady"] - 1), 1))

    with Cluster("rk") as cluster:  # batch recovery: two worker nodes, one killed mid-video
        cluster.start_head(cpus=1)
        a = cluster.add_node(cpus=1, resources={"emloc_worker": 1})
        b = cluster.add_node(cpus=1, resources={"emloc_worker": 1})
        out = work / "kill.jsonl"
        process = subprocess.Popen(batch_command(folder, questions, out, cluster.address, 2,
                                                 resources='{"emloc_worker": 1}'),
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=ROOT)
        lines, killed = [], None
        for line in process.stdout:
            lines.append((time.monotonic(), line.rstrip()))
            if killed is None and re.search(f"answers in .* on node {b.node_id[:8]}", line):
                b.kill()
                killed = time.monotonic()
        assert process.wait() == 0, "\n".join(line for _, line in lines)
        lost = next((t, re.match(r"(\S+): attempt 1 failed: worker lost", line).group(1))
                    for t, line in lines if "attempt 1 failed: worker lost" in line)
        redone = next(t for t, line in lines if re.search(f"{re.escape(lost[1])}: 4 answers in .* on node "
                                                          f"{a.node_id[:8]}", line))
        answers = {(x["stream_id"], x["question_id"]): x["answer"] for x in map(json.loads, open(out))}
        result["batch_recovery"] = dict(loss_noticed_s=round(lost[0] - killed, 1),
                                        lost_video_answered_s=round(redone - killed, 1),
                                        answers_equal_local=answers == reference)
        print("batch recovery", result["batch_recovery"], flush=True)

        result["live_recovery"] = live(cluster, work)
    finish(result, work, began, docs)


def live(cluster: Cluster, work: Path) -> dict:
    from tests.test_ray import live_failover

    folder = work / "live"
    folder.mkdir()
    times = {k: round(v, 1) for k, v in live_failover(cluster, folder).items()}
    print("live recovery", times, flush=True)
    return times


def finish(result: dict, work: Path, began: float, docs: Path) -> None:
    result["decode"] = decode_rate(work)
    result["paper"] = paper(result)
    result["minutes"] = round((time.time() - began) / 60, 1)
    result["load_average_at_end"] = round(os.getloadavg()[0], 1)
    (docs / "ray.json").write_text(json.dumps(result, indent=1) + "\n")
    (docs / "ray.md").write_text(markdown(result))
    print(json.dumps(result, indent=1))


def paper(result: dict) -> dict:
    """A 10-node cluster of one H200 each, Qwen2-VL-7B architecture, from the measured fold rates."""
    gpu = json.loads((ROOT / "docs/benchmarks/gpu_scale-h200.json").read_text())["results"]
    search, full = gpu["emloc_js_search"], gpu["full"]
    nodes, fps, minutes, questions = 10, 2.0, 10, 4
    frames = minutes * 60 * fps
    per_video = frames / search["frames_per_s"] + questions * search["answer_latency_s"]
    decode = result["decode"]["video_seconds_per_s"]  # seconds of 720p30 video decoded per second, one core
    return dict(
        assumptions=f"{nodes} nodes x 1 H200, one worker (model copy) per GPU, {minutes}-minute 720p30 videos "
                    f"sampled at {fps:g} fps ({frames:.0f} frames), {questions} questions each",
        fold_frames_per_s=dict(emloc_search=search["frames_per_s"], full_context=full["frames_per_s"]),
        batch_s_per_video_gpu=round(per_video, 1),
        batch_videos_per_hour=round(nodes * 3600 / per_video),
        batch_video_hours_per_hour=round(nodes * search["frames_per_s"] / fps / 1, 1),
        decode_cores_per_gpu=round(search["frames_per_s"] / fps / decode, 1),
        cameras_compute_bound=int(nodes * search["frames_per_s"] // fps),
        cameras_one_model_per_stream=nodes * int(139 // search["peak_gpu_gib"]),
    )


def markdown(r: dict) -> str:
    def row(name: str, x: dict) -> str:
        return (f"| {name} | {x['wall_s']} | {x['videos_per_min']} | {x['steady_videos_per_min']} | "
                f"{x['s_per_video_steady']} | {x['first_video_s']} | {x.get('answers_equal_local', '(reference)')} |")

    p, o, b, live, d = r["paper"], r["overhead"], r["batch_recovery"], r["live_recovery"], r["decode"]
    lines = [
        "# Ray: `batch --ray` and `serve --ray`",
        "",
        f"`python benchmarks/ray_batch.py` ({r['minutes']} min) on {r['machine']}; load average "
        f"{r.get('load_average_at_start', '?')} at the start, {r.get('load_average_at_end', '?')} at the end "
        f"(other jobs ran beside it, so every figure here is noisy). {r['videos']} synthetic videos of "
        f"{r['frames_per_video']} frames, 4 questions each, {r['model']}; a local Ray cluster of separate "
        "`ray start` processes; each worker 1 CPU, torch on 1 thread.",
        "",
        "## Throughput (one node, 2 CPUs)",
        "",
        "End to end: command start to exit (imports, joining the cluster, loading the model in each worker). "
        "Steady: from the first answered video to the last.",
        "",
        "| run | wall s | videos/min end to end | videos/min steady | s/video steady | first video s "
        "| answers = single process |",
        "|---|---|---|---|---|---|---|",
        row("single process", r["local"]),
        row("`batch --ray`, 1 worker", r["ray_1_workers"]),
        row("`batch --ray`, 2 workers", r["ray_2_workers"]),
        "",
        f"Ray's overhead against the single process, 1 worker: {o['end_to_end_s']:+} s end to end "
        f"({o['end_to_end_pct']:+}%), {o['per_video_s']:+} s per video in the steady state ({o['per_video_pct']:+}%). "
        "The fixed part is starting the driver, joining the cluster and a worker process importing torch and "
        "loading the model. Per video Ray adds one actor call and the answers' trip back to the driver; the "
        "per-video difference measured here is within the noise of this loaded machine. "
        "On this 2-core machine a second worker cannot double anything: the "
        "cores are shared with the other jobs (see the load average), so the 2-worker row is no scaling figure.",
        "",
        "## Recovery after a node kill",
        "",
        f"Ray's health check in this cluster: {r['health_check']} (Ray's defaults take longer to declare a node "
        "dead: about 3 s x 5 periods).",
        "",
        f"- **batch** (head + 2 worker nodes, one killed mid-video): the driver learned of the loss "
        f"{b['loss_noticed_s']} s after the kill and the lost video was answered on the other node "
        f"{b['lost_video_answered_s']} s after it; answers equal the single process's: {b['answers_equal_local']}.",
        f"- **live stream** (`serve --ray`, 2 cameras on 2 nodes, one node killed; the scenario of "
        f"`tests/test_ray.py`): the stream's actor was up again on the other node (model loaded, state restored) "
        f"{live['actor_up_s']} s after the kill, folding new frames {live['recovered_s']} s after, and the question "
        f"asked during the outage was answered {live['outage_answer_s']} s after. The other camera never stopped.",
        "",
        "## On paper: 10 nodes with one H200 each",
        "",
        f"Assumptions: {p['assumptions']}. Fold rates from [gpu_scale-h200.md](gpu_scale-h200.md): "
        f"{p['fold_frames_per_s']['emloc_search']} frames/s with EMLoC's search, "
        f"{p['fold_frames_per_s']['full_context']} full context.",
        "",
        f"- **Batch**: {p['batch_s_per_video_gpu']} s of GPU per video, so about **{p['batch_videos_per_hour']} "
        f"videos/hour** ({p['batch_video_hours_per_hour']} hours of video per hour). Ray's share is negligible "
        "(one call per video, the model loaded once per worker); the driver writes a few answers a second.",
        f"- **Decoding is the first bottleneck**: one core here decodes {d['source']} at {d['source_frames_per_s']} "
        f"frames/s ({d['video_seconds_per_s']} s of video per second, measured under the load above; every frame "
        f"must be decoded to sample 2 a second), so keeping one GPU fed at 42 frames/s takes about "
        f"**{p['decode_cores_per_gpu']} cores per GPU** "
        "(`--cpus-per-worker` accordingly, or several decode-only workers per GPU node), plus reading the files "
        "from shared storage.",
        f"- **Cameras**: compute allows {p['cameras_compute_bound']} cameras at 2 fps (42 / 2 per GPU), but "
        "`serve --ray` runs one actor, with its own model copy, per stream: at 16.8 GiB peak per copy an H200 "
        f"holds 8, so **{p['cameras_one_model_per_stream']} cameras** on 10 nodes: GPU memory for model copies is "
        "the bottleneck there. Grouping several streams per actor around one model (as the single-process "
        "`serve` does) would lift it to the compute bound; not built.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
