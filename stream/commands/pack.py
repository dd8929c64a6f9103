"""`emloc-stream pack`: labelled examples (JSON Lines) folded once into a task pack streams start from.

    {"image": "dax/1.png", "answer": "dax"}
    {"clip": "clips/wug.mp4", "question": "what is this ?", "answer": "wug"}

Each line is one example: a picture (`image`, read as one frame pair, as Qwen2-VL reads an
image) or a short video (`clip`, sampled at the model's fps, at most --clip-frames frames),
the question (default `what is this ?`) and its answer. Paths are relative to the file's
folder and must stay inside it. The whole file is checked before the model loads: every bad
line is named with its number and nothing is built. The examples are then folded in chunks
under the many-shot settings (EMLoC's many-shot adaptation, observers = held-out examples)
and the pack is written atomically (see emloc/task_pack.py for the file).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from emloc import InputError
from emloc.settings import PRESETS, preset

from ..engine import build_model, describe, print_model_note
from ..question_files import parse_lines
from .common import config_from

if TYPE_CHECKING:
    from emloc import TaskExample

DEFAULT_QUESTION = "what is this ?"
FIELDS = {"image", "clip", "question", "answer"}


class BadExample(ValueError):
    pass


def read_examples(path: str | Path, fps: float, clip_frames: int = 16) -> list[TaskExample]:
    """Every example of the JSON Lines file, pictures and clips decoded; InputError listing every
    bad line (with its number) if any line cannot be used."""
    path = Path(path)
    root = path.parent.resolve()
    return parse_lines(path, lambda line, number: _example(line, root, fps, clip_frames, f"{path}:{number}"),
                       (BadExample,), reading="the examples", refused="no pack was built", empty="no examples")


def _example(line: str, root: Path, fps: float, clip_frames: int, source: str) -> TaskExample:
    try:
        data = json.loads(line)
    except (json.JSONDecodeError, RecursionError) as error:
        raise BadExample(f"not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise BadExample('each line must be a JSON object: {"image" or "clip", "question", "answer"}')
    unknown = set(data) - FIELDS
    if unknown:
        raise BadExample(f"unknown field(s) {sorted(unknown)}; known: {sorted(FIELDS)}")
    if ("image" in data) == ("clip" in data):
        raise BadExample('give exactly one of "image" (a picture) and "clip" (a short video)')
    question = data.get("question", DEFAULT_QUESTION)
    if not isinstance(question, str) or not question.strip():
        raise BadExample("'question' must be a non-empty string")
    answer = data.get("answer")
    if not isinstance(answer, str) or not answer.strip():
        raise BadExample("'answer' must be a non-empty string" if "answer" in data else "no 'answer'")
    kind = "image" if "image" in data else "clip"
    file = _inside(root, data[kind], kind)
    frames = _picture(file) if kind == "image" else _clip(file, fps, clip_frames)
    from emloc import TaskExample

    return TaskExample(frames, question, answer, source)


def _inside(root: Path, name, kind: str) -> Path:
    """The file a line names, relative to the examples' folder and inside it (symbolic links resolved)."""
    if not isinstance(name, str) or not name.strip():
        raise BadExample(f"'{kind}' must be a file path relative to the examples' folder")
    given = Path(name)
    if given.is_absolute():
        raise BadExample(f"'{kind}' {name!r} is an absolute path; paths are relative to the examples' folder")
    file = (root / given).resolve()
    if not file.is_relative_to(root):
        raise BadExample(f"'{kind}' {name!r} leads outside the examples' folder")
    if not file.is_file():
        raise BadExample(f"'{kind}' {name!r}: no such file")
    return file


def _picture(file: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as image:
            rgb = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise BadExample(f"{file.name}: not a readable image ({error})") from None
    return np.stack([rgb, rgb])  # one frame pair: a picture, as Qwen2-VL reads an image


def _clip(file: Path, fps: float, clip_frames: int) -> np.ndarray:
    from ..sources import VideoError, VideoFile

    try:
        frames = [f.image for f in VideoFile(file).frames(fps=fps)]
    except VideoError as error:
        raise BadExample(f"not a readable video ({error})") from None
    if not frames:
        raise BadExample(f"{file.name}: the video has no frames")
    if len(frames) > clip_frames:  # evenly over the clip
        frames = [frames[i] for i in np.linspace(0, len(frames) - 1, clip_frames).round().astype(int)]
    if len(frames) % 2:  # whole frame pairs: the last frame once more
        frames.append(frames[-1])
    return np.stack(frames)


def pack(args: argparse.Namespace) -> int:
    if args.preset not in PRESETS:
        raise InputError(f"--preset {args.preset!r}: presets are {sorted(PRESETS)}")
    if args.clip_frames < 2 or args.clip_frames % 2:
        raise InputError(f"--clip-frames must be an even number >= 2, got {args.clip_frames}")
    if args.examples_per_chunk < 1:
        raise InputError(f"--examples-per-chunk must be >= 1, got {args.examples_per_chunk}")
    out = Path(args.out)
    if out.is_dir() or not out.parent.is_dir():
        raise InputError(f"--out {out}: give a file name in an existing folder")
    args.budget = None
    config = config_from(args)
    examples = read_examples(args.examples, config.model.fps, args.clip_frames)  # every bad line, before the model
    adapter, stream_settings, label = build_model(config, args.model)
    settings = preset(args.preset, system_prompt=stream_settings.system_prompt)
    if adapter.num_layers % settings.layer_group_size:  # a preset made for 28 layers, on a smaller model:
        settings = replace(settings, layer_group_size=None)  # its layer_groups (half the layers a group)
    settings = settings.for_model(adapter.num_layers, adapter.temporal_patch)
    chunks = -(-len(examples) // args.examples_per_chunk)
    print(f"emloc-stream pack: {len(examples)} examples in {chunks} chunk(s) of up to {args.examples_per_chunk}, "
          f"preset {args.preset} ({describe(settings)}); {label.split(';')[0]}", flush=True)
    print_model_note(adapter.model_note)

    def progress(chunk: int, total: int, record) -> None:
        cache = sum(record.tokens_after) / len(record.tokens_after)
        print(f"[chunk {chunk}/{total}] {record.chunk_tokens} tokens -> kept {100 * record.kept_fraction:.1f}%, "
              f"cache {cache:.0f} tokens/layer, prefill {record.vision_s + record.prefill_s:.2f}s "
              f"search {record.observe_s + record.search_s + record.score_s:.2f}s", flush=True)

    from emloc import TaskPack

    built = TaskPack.build(adapter, examples, settings, examples_per_chunk=args.examples_per_chunk,
                           progress=progress)
    built.save(out)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB): {built.describe()}", flush=True)
    return 0


def register(commands, common) -> None:
    p = commands.add_parser(
        "pack", help="fold labelled examples into a task pack (--task of run, batch, live, serve)",
        description="Folds labelled examples into a compressed task pack a stream starts from (--task): the "
        "model then answers in the examples' terms, with no training. EXAMPLES is JSON Lines, one example a line: "
        '{"image": PATH} (a picture) or {"clip": PATH} (a short video), "question" (default "what is this ?") '
        'and "answer" (non-empty). Paths are relative to the file\'s folder and must stay inside it. A file with '
        "any bad line is refused before the model loads, every bad line named. The pack is made for one model "
        "(and system prompt): another refuses it.")
    p.add_argument("examples", help="JSON Lines of examples")
    p.add_argument("--out", required=True, help="the task pack file to write (replaced atomically)")
    p.add_argument("--config", help="YAML config: its model section and system prompt (the pack's settings are "
                   "--preset's)")
    p.add_argument("--model", help="checkpoint folder or hub id (default: the config's model.path, else the "
                   "shipped model)")
    p.add_argument("--examples-per-chunk", type=int, default=20, help="examples folded at a time (default 20, "
                   "the paper's)")
    p.add_argument("--preset", default="many_shot", help=f"pruning settings: one of {sorted(PRESETS)} "
                   "(default many_shot, the paper's many-shot adaptation)")
    p.add_argument("--clip-frames", type=int, default=16, help="most frames taken from a clip (even; default 16)")
    p.set_defaults(run=pack)
