"""Query-agnostic retention: which scorer should rank a chunk's tokens when the questions come
only after the video (a live camera, an MQTT client)?

    python benchmarks/agnostic.py --videos 60                       # 256 frames, every scorer
    python benchmarks/agnostic.py --videos 16 --frames 1024 --tag 1024
    python benchmarks/agnostic.py --needle --videos 10               # 4,096 frames, budget 10%, needle early
    python benchmarks/agnostic.py --drift --videos 8 --frames 1024   # the counting drift, chunk by chunk
    python benchmarks/agnostic.py --suite camera ...                 # the camera-like suite and its model
    python benchmarks/agnostic.py --suite camera --needle --methods full default

Held-out seeds (3_000_000 + i for the synthetic suite: never trained on). Every video is
written to H.264, decoded, sampled, chunked and folded through `stream.job.answer_video`
with the questions asked only after the whole video (one cache answers them all). Every EMLoC
row uses the paper's online search (layer groups of L/2, delta 0.04, ratios 0.02/0.1/0.5/1)
and differs only in the scorer that ranks the tokens and in the observer whose output the JS
bound protects. Uniform frames get, video by video, the share the default kept. Each row also
says how much of the needle (the tokens showing the triangle) the cache still held when the
questions came: a needle that was kept but answered wrong is the model's miss, not pruning's.

Writes agnostic[-TAG].json/.md/.png to --out (docs/benchmarks by default).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
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
from emloc.observer import js_divergence  # noqa: E402
from emloc.policies import KeepAll, UniformFrames  # noqa: E402
from emloc.settings import EMLoCSettings, videomme_online  # noqa: E402
from stream.job import answer_video  # noqa: E402
from stream.models import SHIPPED  # noqa: E402
from stream.sources import VideoFile, write_video  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SUITES = {"synthetic": ("stream.suites.synthetic", "emloc-tiny-qwen2vl", 3_000_000),
          "camera": ("stream.suites.camera", "emloc-tiny-camera", 3_000_000)}
ANSWER = 16  # probe_answer_tokens of the observer rows that carry the model's own answer
FINE = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0)  # a finer ratio ladder than the paper's 0.02/0.1/0.5/1


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    settings: tuple[tuple[str, object], ...] = ()  # overrides of the paper's online preset
    baseline: str | None = None  # "keep_all" or "uniform_frames"; None = EMLoC's search
    default: bool = False  # the library's default settings (EMLoCSettings()), groups scaled


def M(name, label, **settings):
    """An EMLoC row: the probe + its own answer observes (the bound), `scorer` ranks, finer ratios."""
    return Method(name, label, tuple({"probe_answer_tokens": ANSWER, "ratios": FINE, **settings}.items()))


METHODS = [
    Method("full", "full context", baseline="keep_all"),
    Method("paper", "paper: probe observer, observer attention, ratios 0.02/0.1/0.5/1"),
    M("observer_cli", "probe + own answer, ratios 0.02/0.1/0.5/1 (the old CLI default)", ratios=(0.02, 0.1, 0.5, 1.0)),
    M("observer", "probe + own answer, observer attention"),
    M("template", "template proxy query", scorer="template"),
    M("tar", "temporal novelty (TaR)", scorer="tar"),
    M("van", "value norm (VaN)", scorer="van"),
    M("keydiff", "key diversity (KeyDiff)", scorer="keydiff"),
    M("observer_cov", "observer + coverage floor (4)", coverage_buckets=4),
    M("tar_cov", "TaR + coverage floor (4)", scorer="tar", coverage_buckets=4),
    M("tar_observer", "TaR + observer", scorer="tar+observer"),
    M("tar_van", "TaR + VaN", scorer="tar+van"),
    M("tar_keydiff", "TaR + KeyDiff", scorer="tar+keydiff"),
    M("tar_observer_cov", "TaR + observer + coverage (4)", scorer="tar+observer",
      coverage_buckets=4),
    M("tar_paper", "TaR, paper's probe bound (no answer)", scorer="tar", probe_answer_tokens=0),
    M("observer_merge", "observer + merging", merge_dropped=True),
    M("template_merge", "template + merging", scorer="template", merge_dropped=True),
    M("tar_merge", "TaR + merging", scorer="tar", merge_dropped=True),
    M("keydiff_merge", "KeyDiff + merging", scorer="keydiff", merge_dropped=True),
    M("tar_keydiff_merge", "TaR + KeyDiff + merging", scorer="tar+keydiff", merge_dropped=True),
    M("tar_observer_merge", "TaR + observer + merging", scorer="tar+observer", merge_dropped=True),
    Method("default", "default: TaR + KeyDiff + merging (EMLoCSettings())", default=True),
    Method("default_decode", "default with a fresh 16-token probe answer every chunk (the default until "
           "issue 25; now the answer is carried)", (("probe_answer_refresh", "decode"),), default=True),
    Method("default_carry_start", "default, the answer decoded on the first chunk, then carried",
           (("probe_answer_refresh", "carry_start"),), default=True),
    Method("uniform", "uniform frames at the default's share", baseline="uniform_frames"),
]
NEEDLE_METHODS = ["full", "default", "observer", "paper", "tar", "uniform"]


def settings_for(method: Method, layers: int, budget: int | None = None) -> EMLoCSettings:
    group = layers // 2 if layers % 2 == 0 else 1
    base = EMLoCSettings(layer_group_size=group) if method.default else videomme_online(layer_group_size=group)
    return replace(base, **dict(method.settings), token_budget=budget, temporal_range=_temporal_range)


def needle_tokens(video, tokens_per_step: int) -> np.ndarray:
    """The video tokens (index after the preamble, in stream order) that show the needle: the
    synthetic triangle's cell, or a camera token whose 28 x 28 block the triangle covers at least
    a quarter of (from the generator's owner map)."""
    triangle = next(i for i, e in enumerate(video.events) if e.shape == "triangle")
    if hasattr(video, "owner"):
        steps, h, w = video.owner.shape
        cover = (video.owner == 2 + triangle).reshape(steps, h // 28, 28, w // 28, 28).mean((2, 4))
        return np.flatnonzero(cover.reshape(steps, -1) >= 0.25)
    event = video.events[triangle]
    return np.array([event.step * tokens_per_step + event.cell])


def needle_kept(context, needle: np.ndarray) -> float:
    """Share of the needle's tokens still in the cache, averaged over layers and KV heads (nan when
    the needle covers no token a quarter full: a small triangle straddling four tokens)."""
    if not len(needle):
        return float("nan")
    shares = []
    for layer in context.cache.layers:
        origins = (layer.committed_origins()[0] - context.sink_tokens).cpu().numpy()
        shares += [float(np.isin(needle, head).mean()) for head in origins]
    return float(np.mean(shares))


def run_method(adapter, method, frames, questions, share, budget, needle=None):
    """One context over the video, questions after it. Returns the row for this method."""
    settings = settings_for(method, adapter.num_layers, budget)
    policy = KeepAll() if method.baseline == "keep_all" else (
        UniformFrames(min(1.0, max(share, 1e-3))) if method.baseline == "uniform_frames" else None)
    context = StreamContext(adapter, settings=settings, policy=policy)
    records = []
    clock = time.perf_counter()
    answers = answer_video(context, frames, [q.text for q in questions], query_aware=False, max_new_tokens=4,
                           on_fold=records.append)
    wall = time.perf_counter() - clock
    layers = adapter.num_layers
    seen, kept = context.video_tokens_seen(), context.video_tokens_kept()
    per_token = context.cache.nbytes() / max(sum(context.cache.lengths()), 1)
    peak = max(per_token * (sum(r.tokens_before) + layers * r.chunk_tokens) for r in records)
    times = {k: float(sum(getattr(r, k) for r in records)) for k in
             ("vision_s", "prefill_s", "observe_s", "score_s", "search_s")}
    return dict(answers={q.kind: a.text.strip() for q, a in zip(questions, answers)},
                correct={q.kind: a.text.strip() == q.answer for q, a in zip(questions, answers)},
                kept=kept, share=kept / max(seen, 1), peak=peak, wall=wall, times=times,
                needle_kept=None if needle is None else needle_kept(context, needle))


def drift_curve(adapter, method, frames, questions, chunk_frames):
    """JS (nats) between the answer distributions of the 4 questions over the compressed cache and
    over the full context, after each chunk: how far the compressed stream has drifted."""
    full = StreamContext(adapter, settings=settings_for(method, adapter.num_layers), policy=KeepAll())
    pruned = StreamContext(adapter, settings=settings_for(method, adapter.num_layers))
    curve = []
    images = np.stack([f.image for f in frames])
    for start in range(0, len(images) - chunk_frames + 1, chunk_frames):
        chunk = images[start:start + chunk_frames]
        full.fold(chunk)
        pruned.fold(chunk)
        values = []
        for q in questions:
            p = full.answer(q.text, max_new_tokens=1, return_logits=True).prompt_logits[-1:]
            r = pruned.answer(q.text, max_new_tokens=1, return_logits=True).prompt_logits[-1:]
            values.append(js_divergence(torch.log_softmax(p, -1), torch.log_softmax(r, -1)))
        curve.append(float(np.mean(values)))
    return curve


_adapter = None
_temporal_range = None  # every row's EMLoCSettings.temporal_range (None: the model's)


def _init_worker(model: str, temporal_range: int | None = None) -> None:
    global _adapter, _temporal_range
    torch.set_num_threads(1)
    _adapter = load_adapter(model)
    _temporal_range = temporal_range


def _run_video(job) -> dict:
    suite, seed, frames_count, names, needle, drift = job
    generator = importlib.import_module(SUITES[suite][0])
    options = dict(needle_before=0.05) if needle else {}
    video = generator.make_video(seed, frames=frames_count, **options)
    with TemporaryDirectory() as tmp:
        path = write_video(Path(tmp) / f"{seed}.mp4", video.frames, fps=video.fps)
        frames = list(VideoFile(path).frames(fps=video.fps))
    questions = list(video.questions)
    row = dict(seed=seed, layers=_adapter.num_layers, truth={q.kind: q.answer for q in questions})
    if drift:
        for name in names:
            method = next(m for m in METHODS if m.name == name)
            row[name] = dict(drift=drift_curve(_adapter, method, frames, questions,
                                               settings_for(method, _adapter.num_layers).chunk_frames))
        return row
    per_step = _adapter.encode_video(_adapter.preprocess(np.stack([f.image for f in frames[:2]]))).shape[1]
    total = per_step * ((len(frames) + 1) // 2)
    budget = int(0.1 * total) if needle else None
    row["video_tokens"], row["budget"] = total, budget
    needle_at = needle_tokens(video, per_step)
    default_share = 1.0
    for name in names:  # the default runs before uniform (it sets uniform's share)
        method = next(m for m in METHODS if m.name == name)
        row[name] = run_method(_adapter, method, frames, questions, default_share,
                               None if method.baseline == "keep_all" else budget, needle_at)
        if name == "default":
            default_share = row[name]["share"]
    return row


def question_kinds(rows) -> list[str]:
    return list(rows[0]["truth"])


def accuracy(rows, name) -> dict[str, float]:
    scores = {k: float(np.mean([r[name]["correct"][k] for r in rows])) for k in question_kinds(rows)}
    scores["mean"] = float(np.mean(list(scores.values())))
    return scores


def summarize(rows, names) -> list[dict]:
    out = []
    for name in names:
        method = next(m for m in METHODS if m.name == name)
        runs = [r[name] for r in rows]
        times = {k: float(np.mean([x["times"][k] for x in runs])) for k in runs[0]["times"]}
        needle = [x.get("needle_kept") for x in runs]
        missed = [x.get("needle_kept") for x in runs if not x["correct"]["needle"]]
        out.append(dict(name=name, label=method.label, accuracy=accuracy(rows, name),
                        needle_kept_percent=_percent(needle), needle_kept_when_missed_percent=_percent(missed),
                        kept_percent=100 * float(np.mean([x["share"] for x in runs])),
                        peak_cache_kib=float(np.max([x["peak"] for x in runs])) / 1024,
                        seconds_per_video=float(np.mean([x["wall"] for x in runs])), fold_times=times))
    return out


def _percent(values) -> float | None:
    values = [v for v in values if v is not None and v == v]
    return 100 * float(np.mean(values)) if values else None


def markdown(meta, summary) -> str:
    kinds = meta["kinds"]
    full = next((s for s in summary if s["name"] == "full"), None)
    title = "needle under a hard budget" if meta["needle"] else "query-agnostic retention"
    lines = [f"### {title}: {meta['suite']} suite, {meta['videos']} videos x {meta['frames']} frames", "",
             f"Model `{meta['model']}`, seeds {meta['seeds']}, {meta['minutes']} min. "
             f"Command: `{meta['command']}`." + (f" Budget: 10% of the video tokens per layer "
                                                  f"({meta['budget']} tokens)." if meta["needle"] else ""), "",
             "Fold time per video (s): vision + prefill (the model's own work), observe (observer passes, "
             "the probe's own answer included), score (the scorer), search (JS-bounded search); scorer "
             "overhead = score / (vision + prefill + observe + search). Needle kept: share of the tokens "
             "showing the needle still in the cache when the questions come (mean over layers and KV heads), "
             "over all videos / over the videos whose needle question was answered wrong.", "",
             "| method | " + " | ".join(kinds) + " | mean | vs full | kept % | needle kept % (all / missed) "
             "| peak KiB | vision+prefill | observe | score | search | scorer overhead |",
             "|---" * (len(kinds) + 11) + "|"]
    for s in summary:
        a, t = s["accuracy"], s["fold_times"]
        delta = f"{100 * (a['mean'] - full['accuracy']['mean']):+.1f}" if full else ""
        base = t["vision_s"] + t["prefill_s"] + t["observe_s"] + t["search_s"]
        lines.append(f"| {s['label']} | " + " | ".join(f"{100 * a[k]:.1f}" for k in (*kinds, "mean"))
                     + f" | {delta} | {s['kept_percent']:.1f} | {_fmt(s.get('needle_kept_percent'))} / "
                     f"{_fmt(s.get('needle_kept_when_missed_percent'))} | {s['peak_cache_kib']:.0f} "
                     f"| {t['vision_s'] + t['prefill_s']:.3f} | {t['observe_s']:.3f} | {t['score_s']:.3f} "
                     f"| {t['search_s']:.3f} | {100 * t['score_s'] / max(base, 1e-9):.1f}% |")
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.0f}"


def drift_markdown(meta, rows, names) -> str:
    lines = [f"### Drift: {meta['suite']} suite, {meta['videos']} videos x {meta['frames']} frames", "",
             f"Mean JS (nats) between the answer distributions (4 questions) over the compressed cache and "
             f"over the full context, after each chunk. Command: `{meta['command']}`.", "",
             "| method | " + " | ".join(f"chunk {i + 1}" for i in range(len(rows[0][names[0]]["drift"]))) + " |",
             "|---" * (1 + len(rows[0][names[0]]["drift"])) + "|"]
    for name in names:
        curve = np.mean([r[name]["drift"] for r in rows], axis=0)
        lines.append(f"| {name} | " + " | ".join(f"{v:.4f}" for v in curve) + " |")
    return "\n".join(lines) + "\n"


def plot(summary, path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot written", flush=True)
        return
    fig, ax = plt.subplots(figsize=(10.5, 4.8))
    for i, s in enumerate(summary):
        marker = {"full": "s", "uniform": "D", "default": "*"}.get(s["name"], "o")
        ax.scatter(s["kept_percent"], 100 * s["accuracy"]["mean"], marker=marker, s=160 if marker == "*" else 45,
                   label=s["label"], color=plt.cm.tab20(i % 20))
    ax.set_xscale("log")
    ax.set_xlabel("video tokens kept (% of full, log scale)")
    ax.set_ylabel("mean exact-match accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")


def resolve_model(parser, model: str | None, model_dir: str) -> tuple[str, str]:
    """The model folder (`--model`, else the suite's in models/) and how the saved figures name it
    (relative to the repository when inside it); a parser error when there is none."""
    model = model or str(SHIPPED / model_dir)
    if not Path(model).is_dir():
        parser.error(f"no model at {model}")
    path = Path(model).resolve()
    return model, str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), default="synthetic")
    parser.add_argument("--model", help="default: the suite's model in models/")
    parser.add_argument("--videos", type=int, default=60)
    parser.add_argument("--frames", type=int, help="default 256 (4,096 with --needle)")
    parser.add_argument("--methods", nargs="+")
    parser.add_argument("--needle", action="store_true", help="4,096 frames, budget 10%%, needle in the first 5%%")
    parser.add_argument("--drift", action="store_true", help="JS to full context after every chunk")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--temporal-range", type=int, help="EMLoCSettings.temporal_range for every row (default: "
                        "the model's: 256 / 128 for the synthetic / camera model; 0: positions never compressed, "
                        "as before)")
    parser.add_argument("--tag", default="", help="suffix of the output files")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    parser.add_argument("--combine", type=Path, nargs="+", help="join saved runs on the same seeds into one table")
    args = parser.parse_args(argv)
    if args.combine:
        return combine(args.combine, args.out / ("agnostic" + (f"-{args.tag}" if args.tag else "")))
    module, model_dir, seeds = SUITES[args.suite]
    try:
        generator = importlib.import_module(module)
    except ImportError:
        parser.error(f"the {args.suite} suite needs {module}, which this checkout does not have")
    if args.needle and "needle_before" not in inspect.signature(generator.make_video).parameters:
        parser.error(f"{module}.make_video cannot place the needle early (no needle_before)")
    model, model_label = resolve_model(parser, args.model, model_dir)
    frames = args.frames or (4096 if args.needle else 256)
    names = args.methods or (NEEDLE_METHODS if args.needle else ["default", "paper", "observer"] if args.drift
                             else [m.name for m in METHODS])
    names = sorted(names, key=lambda n: n != "default")  # the default first: uniform is matched to it
    unknown = set(names) - {m.name for m in METHODS}
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}")
    if "uniform" in names and "default" not in names:
        parser.error("uniform is matched to the default's share: run 'default' too")
    print(f"{args.suite} suite, model {model}; {args.videos} videos x {frames} frames; methods {names}", flush=True)
    jobs = [(args.suite, seeds + i, frames, tuple(names), args.needle, args.drift) for i in range(args.videos)]
    rows, started = [], time.time()
    with multiprocessing.get_context("spawn").Pool(args.workers, _init_worker, (model, args.temporal_range)) as pool:
        for row in pool.imap_unordered(_run_video, jobs):
            rows.append(row)
            if not args.drift:
                line = " ".join(f"{n}={accuracy(rows, n)['mean']:.2f}" for n in names)
                print(f"[{len(rows)}/{args.videos}, {(time.time() - started) / 60:.1f} min] {line}", flush=True)
    rows.sort(key=lambda r: r["seed"])
    stem = "agnostic" + (f"-{args.tag}" if args.tag else "")
    meta = dict(suite=args.suite, model=model_label, videos=args.videos, frames=frames, needle=args.needle,
                seeds=f"{seeds}..{seeds + args.videos - 1}", kinds=question_kinds(rows),
                budget=rows[0].get("budget"), minutes=round((time.time() - started) / 60, 1),
                command="python benchmarks/agnostic.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.drift:
        text = drift_markdown(meta, rows, names)
        summary = {n: np.mean([r[n]["drift"] for r in rows], axis=0).tolist() for n in names}
    else:
        summary = summarize(rows, names)
        text = markdown(meta, summary)
        plot(summary, args.out / f"{stem}.png", f"Questions after the video: {args.suite}, {frames} frames")
    videos = ",\n  ".join(json.dumps(r, separators=(",", ":")) for r in rows)
    head = json.dumps(dict(meta=meta, summary=summary), indent=1)[:-2]
    (args.out / f"{stem}.json").write_text(f'{head},\n "videos": [\n  {videos}\n ]\n}}\n')
    (args.out / f"{stem}.md").write_text(text)
    print(text)


def combine(paths: list[Path], stem: Path) -> None:
    """One table from runs over the same seeds (methods in METHODS order; first run's meta)."""
    saved = [json.loads(p.read_text()) for p in paths]
    rows = {r["seed"]: dict(r) for r in saved[0]["videos"]}
    for other in saved[1:]:
        for r in other["videos"]:
            if r["seed"] in rows:
                rows[r["seed"]].update({k: v for k, v in r.items() if isinstance(v, dict) and "correct" in v})
    names = [m.name for m in METHODS if all(m.name in r for r in rows.values())]
    rows = [rows[s] for s in sorted(rows)]
    meta = dict(saved[0]["meta"], videos=len(rows), minutes=sum(x["meta"]["minutes"] for x in saved),
                command=" ; ".join(x["meta"]["command"] for x in saved))
    summary = summarize(rows, names)
    text = markdown(meta, summary)
    plot(summary, stem.with_suffix(".png"), f"Questions after the video: {meta['suite']}, {meta['frames']} frames")
    videos = ",\n  ".join(json.dumps(r, separators=(",", ":")) for r in rows)
    head = json.dumps(dict(meta=meta, summary=summary), indent=1)[:-2]
    stem.with_suffix(".json").write_text(f'{head},\n "videos": [\n  {videos}\n ]\n}}\n')
    stem.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
