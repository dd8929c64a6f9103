"""Fidelity benchmark: what pruning costs in accuracy on the synthetic long-video task.

    python benchmarks/fidelity.py                       # 200 videos x 256 frames, the shipped model
    python benchmarks/fidelity.py --videos 20 --out /tmp/fid   # a quick look

Every video is generated from a seed (2_000_000 + i: never trained on, never used to pick
the checkpoint), written to an H.264 file, decoded, sampled at 2 fps, chunked and folded
through `stream.job.answer_video`, the path `emloc-stream run` takes. Methods:

- full: every token kept (the reference);
- EMLoC, the paper's online preset (layer groups of L/2, delta 0.04, ratios 0.02/0.1/0.5/1)
  and the reference-code preset (groups of L/4, delta 0.05, ratios 0.02/0.05/0.1/1), each
  query-aware (the question is the observer while folding, as in the paper: one pass per
  question) and query-agnostic (the probe prompt observes; one pass answers all questions,
  as a live stream must);
- online EMLoC whose probe observer carries the model's own answer to the probe (up to 16
  tokens, over the unpruned chunk): still query-agnostic;
- online EMLoC with the four question types as standing observers of one pass (one cache
  answers them all, as a live stream with standing questions runs);
- query-agnostic and query-aware online EMLoC at tighter bounds (delta 0.01, 0.0025), for
  the accuracy / tokens-kept curve;
- online EMLoC measuring the bound on the observer's last position only (m = 1: the
  answer's distribution) instead of the paper's last 16 positions, and without the
  importance smoothing (kernel 1 instead of 5);
- baselines given, video by video, the same share of tokens the query-agnostic online EMLoC
  kept on that video: uniform frame subsampling, StreamingLLM (sinks + recent window),
  observer top-k (SnapKV-like, probe observer) and random dropping; and observer top-k with
  the question as observer, matched to query-aware online EMLoC.

Writes fidelity.json (every video's answers too), fidelity.md and fidelity.png to --out.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emloc import StreamContext, load_adapter  # noqa: E402
from emloc.policies import (  # noqa: E402
    KeepAll,
    ObserverTopK,
    RandomTokens,
    RetentionPolicy,
    StreamingWindow,
    UniformFrames,
)
from emloc.settings import EMLoCSettings, reference_code, videomme_online  # noqa: E402
from stream.job import answer_video  # noqa: E402
from stream.models import DEFAULT_MODEL  # noqa: E402
from stream.sources import VideoFile, write_video  # noqa: E402
from stream.suites.synthetic import QUESTION_TYPES, make_video  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SEEDS = 2_000_000


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    preset: str  # "online" or "reference": the settings (chunking, and the search for EMLoC)
    query_aware: bool
    baseline: str | None = None  # policy built from a matched kept share; None = EMLoC's own search
    matched_to: str | None = None
    overrides: tuple[tuple[str, object], ...] = ()  # settings changed from the preset (delta, observed_positions..)
    shared: bool = False  # query-aware with every question observing one pass (standing questions of a live stream)


METHODS = [
    Method("full", "full context", "online", False, baseline="keep_all"),
    Method("emloc_online_probe", "EMLoC online, probe observer", "online", False),
    Method("emloc_online_query", "EMLoC online, question observer", "online", True),
    Method("emloc_online_probe_answer", "EMLoC online, probe + its own answer", "online", False,
           overrides=(("probe_answer_tokens", 16),)),
    Method("emloc_online_standing", "EMLoC online, the 4 questions as standing observers", "online", True,
           shared=True),
    Method("emloc_reference_probe", "EMLoC ref-code, probe observer", "reference", False),
    Method("emloc_reference_query", "EMLoC ref-code, question observer", "reference", True),
    Method("emloc_online_probe_d0.01", "EMLoC online, probe, delta 0.01", "online", False,
           overrides=(("delta", 0.01),)),
    Method("emloc_online_probe_d0.0025", "EMLoC online, probe, delta 0.0025", "online", False,
           overrides=(("delta", 0.0025),)),
    Method("emloc_online_query_d0.01", "EMLoC online, question, delta 0.01", "online", True,
           overrides=(("delta", 0.01),)),
    Method("emloc_online_query_m1", "EMLoC online, question, last position only", "online", True,
           overrides=(("observed_positions", 1),)),
    Method("emloc_online_probe_m1", "EMLoC online, probe, last position only", "online", False,
           overrides=(("observed_positions", 1),)),
    Method("emloc_online_query_k1", "EMLoC online, question, no smoothing", "online", True,
           overrides=(("smoothing_kernel", 1),)),
    Method("uniform_frames", "uniform frames", "online", False, "uniform_frames", "emloc_online_probe"),
    Method("streaming_window", "StreamingLLM (sinks + window)", "online", False, "streaming_window",
           "emloc_online_probe"),
    Method("observer_topk_probe", "observer top-k, probe observer", "online", False, "observer_topk",
           "emloc_online_probe"),
    Method("random_tokens", "random tokens", "online", False, "random_tokens", "emloc_online_probe"),
    Method("observer_topk_query", "observer top-k, question observer", "online", True, "observer_topk",
           "emloc_online_query"),
]


def settings_for(preset: str, num_layers: int) -> EMLoCSettings:
    """The presets scaled to the model's depth: the paper's 14 of 28 layers is L/2, 7 of 28 is L/4."""
    if preset == "online":
        return videomme_online(layer_group_size=max(1, num_layers // 2), temporal_range=_temporal_range)
    return reference_code(layer_group_size=max(1, num_layers // 4) if num_layers % 4 == 0 else 1,
                          temporal_range=_temporal_range)


def baseline_policy(kind: str, share: float, video_tokens: int, seed: int) -> RetentionPolicy:
    share = min(1.0, max(share, 1e-3))
    if kind == "keep_all":
        return KeepAll()
    if kind == "uniform_frames":
        return UniformFrames(share)
    if kind == "streaming_window":
        return StreamingWindow(window=max(1, round(share * video_tokens)))
    if kind == "observer_topk":
        return ObserverTopK(share)
    if kind == "random_tokens":
        return RandomTokens(share, seed=seed)
    raise ValueError(kind)


def run_once(adapter, settings, policy, frames, questions, query_aware, max_new_tokens):
    """One context over the whole video; returns answers and what the cache held."""
    context = StreamContext(adapter, settings=settings, policy=policy)
    records = []
    clock = time.perf_counter()
    answers = answer_video(context, frames, questions, query_aware=query_aware, max_new_tokens=max_new_tokens,
                           on_fold=records.append)
    wall = time.perf_counter() - clock
    layers = adapter.num_layers
    video_seen, video_kept = context.video_tokens_seen(), context.video_tokens_kept()
    per_token = context.cache.nbytes() / max(sum(context.cache.lengths()), 1)  # bytes per token and layer
    peak = max(per_token * (sum(r.tokens_before) + layers * r.chunk_tokens) for r in records)
    return [a.text.strip() for a in answers], video_kept, video_seen, peak, wall


def video_tokens(adapter, frames) -> int:
    """Tokens the whole video makes (for sizing the StreamingLLM window)."""
    per_step = adapter.encode_video(adapter.preprocess(np.stack([f.image for f in frames[:2]]))).shape[1]
    return per_step * (len(frames) + 1) // 2


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--videos", type=int, default=200)
    parser.add_argument("--frames", type=int, default=256)
    parser.add_argument("--methods", nargs="+", default=[m.name for m in METHODS])
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="processes, one thread each")
    parser.add_argument("--temporal-range", type=int, help="EMLoCSettings.temporal_range (default: the model's, "
                        "256 for the shipped model; 0: positions never compressed, as before the position policy)")
    parser.add_argument("--replot", action="store_true", help="rewrite the table and plot from --out/fidelity.json")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    args = parser.parse_args(argv)
    if args.replot:
        saved = json.loads((args.out / "fidelity.json").read_text())
        write_json(args.out / "fidelity.json", saved["meta"], saved["summary"], saved["videos"])
        (args.out / "fidelity.md").write_text(markdown(saved["meta"], saved["summary"]))
        plot(saved["summary"], args.out / "fidelity.png")
        return
    unknown = set(args.methods) - {m.name for m in METHODS}
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}")
    methods = [m for m in METHODS if m.name in args.methods]
    for m in methods:
        if m.matched_to and m.matched_to not in args.methods:
            parser.error(f"{m.name} is matched to {m.matched_to}, which must run too")

    print(f"model {args.model}; {args.videos} videos x {args.frames} frames; {args.workers} worker(s); "
          f"methods {[m.name for m in methods]}", flush=True)
    jobs = [(SEEDS + i, args.frames, tuple(m.name for m in methods), args.max_new_tokens) for i in range(args.videos)]
    rows, started = [], time.time()
    context = multiprocessing.get_context("spawn")
    with context.Pool(args.workers, _init_worker, (args.model, args.temporal_range)) as pool:
        for row in pool.imap_unordered(_run_video, jobs):
            rows.append(row)
            done = len(rows)
            if done % 10 == 0 or done == args.videos:
                elapsed = time.time() - started
                line = " ".join(f"{m.name}={accuracy(rows, m.name)['mean']:.2f}" for m in methods)
                print(f"[{done}/{args.videos} videos, {elapsed / 60:.1f} min, "
                      f"eta {elapsed / done * (args.videos - done) / 60:.1f} min] {line}", flush=True)
    rows.sort(key=lambda r: r["seed"])
    layers = rows[0]["layers"]
    summary = summarize(rows, methods)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(model=str(Path(args.model).resolve().relative_to(ROOT)) if Path(args.model).resolve().is_relative_to(
        ROOT) else args.model, videos=args.videos, frames=args.frames, seeds=f"{SEEDS}..{SEEDS + args.videos - 1}",
        layers=layers, workers=args.workers, minutes=round((time.time() - started) / 60, 1),
        command="python benchmarks/fidelity.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    write_json(args.out / "fidelity.json", meta, summary, rows)
    (args.out / "fidelity.md").write_text(markdown(meta, summary))
    plot(summary, args.out / "fidelity.png")
    print(markdown(meta, summary))


_adapter = None
_temporal_range = None  # EMLoCSettings.temporal_range of every method (None: the model's)


def _init_worker(model: str, temporal_range: int | None = None) -> None:
    global _adapter, _temporal_range
    torch.set_num_threads(1)  # tiny matrices: one thread per process beats two threads sharing one process
    _adapter = load_adapter(model)
    _temporal_range = temporal_range


def _run_video(job) -> dict:
    """Every method on one video, decoded from a real H.264 file."""
    seed, frames_count, names, max_new_tokens = job
    video = make_video(seed, frames=frames_count)
    with TemporaryDirectory() as tmp:
        path = write_video(Path(tmp) / f"{seed}.mp4", video.frames, fps=video.fps)
        frames = list(VideoFile(path).frames(fps=video.fps))
    total = video_tokens(_adapter, frames)
    shares, row = {}, dict(seed=seed, layers=_adapter.num_layers,
                           truth={k: video.question(k).answer for k in QUESTION_TYPES})
    for m in (m for m in METHODS if m.name in names):
        result = run_method_sized(_adapter, m, frames, video, shares.get(m.matched_to, 1.0), total, max_new_tokens)
        shares[m.name] = result["share"]
        row[m.name] = result
    return row


def run_method_sized(adapter, method, frames, video, share, total_tokens, max_new_tokens):
    settings = settings_for(method.preset, adapter.num_layers)
    settings = replace(settings, **dict(method.overrides))
    questions = [video.question(kind) for kind in QUESTION_TYPES]
    groups = [[q] for q in questions] if method.query_aware and not method.shared else [questions]
    out = dict(answers={}, kept=[], seen=0, peak=0.0, wall=0.0)
    for group in groups:
        policy = None if method.baseline is None else baseline_policy(method.baseline, share, total_tokens, video.seed)
        answers, kept, seen, peak, wall = run_once(adapter, settings, policy, frames, [q.text for q in group],
                                                   method.query_aware, max_new_tokens)
        out["answers"].update({q.kind: a for q, a in zip(group, answers)})
        out["kept"].append(kept)
        out["seen"], out["peak"], out["wall"] = seen, max(out["peak"], peak), out["wall"] + wall
    out["kept"] = float(np.mean(out["kept"]))
    out["share"] = out["kept"] / max(out["seen"], 1)
    out["correct"] = {q.kind: out["answers"][q.kind] == q.answer for q in questions}
    return out


def write_json(path: Path, meta, summary, rows) -> None:
    """Summary readable, one compact line per video."""
    head = json.dumps(dict(meta=meta, summary=summary), indent=1)[:-2]
    videos = ",\n  ".join(json.dumps(r, separators=(",", ":")) for r in rows)
    path.write_text(f'{head},\n "videos": [\n  {videos}\n ]\n}}\n')


def accuracy(rows, name) -> dict[str, float]:
    scores = {k: float(np.mean([r[name]["correct"][k] for r in rows])) for k in QUESTION_TYPES}
    scores["mean"] = float(np.mean(list(scores.values())))
    return scores


def summarize(rows, methods) -> list[dict]:
    out = []
    for m in methods:
        runs = [r[m.name] for r in rows]
        out.append(dict(name=m.name, label=m.label, query_aware=m.query_aware, matched_to=m.matched_to,
                        accuracy=accuracy(rows, m.name), kept_tokens=float(np.mean([r["kept"] for r in runs])),
                        kept_percent=100 * float(np.mean([r["share"] for r in runs])),
                        peak_cache_kib=float(np.max([r["peak"] for r in runs])) / 1024,
                        seconds_per_video=float(np.mean([r["wall"] for r in runs]))))
    return out


def markdown(meta, summary) -> str:
    full = next((s for s in summary if s["name"] == "full"), None)
    lines = [f"# Fidelity benchmark ({meta['videos']} videos x {meta['frames']} frames)", "",
             f"Model `{meta['model']}` ({meta['layers']} layers), seeds {meta['seeds']}, "
             f"{meta['minutes']} min on this machine. Command: `{meta['command']}`.", "",
             "Accuracy is exact match per question type; kept tokens are video tokens per layer at the end "
             "of the video (mean over layers and videos); peak cache is the largest KV cache during any fold "
             "(committed tokens plus the chunk being folded), over all videos; time is per video, all its "
             "questions included (query-aware methods fold the video once per question). Baselines get, "
             "video by video, the share of tokens the method in 'matched to' kept.", "",
             "| method | needle | count | order | state | mean | vs full | kept tokens | kept % | peak cache KiB "
             "| s/video | matched to |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        a = s["accuracy"]
        delta = f"{100 * (a['mean'] - full['accuracy']['mean']):+.1f}" if full else ""
        lines.append(f"| {s['label']} | " + " | ".join(f"{100 * a[k]:.1f}" for k in (*QUESTION_TYPES, "mean"))
                     + f" | {delta} | {s['kept_tokens']:.0f} | {s['kept_percent']:.1f} | {s['peak_cache_kib']:.0f} "
                     f"| {s['seconds_per_video']:.2f} | {s['matched_to'] or ''} |")
    return "\n".join(lines) + "\n"


def plot(summary, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot written", flush=True)
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, s in enumerate(summary):
        marker = "*" if s["name"].startswith("emloc") else ("s" if s["name"] == "full" else "o")
        ax.scatter(s["kept_percent"], 100 * s["accuracy"]["mean"], marker=marker, s=110 if marker == "*" else 45,
                   label=s["label"], color=plt.cm.tab20(i % 20))
    ax.set_xscale("log")
    ax.set_xlabel("video tokens kept (% of full, log scale)")
    ax.set_ylabel("mean exact-match accuracy (%)")
    ax.set_title("Accuracy vs tokens kept (synthetic long-video task)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
