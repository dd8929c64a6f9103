"""The `emloc-stream` command."""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace

from emloc import InputError, SettingsError, StreamContext, UnsupportedModelError

from .config import Config, ConfigError, load_config
from .synthetic import moving_shapes

DEMO_QUESTIONS = ["What colour was the square?", "Describe what happens in the video."]


def build_context(config: Config, model_path: str | None) -> tuple[StreamContext, str]:
    """The stream context for a config: a real checkpoint, or the built-in tiny model."""
    options = dict(fps=config.model.fps, max_frame_pixels=config.model.max_frame_pixels)
    path = model_path or config.model.path
    if path:
        from emloc import load_adapter

        adapter = load_adapter(path, device=config.model.device, **options)
        return StreamContext(adapter, settings=config.emloc), path
    from emloc.tiny import tiny_qwen2_vl, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    # 28 layers, as Qwen2-VL-7B has, so the paper's layer groups apply unchanged
    model = tiny_qwen2_vl(tokenizer, layers=28, hidden=64, init_std=0.1)
    return StreamContext(model, tokenizer, config.emloc, **options), "built-in tiny Qwen2-VL (random weights)"


def demo(args: argparse.Namespace) -> int:
    config = load_config(args.config) if args.config else Config()
    settings = config.emloc
    if args.budget is not None:
        settings = replace(settings, token_budget=args.budget)
    config = replace(config, emloc=settings)
    context, name = build_context(config, args.model)
    print(f"emloc-stream demo: {name}, {context.adapter.num_layers} layers; layer groups of "
          f"{settings.layer_group_size}, delta {settings.delta}, ratios {list(settings.ratios)}, "
          f"{settings.chunk_frames} frames a chunk" + (f", budget {settings.token_budget}/layer" if
                                                        settings.token_budget else ""))
    if not (args.model or config.model.path):
        print("note: the built-in model is untrained, so its answers are placeholders; the folding, "
              "pruning and budget below are real.")
    video = moving_shapes(args.frames, args.size, args.size, seed=args.seed)
    fps = config.model.fps
    seen = 0
    for start in range(0, len(video), settings.chunk_frames):
        frames = video[start:start + settings.chunk_frames]
        record = context.fold(frames, timestamps=[(start + i) / fps for i in range(len(frames))])
        seen += record.chunk_tokens
        print(f"[{start + len(frames):>5}/{len(video)} frames] {record.summary()}", flush=True)

    from sinks import AnswerEvent, ConsoleSink

    sink = ConsoleSink()
    for i, question in enumerate(args.ask or DEMO_QUESTIONS):
        answer = context.answer(question, max_new_tokens=args.max_new_tokens)
        sink.deliver(AnswerEvent("demo", f"q{i}", question, answer.text, answer.time_span, time.time(),
                                 answer.cache_tokens, answer.latency_s))
    kept = sum(context.cache.lengths()) / context.adapter.num_layers - context.sink_tokens
    print(f"video tokens seen {seen}, kept {kept:.0f} per layer ({100 * kept / max(seen, 1):.1f}%), "
          f"cache {context.cache.nbytes() / 1024:.0f} KiB")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(prog="emloc-stream", description="Answer questions about long or endless "
                                     "video with an EMLoC-pruned multimodal LLM.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("demo", help="fold a synthetic video and answer questions (offline)")
    p.add_argument("--config", help="YAML config (see configs/); default: the paper's online setting")
    p.add_argument("--model", help="local checkpoint folder or hub id of a Qwen2-VL / Qwen2.5-VL model")
    p.add_argument("--frames", type=int, default=256, help="length of the synthetic video")
    p.add_argument("--size", type=int, default=112, help="frame side in pixels")
    p.add_argument("--ask", action="append", help="a question (repeatable)")
    p.add_argument("--budget", type=int, help="hard cap of tokens per layer")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=demo)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, SettingsError, InputError, UnsupportedModelError) as error:
        print(f"emloc-stream: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
