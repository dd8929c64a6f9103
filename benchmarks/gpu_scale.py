"""Real-scale cost: the Qwen2-VL-7B architecture (random weights, nothing downloaded) under the
paper's online setting, full context versus EMLoC.

    python benchmarks/gpu_scale.py                 # on a GPU: 7B in bf16, 384 frames, 64 a chunk
    python benchmarks/gpu_scale.py --reduced       # anywhere: the same shapes, narrow layers (CPU)
    python benchmarks/gpu_scale.py --arch qwen3_5  # Qwen3.5-9B shapes: hybrid, 24 Gated DeltaNet + 8 full attention
    python benchmarks/gpu_scale.py --arch qwen2_5_vl | qwen3_vl | llava_onevision  # 7B/8B shapes (gpu_scale_archs.py)

The 7B config is the published one (28 layers, hidden 3584, 28 heads / 4 KV heads, M-RoPE
sections 16/24/24, vision tower depth 32 x 1280). Frames are 336x336: 144 tokens per frame
pair, so 384 frames make 27,648 video tokens, as in the paper.

With random weights the observer's output is nearly flat, so the JS search keeps almost
nothing or everything for reasons unrelated to video; the search is run and timed as is
(its choices are reported), and memory/latency are also measured with the paper's
retention pattern forced (27.9k -> 2.3k tokens: 8.3% of each chunk, top observer
attention), which is what the paper's figures correspond to.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpu_scale_archs import ARCHS  # noqa: E402
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration  # noqa: E402

from emloc import StreamContext  # noqa: E402
from emloc.adapters import adapter_for  # noqa: E402
from emloc.loading import attention_implementation  # noqa: E402
from emloc.policies import KeepAll, ObserverTopK  # noqa: E402
from emloc.settings import query_agnostic, videomme_online  # noqa: E402
from emloc.tiny import tiny_tokenizer  # noqa: E402

SEVEN_B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vision=dict(depth=32, embed_dim=1280, num_heads=16))
REDUCED = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=28, num_attention_heads=8,
               num_key_value_heads=4, vision=dict(depth=2, embed_dim=128, num_heads=4))
PAPER_SHARE = 2.3 / 27.9  # the paper's online VideoMME compression
# Qwen3.5-9B's text shapes (transformers' Qwen3_5TextConfig defaults: 32 layers, every fourth full attention,
# head_dim 256 of which a quarter rotated, Gated DeltaNet 16 key / 32 value heads of 128), its vision tower
QWEN3_5_9B = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=32, num_attention_heads=16,
                  num_key_value_heads=4, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=32,
                  linear_key_head_dim=128, linear_value_head_dim=128,
                  vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16))
QWEN3_5_REDUCED = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=32, num_attention_heads=8,
                       num_key_value_heads=4, head_dim=32, linear_num_key_heads=4, linear_num_value_heads=8,
                       linear_key_head_dim=32, linear_value_head_dim=32,
                       vision=dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=4))


def tokenizer_and_ids():
    """A word-level tokenizer with Qwen's special tokens (the token ids do not matter here) and the config's
    special token ids."""
    tokenizer = tiny_tokenizer()
    get = tokenizer.convert_tokens_to_ids
    return tokenizer, dict(image_token_id=get("<|image_pad|>"), video_token_id=get("<|video_pad|>"),
                           vision_start_token_id=get("<|vision_start|>"), vision_end_token_id=get("<|vision_end|>"),
                           eos_token_id=get("<|im_end|>"), bos_token_id=get("<|endoftext|>"),
                           pad_token_id=get("<|endoftext|>"))


def build(shape: dict, device: torch.device, dtype: torch.dtype):
    tokenizer, ids = tokenizer_and_ids()
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    half = head_dim // 2
    section = [16, 24, 24] if half == 64 else [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=152064 if shape is SEVEN_B else len(tokenizer),
                         **{k: v for k, v in shape.items() if k != "vision"}, max_position_embeddings=32768,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": section}, **ids),
        vision_config=dict(**shape["vision"], hidden_size=shape["hidden_size"], patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, mlp_ratio=4),
        **ids)
    config._attn_implementation = attention_implementation(device)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration(config).to(dtype).eval()
    return adapter_for(model, tokenizer, fps=2.0, max_frame_pixels=336 * 336)


def build_qwen3_5(shape: dict, device: torch.device, dtype: torch.dtype):
    """Qwen3.5 at `shape` (random weights): the adapter runs each full-attention layer with the three
    Gated DeltaNet layers before it, so the search's layer groups count the 8 full-attention layers."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    tokenizer, ids = tokenizer_and_ids()
    rotary = shape["head_dim"] // 4 // 2  # frequencies of the rotated quarter, interleaved over t/h/w
    section = [11, 11, 10] if rotary == 32 else [rotary - 2 * (rotary * 3 // 8), rotary * 3 // 8, rotary * 3 // 8]
    text = {k: v for k, v in shape.items() if k != "vision"}
    config = Qwen3_5Config(
        text_config=dict(vocab_size=248320 if shape is QWEN3_5_9B else len(tokenizer), **text,
                         max_position_embeddings=262144, **ids,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e7, "mrope_section": section,
                                          "mrope_interleaved": True, "partial_rotary_factor": 0.25}),
        vision_config=dict(**shape["vision"], out_hidden_size=shape["hidden_size"], patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2),
        **ids)
    config._attn_implementation = attention_implementation(device)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3_5ForConditionalGeneration(config).to(dtype).eval()
    return adapter_for(model, tokenizer, fps=2.0, max_frame_pixels=336 * 336)


def run(adapter, settings, policy, video: np.ndarray, device) -> dict:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    context = StreamContext(adapter, settings=settings, policy=policy)
    t0 = time.perf_counter()
    for k in range(0, len(video), settings.chunk_frames):
        context.fold(video[k:k + settings.chunk_frames])
    fold_s = time.perf_counter() - t0
    answers = [context.answer("what colour was the triangle ?", max_new_tokens=8) for _ in range(3)]
    latencies = [a.latency_s for a in answers]
    fastest = min(answers, key=lambda a: a.latency_s)
    records = context.records
    out = dict(frames=len(video), chunks=len(records), video_tokens=context.video_tokens_seen(),
               kept_tokens_per_layer=round(context.video_tokens_kept()),
               prefill_s=round(sum(r.vision_s + r.prefill_s for r in records), 3),
               search_s=round(sum(r.observe_s + r.search_s for r in records), 3),
               score_s=round(sum(r.score_s for r in records), 3),
               fold_s=round(fold_s, 3), frames_per_s=round(len(video) / fold_s, 2),
               answer_latency_s=round(min(latencies), 4), cache_mib=round(context.cache.nbytes() / 2**20, 1),
               # time to first token (the question's pass over the cache) and each later token (one pass each)
               first_token_s=round(fastest.first_token_s, 4), decode_s_per_token=round(fastest.decode_s_per_token, 4),
               # what a chunk costs in sequential decoder-layer calls and tokens x layers (any hardware)
               layer_calls_per_chunk=round(sum(r.work.calls for r in records) / len(records), 1),
               token_layers_per_chunk=round(sum(r.work.token_layers for r in records) / len(records)),
               groups=[[(g.first, g.last, g.ratio) for g in r.groups] for r in records])
    out["search_over_prefill"] = round(out["search_s"] / max(out["prefill_s"], 1e-9), 3)
    out["score_share_of_fold"] = round(out["score_s"] / max(fold_s, 1e-9), 4)
    if device.type == "cuda":
        torch.cuda.synchronize()
        out["peak_gpu_gib"] = round((torch.cuda.max_memory_allocated() - base) / 2**30 + base / 2**30, 2)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reduced", action="store_true", help="narrow layers (any machine); default on CPU")
    parser.add_argument("--frames", type=int, default=384)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    parser.add_argument("--arch", choices=("qwen2_vl", "qwen3_5", *ARCHS), default="qwen2_vl",
                        help="qwen3_5: the hybrid Qwen3.5-9B shapes, layer groups of 4 of its 8 full-attention layers; "
                        "qwen2_5_vl, qwen3_vl, llava_onevision: Qwen2.5-VL-7B, Qwen3-VL-8B, LLaVA-OneVision-7B "
                        "(gpu_scale_archs.py), layer groups of half their layers")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reduced = args.reduced or device.type == "cpu"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.arch == "qwen3_5":
        adapter = build_qwen3_5(QWEN3_5_REDUCED if reduced else QWEN3_5_9B, device, dtype)
    elif args.arch in ARCHS:
        adapter, arch_settings, arch_label = ARCHS[args.arch](reduced, device, dtype)
    else:
        adapter = build(REDUCED if reduced else SEVEN_B, device, dtype)
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (args.frames, 336, 336, 3), dtype=np.uint8)
    settings = videomme_online()
    label = "Qwen2-VL-7B architecture" if not reduced else "Qwen2-VL-7B shapes, narrow (reduced) layers"
    if args.arch == "qwen3_5":  # 8 full-attention layers: two groups of 4, as the paper's two groups of 14
        settings = videomme_online(layer_group_size=4)
        label = "Qwen3.5-9B architecture" if not reduced else "Qwen3.5-9B shapes, narrow (reduced) layers"
    elif args.arch in ARCHS:
        settings, label = arch_settings, arch_label
    machine = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or 'x86_64'})"
    print(f"{label} on {machine}, {dtype}; {args.frames} frames at 336x336, 64 a chunk", flush=True)
    run(adapter, settings, KeepAll(), video[:settings.chunk_frames], device)  # warm-up: allocator, kernels
    meta = dict(model=label, machine=machine, dtype=str(dtype), reduced=reduced, frames=args.frames,
                torch=torch.__version__, transformers=transformers.__version__,
                arch=args.arch,
                command="python benchmarks/gpu_scale.py" + (" --reduced" if args.reduced else "")
                + (f" --arch {args.arch}" if args.arch != "qwen2_vl" else "")
                + (f" --frames {args.frames}" if args.frames != 384 else ""))  # --out is where, not what
    results = {}
    default = query_agnostic(layer_group_size=settings.layer_group_size)  # the product's default, 7B's groups
    for name, chosen, policy in [("full", settings, KeepAll()), ("emloc_js_search", settings, None),
                                 ("emloc_paper_pattern", settings, ObserverTopK(PAPER_SHARE)),
                                 ("default_query_agnostic", default, None)]:
        results[name] = run(adapter, chosen, policy, video, device)
        print(name, {k: v for k, v in results[name].items() if k != "groups"}, flush=True)
        write(args.out, meta, results)  # after each run: a cut-off run keeps what it measured


def write(out: Path, meta: dict, results: dict) -> None:
    name = ("gpu_scale" if not meta["reduced"] else "gpu_scale_reduced_cpu") + (
        f"-{meta['frames']}" if meta["frames"] != 384 else "")
    if meta.get("arch", "qwen2_vl") != "qwen2_vl":
        name = name.replace("gpu_scale", f"gpu_scale_{meta['arch']}", 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(dict(meta=meta, results=results), indent=1) + "\n")
    rows = ["| run | video tokens | kept/layer | prefill s | search s | score s | search/prefill | fold frames/s "
            "| layer calls / chunk | token-layers / chunk | answer s | first token s | decode s/token | cache MiB "
            "| peak GPU GiB |", "|---" * 15 + "|"]
    for key, r in results.items():
        rows.append(f"| {key} | {r['video_tokens']} | {r['kept_tokens_per_layer']} | {r['prefill_s']} | "
                    f"{r['search_s']} | {r.get('score_s', 'n/a')} | {r['search_over_prefill']} | {r['frames_per_s']} | "
                    f"{r.get('layer_calls_per_chunk', 'n/a')} | {r.get('token_layers_per_chunk', 'n/a')} | "
                    f"{r['answer_latency_s']} | {r.get('first_token_s', 'n/a')} | "
                    f"{r.get('decode_s_per_token', 'n/a')} | "
                    f"{r['cache_mib']} | {r.get('peak_gpu_gib', 'n/a')} |")
    (out / f"{name}.md").write_text(
        f"# Real-scale cost: {meta['model']}\n\n`{meta['command']}` on {meta['machine']}, {meta['dtype']}, "
        f"torch {meta['torch']}, transformers {meta['transformers']}; "
        f"{meta['frames']} frames at 336x336 (144 tokens per frame pair), the paper's online setting.\n\n"
        + "\n".join(rows) + "\n\nemloc_paper_pattern forces the paper's compression (8.3% of each chunk, top "
        "observer attention) because random weights make the JS search's choices meaningless; "
        "emloc_js_search is the search itself, timed as it runs; default_query_agnostic is the product's default "
        "(the probe with the model's own answer carried from chunk to chunk as observer, tokens ranked by TaR + "
        "KeyDiff, dropped tokens merged, ratios 0.05-1.0), score s the ranking's own time, search s the observer "
        "passes after the first (which rides in the prefill's pass) and the search. Layer calls: sequential "
        "decoder-layer calls per chunk, what a GPU pays for whatever the tokens. First token: the question's "
        "pass over the cache (bound by its length); decode: one pass per later token (bound by launch latency "
        "and reading the cache).\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
