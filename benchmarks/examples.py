"""Many-shot adaptation with task packs: a miniature of the paper's ImageNet100 table.

    python benchmarks/examples.py                               # 0/10/50/200 examples, every method
    python benchmarks/examples.py --episodes 8 --counts 0 10 --out /tmp/ex

Held-out few-shot episodes (stream/suites/examples.py, seeds 2_000_000 + i: never trained on,
never used to pick the checkpoint): 8 object classes named with fresh nonsense words, so the
answer is only in the examples (zero examples: chance). For each episode and example count the
first `count` examples become a task pack, built with each method; then each of the episode's
4 query clips is asked `what is this ?` over a stream that starts from the pack (the clip
prefilled unpruned for the answer, so only the pack's compression differs between rows):

- full context: every ratio 1.0 (nothing pruned);
- EMLoC layer-wise: the paper's many-shot preset (many_shot(): layer-wise, delta 0.005, ratios
  0.1/0.2/0.5/1.0, chunks of 20, observers held-out examples, their answers observed);
- EMLoC group-wise: the same with layer groups of 2 (half the layers per group);
- uniform / random at equal budget: per chunk, evenly spaced whole examples / random tokens, at
  the share of the examples' tokens EMLoC layer-wise kept for that episode.

Reports accuracy (exact match), tokens kept (% of the examples' tokens, averaged over layers),
pack build time (prefill; observers + search), cache size. Writes examples.json/.md/.png to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emloc import StreamContext, TaskExample, TaskPack, load_adapter, many_shot  # noqa: E402
from emloc.policies import RandomTokens, UniformFrames  # noqa: E402
from stream.models import EXAMPLES_MODEL  # noqa: E402
from stream.suites import examples as synthetic_examples  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SEEDS = 2_000_000
METHODS = {"full": "full context", "layer": "EMLoC layer-wise", "group": "EMLoC group-wise (2 layers)",
           "uniform": "uniform examples, equal budget", "random": "random tokens, equal budget"}


def pack_for(adapter, examples, method: str, share: float | None, seed: int, overrides: dict):
    """overrides: of many_shot() for the EMLoC rows (--delta, --observers)."""
    if method == "full":
        return TaskPack.build(adapter, examples, many_shot(ratios=(1.0,)))
    if method == "layer":
        return TaskPack.build(adapter, examples, many_shot(**overrides))
    if method == "group":
        return TaskPack.build(adapter, examples, many_shot(layer_groups=2, **overrides))
    policy = UniformFrames(share) if method == "uniform" else RandomTokens(share, seed=seed)
    return TaskPack.build(adapter, examples, many_shot(), policy=policy)


def run_episode(adapter, seed: int, count: int, methods: list[str], overrides: dict) -> list[dict]:
    episode = synthetic_examples.make_episode(seed, examples=count, classes=8, queries=4)
    examples = [TaskExample(e.frames, e.question, e.label) for e in episode.examples]
    rows, share = [], None
    for method in methods:
        if count == 0 and method != "full":
            continue
        clock = time.perf_counter()
        pack = pack_for(adapter, examples, method, share, seed, overrides) if count else None
        build_s = time.perf_counter() - clock
        m = pack.manifest if pack else {}
        if method == "layer":
            share = max(m["kept_fraction"], 0.01)
        context_bytes = 0
        correct = 0
        for query in episode.queries:
            context = StreamContext(adapter, settings=many_shot(), task=pack)
            context_bytes = context.cache.nbytes()
            answer = context.answer(query.question, partial_frames=query.frames, max_new_tokens=4)
            correct += answer.text.strip() == query.label
        rows.append(dict(seed=seed, count=count, method=method, correct=correct, asked=len(episode.queries),
                         kept=m.get("kept_fraction", 1.0 if count == 0 else None),
                         example_tokens=m.get("example_tokens", 0), build_s=round(build_s, 3),
                         prefill_s=m.get("prefill_s", 0.0), search_s=m.get("search_s", 0.0),
                         cache_bytes=context_bytes))
    return rows


def summarize(rows: list[dict], methods: list[str], counts: list[int]) -> list[dict]:
    out = []
    for count in counts:
        for method in methods:
            mine = [r for r in rows if r["count"] == count and r["method"] == method]
            if not mine:
                continue
            asked = sum(r["asked"] for r in mine)
            kept = [r["kept"] for r in mine if r["kept"] is not None]
            out.append(dict(count=count, method=method, label=METHODS[method], asked=asked,
                            accuracy=round(100 * sum(r["correct"] for r in mine) / asked, 1),
                            kept=round(100 * sum(kept) / len(kept), 1) if kept else None,
                            example_tokens=round(sum(r["example_tokens"] for r in mine) / len(mine)),
                            prefill_s=round(sum(r["prefill_s"] for r in mine) / len(mine), 3),
                            search_s=round(sum(r["search_s"] for r in mine) / len(mine), 3),
                            cache_kib=round(sum(r["cache_bytes"] for r in mine) / len(mine) / 1024, 1)))
    return out


def markdown(meta: dict, summary: list[dict]) -> str:
    lines = [f"# Task packs: accuracy against the number of examples ({meta['model']})", "",
             f"`{meta['command']}`", "",
             f"{meta['episodes']} held-out episodes (seeds {SEEDS}+), 8 classes with fresh names, 4 queries each "
             f"({meta['episodes'] * 4} questions per cell); chance 12.5% with examples (one of the 8 names), "
             f"~5% without (one of 20). EMLoC rows: delta {meta['delta']}, {meta.get('observers', 4)} observers a "
             f"chunk. {meta['minutes']} min on {meta['threads']} CPU threads.", "",
             "| examples | method | accuracy | kept % of example tokens | example tokens | prefill s | "
             "observers + search s | cache KiB |", "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        kept = "-" if s["kept"] is None else f"{s['kept']:.1f}"
        lines.append(f"| {s['count']} | {s['label']} | {s['accuracy']:.1f} | {kept} | {s['example_tokens']} | "
                     f"{s['prefill_s']:.2f} | {s['search_s']:.2f} | {s['cache_kib']:.0f} |")
    lines += ["", f"![accuracy against examples]({meta.get('png', 'examples.png')})", ""]
    return "\n".join(lines)


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for method, label in METHODS.items():
        points = [(s["count"], s["accuracy"]) for s in summary if s["method"] == method or
                  (s["count"] == 0 and s["method"] == "full")]
        if points:
            ax.plot(*zip(*sorted(points)), marker="o", label=label)
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlabel("examples in the pack")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(EXAMPLES_MODEL))
    parser.add_argument("--episodes", type=int, default=25)
    parser.add_argument("--counts", type=int, nargs="+", default=[0, 10, 50, 200])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--delta", type=float, help="JS bound of the EMLoC rows (default: many_shot's 0.005)")
    parser.add_argument("--observers", type=int, help="held-out examples observing each chunk (default: many_shot's)")
    parser.add_argument("--tag", default="", help="suffix of the output files")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("delta", args.delta), ("max_observers", args.observers)) if v is not None}
    torch.set_num_threads(args.threads)
    adapter = load_adapter(args.model)
    methods = ["layer"] + [m for m in args.methods if m != "layer"] if "layer" in args.methods else args.methods
    started, rows = time.time(), []
    for count in args.counts:
        for i in range(args.episodes):
            rows += run_episode(adapter, SEEDS + i, count, methods, overrides)
        done = [s for s in summarize(rows, methods, [count])]
        print(" | ".join(f"{count} {s['method']} {s['accuracy']:.1f}% kept {s['kept']}" for s in done), flush=True)
    summary = summarize(rows, [m for m in METHODS if m in methods], args.counts)
    meta = dict(model=Path(args.model).name, episodes=args.episodes, counts=args.counts, threads=args.threads,
                delta=args.delta if args.delta is not None else many_shot().delta,
                observers=args.observers or many_shot().max_observers,
                minutes=round((time.time() - started) / 60, 1),
                command="python benchmarks/examples.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / ("examples" + (f"-{args.tag}" if args.tag else ""))
    meta["png"] = stem.name + ".png"
    stem.parent.joinpath(stem.name + ".json").write_text(json.dumps(dict(meta=meta, summary=summary, rows=rows),
                                                                    indent=1) + "\n")
    stem.parent.joinpath(stem.name + ".md").write_text(markdown(meta, summary))
    plot(summary, stem.parent / (stem.name + ".png"))
    print(markdown(meta, summary))


if __name__ == "__main__":
    main()
