"""What a fold costs in the units a GPU pays for, on any hardware: sequential decoder-layer calls and
tokens x layers per chunk, for full context, the default and the paper's preset.

    python benchmarks/search_cost.py                      # this tree's code
    python benchmarks/search_cost.py --before 83bf69f     # and the code of that commit, side by side

A GPU runs a pass of 30 tokens about as long as a pass of 3,000 (each layer is a round of kernel
launches), so the count of sequential layer calls, not FLOPs, is what made the default's search
cost 3x the prefill on an H200 while the same shapes cost 0.19x on a CPU. Counted with forward hooks
on the decoder layers, so the code of an older commit (`--before`, run from a git worktree of it in
a subprocess) is counted the same way. Two models: the shipped `emloc-tiny-qwen2vl` on a synthetic
video (4 layers, groups of 2), and the Qwen2-VL-7B layout (28 layers, groups of 14, 144 tokens a
frame pair) with narrow random layers, whose counts are the 7B's (they depend on the layer count and
the search's choices, not on the width; no variant here has a group of one layer, whose one-layer
passes the step count below would join to the pass before). CPU seconds are printed too, for the record only, and each
variant runs in a process of its own, whose kernel high-water mark (ru_maxrss) is its peak memory.

Writes search_cost.json/.md to --out (docs/benchmarks by default).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CODE = Path(os.environ.get("SEARCH_COST_CODE", ROOT))  # whose emloc/ to measure (a worktree for --before)
sys.path.insert(0, str(CODE))
if CODE != ROOT:  # an editable install's finder would import this tree's emloc whatever the path says
    sys.meta_path = [f for f in sys.meta_path if "editable" not in (getattr(f, "__module__", "") or "").lower()]

from emloc import EMLoCSettings, StreamContext, load_adapter  # noqa: E402
from emloc.policies import KeepAll  # noqa: E402
from emloc.settings import videomme_online  # noqa: E402
from stream.models import DEFAULT_MODEL  # noqa: E402


def counted(adapter):
    """Forward hooks on every decoder layer: a dict with `calls` (sequential layer steps), `forwards` (the
    layers' forward calls) and `token_layers` so far. A long prefill over merged tokens runs a layer's rows
    in blocks of 1,024 one after another (`emloc.forward.QUERY_BLOCK`, for the mask's memory): those
    consecutive forwards of one layer are one step, each block a full-width pass, not a launch-bound one."""
    work = {"calls": 0, "forwards": 0, "token_layers": 0, "last": None}

    def hook_for(index):
        def hook(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            work["calls"] += work["last"] != index
            work["forwards"] += 1
            work["token_layers"] += hidden.shape[1]
            work["last"] = index
        return hook

    layers = adapter._decoder.layers
    handles = [layer.register_forward_hook(hook_for(i), with_kwargs=True) for i, layer in enumerate(layers)]
    return work, handles


def variants(layers: int) -> dict:
    """name -> (settings, policy); names that this code cannot build are left out."""
    group = layers // 2
    out = {"full context": (EMLoCSettings(layer_group_size=group), KeepAll()),
           "default": (EMLoCSettings(layer_group_size=group), None),
           "paper preset (videomme_online)": (videomme_online(layer_group_size=group), None)}
    if "probe_answer_refresh" in EMLoCSettings.__dataclass_fields__:  # the old observer on this code
        from emloc.policies import JSBoundedSearch

        old = EMLoCSettings(layer_group_size=group, probe_answer_refresh="decode")
        out["default, old observer and search (fresh answer, a pass per ratio)"] = (
            old, JSBoundedSearch(group, old.delta, old.ratios, one_pass=False))
    return out


def video_frames(kind: str, frames: int):
    if kind == "tiny":
        from stream.suites.synthetic import make_video

        return make_video(3_000_000, frames=frames).frames
    generator = torch.Generator().manual_seed(0)  # 336x336: 144 tokens a frame pair, as the 7B reads video
    return torch.randint(0, 256, (frames, 336, 336, 3), dtype=torch.uint8, generator=generator).numpy()


def model(kind: str):
    if kind == "tiny":
        return load_adapter(str(DEFAULT_MODEL))
    sys.path.insert(0, str(CODE / "benchmarks"))
    from gpu_scale import REDUCED, build  # the 7B layout with narrow layers

    return build(REDUCED, torch.device("cpu"), torch.float32)


def measure(kind: str, frames: int, index: int) -> dict | None:
    """The `index`-th variant on `kind`, alone in this process (its peak memory is the process's);
    None when this code has fewer variants."""
    adapter = model(kind)
    named = list(variants(adapter.num_layers).items())
    if index >= len(named):
        return None
    video = video_frames(kind, frames)
    rows = []
    for name, (settings, policy) in named[index:index + 1]:
        context = StreamContext(adapter, settings=settings, policy=policy)
        work, handles = counted(adapter)
        per_chunk, clock = [], time.perf_counter()
        try:
            for start in range(0, len(video), settings.chunk_frames):
                before = dict(work)
                record = context.fold(video[start:start + settings.chunk_frames])
                work["last"] = None  # the next fold starts a new step
                per_chunk.append(dict(calls=work["calls"] - before["calls"],
                                      forwards=work["forwards"] - before["forwards"],
                                      token_layers=work["token_layers"] - before["token_layers"],
                                      kept=record.kept_fraction, chunk_tokens=record.chunk_tokens,
                                      prefill_s=record.vision_s + record.prefill_s,
                                      search_s=record.observe_s + record.search_s))
            fold_s = time.perf_counter() - clock
            before = dict(work)
            answer = context.answer("What happens in the video?", max_new_tokens=8)
            answer_calls = work["calls"] - before["calls"]
        finally:
            for handle in handles:
                handle.remove()
        rows.append(dict(
            model=kind, variant=name, layers=adapter.num_layers, chunks=len(per_chunk),
            calls_per_chunk=statistics.mean(c["calls"] for c in per_chunk),
            forwards_per_chunk=statistics.mean(c["forwards"] for c in per_chunk),
            calls_steady=statistics.mean(c["calls"] for c in per_chunk[1:]) if len(per_chunk) > 1 else None,
            token_layers_per_chunk=statistics.mean(c["token_layers"] for c in per_chunk),
            chunk_tokens=per_chunk[0]["chunk_tokens"], kept_percent=100 * statistics.mean(c["kept"] for c in per_chunk),
            cpu_fold_s=fold_s, cpu_search_over_prefill=sum(c["search_s"] for c in per_chunk)
            / max(sum(c["prefill_s"] for c in per_chunk), 1e-9),
            answer_calls=answer_calls, answer_tokens=len(answer.token_ids),
            first_token_s=getattr(answer, "first_token_s", None), decode_s=getattr(answer, "decode_s", None),
            peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            cache_mib=context.cache.nbytes() / 2**20))
    return rows[0]


def measure_all(code: Path, args) -> list[dict]:
    """Every variant of `code`'s tree on both models, one process each (peak memory is per process)."""
    rows = []
    for kind, frames in (("tiny", args.tiny_frames), ("7b", args.seven_b_frames)):
        for index in range(16):
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                subprocess.run([sys.executable, __file__, "--one", kind, str(index), str(frames), out.name],
                               check=True, env=dict(os.environ, SEARCH_COST_CODE=str(code)))
                row = json.loads(Path(out.name).read_text())
            if row is None:
                break
            rows.append(row)
            print(f"{kind:5s} {row['variant']:70s} calls/chunk {row['calls_per_chunk']:6.1f} token-layers/chunk "
                  f"{row['token_layers_per_chunk']:9.0f} kept {row['kept_percent']:5.1f}% peak RSS "
                  f"{row['peak_rss_mib']:.0f} MiB", flush=True)
    return rows


def run_before(rev: str, args) -> list[dict]:
    """Every variant, run against the code of `rev` (a git worktree of it)."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev], check=True,
                       capture_output=True)
        try:
            rows = measure_all(tree, args)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    for row in rows:
        row["code"] = rev
    return rows


def markdown(rows: list[dict], command: str) -> str:
    lines = ["# Search cost in hardware-independent units", "",
             f"Command: `{command}`. Sequential decoder-layer calls and tokens x layers per chunk of 64 frames "
             "(mean over the video's chunks; 'steady' leaves out the first chunk), the kept share, and an "
             "8-token answer's layer calls. CPU seconds only for the record: a GPU pays per sequential call.", "",
             "| code | model | variant | layer calls / chunk | vs full | steady | layer forwards / chunk "
             "| token-layers / chunk | vs full | kept % | answer calls | CPU search / prefill | peak RSS MiB "
             "| cache MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    full = {(r["code"], r["model"]): r for r in rows if r["variant"] == "full context"}
    for r in rows:
        f = full[(r["code"], r["model"])]
        steady = "-" if r["calls_steady"] is None else f"{r['calls_steady']:.1f}"
        lines.append(f"| {r['code']} | {r['model']} ({r['layers']} layers, {r['chunk_tokens']} tokens a chunk) "
                     f"| {r['variant']} | {r['calls_per_chunk']:.1f} "
                     f"| {r['calls_per_chunk'] / f['calls_per_chunk']:.2f}x "
                     f"| {steady} | {r.get('forwards_per_chunk', r['calls_per_chunk']):.1f} "
                     f"| {r['token_layers_per_chunk']:.0f} "
                     f"| {r['token_layers_per_chunk'] / f['token_layers_per_chunk']:.2f}x | {r['kept_percent']:.1f} "
                     f"| {r['answer_calls']} | {r['cpu_search_over_prefill']:.2f} | {r['peak_rss_mib']:.0f} "
                     f"| {r['cache_mib']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", help="a git revision to measure side by side (e.g. the commit before a change)")
    parser.add_argument("--tiny-frames", type=int, default=256)
    parser.add_argument("--seven-b-frames", type=int, default=256)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)  # KIND INDEX FRAMES OUT: one variant, one process
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if args.one:
        kind, index, frames, out = args.one
        with torch.no_grad():
            Path(out).write_text(json.dumps(measure(kind, int(frames), int(index))))
        return
    rows = measure_all(ROOT, args)
    for row in rows:
        row["code"] = "this tree"
    if args.before:
        rows = run_before(args.before, args) + rows
    command = "python benchmarks/search_cost.py" + (f" --before {args.before}" if args.before else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "search_cost.json").write_text(json.dumps(dict(command=command, rows=rows), indent=1))
    text = markdown(rows, command)
    (args.out / "search_cost.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
