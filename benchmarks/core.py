"""EMLoC core cost on the tiny model: tokens kept per layer group, prefill time, search time.

    python benchmarks/core.py                      # prints a table, writes docs/benchmarks/core.{md,json}
    python benchmarks/core.py --chunk-frames 8 32 --chunks 4

Prefill = vision tower + chunk prefill through all layers; search = the observer pass plus
every candidate re-run. Both are measured in the same run for each chunk size, on random
frames (the tiny model's weights are random, so the kept fractions describe the code path,
not a trained model's behaviour).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emloc import StreamContext, videomme_online  # noqa: E402
from emloc.tiny import tiny_qwen2_vl, tiny_tokenizer  # noqa: E402


def run(chunk_frames: int, chunks: int, size: int, layers: int, hidden: int, seed: int) -> dict:
    tokenizer = tiny_tokenizer()
    model = tiny_qwen2_vl(tokenizer, layers=layers, hidden=hidden, heads=4, kv_heads=2, init_std=0.1, seed=seed)
    # the online preset's bound and ratios, with two layer groups as Qwen2-VL-7B has (28 layers / 14)
    settings = videomme_online(layer_groups=2, chunk_frames=chunk_frames)  # the paper's method
    context = StreamContext(model, tokenizer, settings)
    rng = np.random.default_rng(seed)
    context.fold(rng.integers(0, 256, (chunk_frames, size, size, 3), dtype=np.uint8))  # warm-up
    records = [context.fold(rng.integers(0, 256, (chunk_frames, size, size, 3), dtype=np.uint8))
               for _ in range(chunks)]
    prefill = [r.vision_s + r.prefill_s for r in records]
    search = [r.observe_s + r.search_s for r in records]
    groups = {}
    for record in records:
        for g in record.groups:
            groups.setdefault(f"L{g.first}-{g.last}", []).append(g.kept / record.chunk_tokens)
    return {
        "chunk_frames": chunk_frames,
        "chunk_tokens": records[0].chunk_tokens,
        "kept_fraction_by_group": {k: round(statistics.mean(v), 4) for k, v in sorted(groups.items())},
        "kept_fraction": round(statistics.mean(r.kept_fraction for r in records), 4),
        "prefill_s": round(statistics.median(prefill), 5),
        "search_s": round(statistics.median(search), 5),
        "search_over_prefill": round(statistics.median(s / p for s, p in zip(search, prefill)), 3),
        "candidates_per_chunk": round(statistics.mean(r.evaluations for r in records), 2),
        "cache_tokens_per_layer_end": round(statistics.mean(context.cache.lengths()), 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunk-frames", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--chunks", type=int, default=5, help="chunks measured per size (after one warm-up)")
    parser.add_argument("--size", type=int, default=112, help="frame side in pixels (112 -> 16 tokens per pair)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "benchmarks")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    rows = [run(f, args.chunks, args.size, args.layers, args.hidden, args.seed) for f in args.chunk_frames]
    header = ("| frames/chunk | tokens/chunk | kept % per group | kept % | prefill s | search s "
              "| search/prefill | candidates |")
    lines = [header, "|" + "---|" * 8]
    for r in rows:
        per_group = ", ".join(f"{k}: {100 * v:.1f}" for k, v in r["kept_fraction_by_group"].items())
        lines.append(f"| {r['chunk_frames']} | {r['chunk_tokens']} | {per_group} | {100 * r['kept_fraction']:.1f} "
                     f"| {r['prefill_s']:.4f} | {r['search_s']:.4f} | {r['search_over_prefill']:.2f} "
                     f"| {r['candidates_per_chunk']} |")
    table = "\n".join(lines)
    print(table)

    meta = {"command": "python benchmarks/core.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "model": f"tiny Qwen2-VL, {args.layers} layers, hidden {args.hidden}, random weights (init std 0.1)",
            "frame_size": args.size, "chunks_per_size": args.chunks, "date": time.strftime("%Y-%m-%d")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "core.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (args.out / "core.md").write_text(
        "# EMLoC core cost (tiny model, CPU)\n\n"
        f"`{meta['command']}` — {meta['model']}; {args.size}x{args.size} frames; median of {args.chunks} chunks "
        f"per size; torch {meta['torch']}, {meta['threads']} threads; {meta['date']}.\n\n"
        "Settings: the paper's online bound and ratios (delta 0.04, ratios 0.02/0.1/0.5/1.0), two layer groups.\n"
        "Prefill = vision tower + chunk prefill; search = observer pass + candidate re-runs.\n\n" + table + "\n")


if __name__ == "__main__":
    main()
