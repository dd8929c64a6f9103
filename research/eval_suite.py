"""Full-context accuracy of a model on a synthetic suite, through the real pipeline.

    python research/eval_suite.py --suite camera --model stream/models/emloc-tiny-camera --videos 100

Every video is generated from a held-out seed (2_000_000 + i, as benchmarks/fidelity.py:
never trained on, never used to pick a checkpoint), written to an H.264 file, decoded,
sampled at the video's rate, chunked and folded with every token kept (the online preset's
chunking), then asked each question of its suite and the probe prompt. Prints accuracy per
question type and the share of exactly right probe answers (descriptions); --out saves
every answer as JSON.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emloc import StreamContext, load_adapter  # noqa: E402
from emloc.policies import KeepAll  # noqa: E402
from emloc.settings import videomme_online  # noqa: E402
from stream.job import answer_video  # noqa: E402
from stream.models import CAMERA_MODEL  # noqa: E402
from stream.sources import VideoFile, write_video  # noqa: E402
from stream.suites import camera as synthetic_camera  # noqa: E402
from stream.suites import synthetic

SUITES = {"synthetic": synthetic, "camera": synthetic_camera}
SEEDS = 2_000_000

_adapter = None
_temporal_range = None


def _init(model: str, temporal_range: int | None = None) -> None:
    global _adapter, _temporal_range
    torch.set_num_threads(1)
    _adapter = load_adapter(model)
    _temporal_range = temporal_range


def _run(job) -> dict:
    suite, seed, frames = job
    task = SUITES[suite]
    video = task.make_video(seed, frames=frames)
    with TemporaryDirectory() as tmp:
        path = write_video(Path(tmp) / f"{seed}.mp4", video.frames, fps=video.fps)
        decoded = list(VideoFile(path).frames(fps=video.fps))
    settings = videomme_online(layer_groups=2, temporal_range=_temporal_range)
    context = StreamContext(_adapter, settings=settings, policy=KeepAll())
    questions = [video.question(k).text for k in task.QUESTION_TYPES] + [task.PROBE]
    answers = [a.text.strip() for a in answer_video(context, decoded, questions, query_aware=False,
                                                    max_new_tokens=20)]
    truth = [video.question(k).answer for k in task.QUESTION_TYPES] + [video.description()]
    return dict(seed=seed, answers=answers, truth=truth,
                correct=[a == t for a, t in zip(answers, truth)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), default="camera")
    parser.add_argument("--model", default=str(CAMERA_MODEL))
    parser.add_argument("--videos", type=int, default=100)
    parser.add_argument("--frames", type=int, default=256)
    parser.add_argument("--first-seed", type=int, default=SEEDS)
    parser.add_argument("--workers", type=int, default=2, help="processes, one thread each")
    parser.add_argument("--out", type=Path, help="save every answer here (JSON)")
    parser.add_argument("--temporal-range", type=int, help="EMLoCSettings.temporal_range (default: the model's; "
                        "0: temporal positions never compressed, as before the position policy)")
    args = parser.parse_args(argv)
    task = SUITES[args.suite]
    kinds = [*task.QUESTION_TYPES, "describe"]
    jobs = [(args.suite, args.first_seed + i, args.frames) for i in range(args.videos)]
    rows, started = [], time.time()
    with multiprocessing.get_context("spawn").Pool(args.workers, _init, (args.model, args.temporal_range)) as pool:
        for row in pool.imap_unordered(_run, jobs):
            rows.append(row)
            if len(rows) % 10 == 0:
                print(f"[{len(rows)}/{args.videos} videos, {(time.time() - started) / 60:.1f} min]", flush=True)
    rows.sort(key=lambda r: r["seed"])
    accuracy = {k: sum(r["correct"][i] for r in rows) / len(rows) for i, k in enumerate(kinds)}
    mean = sum(accuracy[k] for k in task.QUESTION_TYPES) / len(task.QUESTION_TYPES)
    print(f"{args.suite} suite, {args.model}, {args.videos} videos x {args.frames} frames, seeds "
          f"{args.first_seed}..{args.first_seed + args.videos - 1}, full context, "
          f"{(time.time() - started) / 60:.1f} min")
    print("| frames | " + " | ".join(kinds) + " | mean (questions) |")
    print("|---" * (len(kinds) + 2) + "|")
    print(f"| {args.frames} | " + " | ".join(f"{100 * accuracy[k]:.1f}%" for k in kinds) + f" | {100 * mean:.1f}% |")
    if args.out:
        args.out.write_text(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()}, accuracy=accuracy,
                                            videos=rows), indent=1) + "\n")


if __name__ == "__main__":
    main()
