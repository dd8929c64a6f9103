"""How many 2-frames/s cameras one device sustains with the default, `serve`'s way: one model shared by
N streams, each with its own cache and runner, folded one after another as their chunks come.

    python benchmarks/cameras.py                       # the shipped tiny model on this machine
    python benchmarks/cameras.py --model 7b-reduced    # the 7B layout, narrow layers (CPU)
    python benchmarks/cameras.py --model 7b            # the 7B architecture in bf16 (a GPU)

Cameras are in-process synthetic sources (336x336 for the 7B layouts, the suite's 56x56 for the tiny
model), their starts spread over one chunk. Time is virtual and driven by the measured work: every
fold and answer advances the clock by what it took, idle time is skipped, so an hour of cameras
costs only its compute. A camera's lag is the clock minus the time of the frame it is fed; the
device sustains N cameras when the lag at the end of the run is no larger than in its first half
(it does not grow). The estimate `chunk seconds / fold seconds per chunk` is printed beside the
simulated ladder; a standing question every 4 chunks adds its answers to the work.

Writes cameras[-TAG].json/.md to --out (docs/benchmarks by default).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from emloc import EMLoCSettings, StreamContext, load_adapter  # noqa: E402
from stream.models import DEFAULT_MODEL  # noqa: E402
from stream.questions import Question, QuestionQueue  # noqa: E402
from stream.runtime import StreamRunner  # noqa: E402
from stream.sources import Frame  # noqa: E402

FPS = 2.0


def build(name: str):
    if name == "tiny":
        return load_adapter(str(DEFAULT_MODEL)), 56
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_scale import REDUCED, SEVEN_B
    from gpu_scale import build as build_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape, dtype = (SEVEN_B, torch.bfloat16) if name == "7b" else (REDUCED, torch.float32)
    return build_model(shape, device, dtype), 336


def synchronize(adapter) -> None:
    if adapter.device.type == "cuda":
        torch.cuda.synchronize()


def camera_frames(size: int, count: int, seed: int) -> list[np.ndarray]:
    """A few distinct frames a camera cycles through (decoding is not what is measured)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]


def simulate(adapter, size: int, cameras: int, chunks: int, standing: str | None) -> dict:
    """`cameras` streams for `chunks` chunk periods of virtual time; returns the lag curve."""
    settings = EMLoCSettings()  # the default: half the model's layers a group
    period = settings.chunk_frames / FPS
    runners, frames = [], []
    for c in range(cameras):
        queue = QuestionQueue()
        if standing:
            queue.submit(Question(queue.new_id(), standing, every=4))
        runners.append(StreamRunner(f"cam{c}", StreamContext(adapter, settings=settings), queue, []))
        frames.append(camera_frames(size, 4, c))
    offsets = [c * period / cameras for c in range(cameras)]  # starts spread over one chunk
    fed = [0] * cameras
    end = chunks * period
    clock, busy, lags = 0.0, 0.0, []  # lags: (clock, camera, lag) after every fold
    while True:
        due = [(offsets[c] + fed[c] / FPS, c) for c in range(cameras)]
        t, c = min(due)
        if t >= end:
            break
        clock = max(clock, t)  # idle until the next frame exists
        folded = runners[c].context.chunks_folded
        start = time.perf_counter()
        runners[c].feed(Frame(frames[c][fed[c] % 4], t))
        synchronize(adapter)
        spent = time.perf_counter() - start
        clock += spent
        busy += spent
        fed[c] += 1
        if runners[c].context.chunks_folded > folded:
            lags.append((clock, c, clock - t))
    first = [lag for at, _, lag in lags if at < end / 2]
    last = [lag for at, _, lag in lags if at >= end - period]
    return dict(cameras=cameras, chunks=chunks, folds=len(lags), busy_s=busy, busy_share=busy / max(clock, 1e-9),
                lag_first_half_s=max(first, default=0.0), lag_last_period_s=max(last, default=0.0),
                sustained=max(last, default=0.0) <= max(max(first, default=0.0), period / 2) + 1e-9,
                lag_curve=[(round(at, 1), round(lag, 2)) for at, _, lag in lags])


def fold_seconds(adapter, size: int, standing: str | None) -> float:
    """Seconds of work per chunk for one camera (fold, plus its share of the standing answers)."""
    simulate(adapter, size, 1, 1, standing)  # warm-up
    result = simulate(adapter, size, 1, 6, standing)
    return result["busy_s"] / result["chunks"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "7b-reduced", "7b"], default="tiny")
    parser.add_argument("--chunks", type=int, default=8, help="chunk periods of virtual time per rung")
    parser.add_argument("--standing", default="Is anyone at the door?",
                        help="a standing question every 4 chunks per camera ('' for none)")
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    adapter, size = build(args.model)
    standing = args.standing or None
    with torch.no_grad():
        per_chunk = fold_seconds(adapter, size, standing)
        period = EMLoCSettings().chunk_frames / FPS
        estimate = int(period // per_chunk)
        print(f"{args.model}: {per_chunk:.3f} s of work per camera chunk ({period:.0f} s of video): "
              f"estimate {estimate} cameras", flush=True)
        ladder, rungs = [], sorted({max(1, round(estimate * f)) for f in (0.5, 0.8, 1.0, 1.25)})
        for cameras in rungs:
            result = simulate(adapter, size, cameras, args.chunks, standing)
            ladder.append(result)
            print(f"  {cameras:4d} cameras: busy {100 * result['busy_share']:.0f}%, lag first half "
                  f"{result['lag_first_half_s']:.1f} s, last period {result['lag_last_period_s']:.1f} s, "
                  f"{'sustained' if result['sustained'] else 'lag grows'}", flush=True)
    sustained = max((r["cameras"] for r in ladder if r["sustained"]), default=0)
    device = torch.cuda.get_device_name() if adapter.device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    command = "python benchmarks/cameras.py" + (f" --model {args.model}" if args.model != "tiny" else "")
    out = dict(command=command, model=args.model, device=device, seconds_per_chunk=per_chunk,
               estimate=estimate, sustained=sustained, ladder=ladder)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "cameras" + (f"-{args.tag}" if args.tag else f"-{args.model}")
    (args.out / f"{name}.json").write_text(json.dumps(out, indent=1))
    lines = [f"# Cameras per device: {args.model} on {device}", "",
             f"Command: `{command}`. Default settings, 2 frames/s, 64-frame chunks ({period:.0f} s), a standing "
             f"question every 4 chunks per camera. Work per camera chunk {per_chunk:.3f} s: estimate "
             f"**{estimate}** cameras; largest rung sustained: **{sustained}**.", "",
             "| cameras | busy % | max lag, first half (s) | max lag, last period (s) | lag |", "|---|---|---|---|---|"]
    for r in ladder:
        lines.append(f"| {r['cameras']} | {100 * r['busy_share']:.0f} | {r['lag_first_half_s']:.1f} "
                     f"| {r['lag_last_period_s']:.1f} | {'bounded' if r['sustained'] else 'grows'} |")
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(f"cameras per device ({device}): {sustained} sustained, {estimate} estimated", flush=True)


if __name__ == "__main__":
    main()
