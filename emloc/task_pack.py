"""Task packs: labelled examples folded once into a compressed cache that streams start from.

EMLoC's many-shot adaptation (docs/method.md, section 6): examples are put in the context chunk by
chunk, each chunk pruned under the JS bound as it is folded, the observers being held-out
examples whose answer tokens are the positions that must keep their distribution. The
result is a cache a stream starts from instead of an empty preamble; the video folds after
it, and the model answers in the examples' terms with no training.

    pack = TaskPack.build(adapter, examples)          # many_shot() settings by default
    pack.save("van.pack")                             # safetensors; the manifest in its header
    context = StreamContext(adapter, task=TaskPack.load("van.pack"))

The file is one safetensors file: the pack's cache (`layers.<i>.<part>`) and, in the
header's metadata, a JSON manifest (format, the model's identity, the settings it was built
with, the examples' digest, counters, and the checksums of emloc/integrity.py, one scheme for
packs and saved states). A pack is untrusted input: loading checks the checksums, the counters
and every layer's shapes, origins and numbers; a pack made by another model is refused by name.
Packs of the previous format (1) are still read, with their own checksum as their identity.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from .integrity import LEGACY_PACK, Stored, check_manifest, check_tensors, read_tensors, seal
from .records import FoldRecord
from .settings import EMLoCSettings, SettingsError, many_shot

FORMAT = "emloc-task-pack/2"  # 2: the checksums of emloc/integrity.py
READ_FORMATS = (FORMAT, LEGACY_PACK)
COUNTERS = ("sink_tokens", "video_start", "max_position", "tokens_seen")
PARTS = ("keys", "values", "origins", "importance")
LINEAR_STATE = re.compile(r"layers\.[0-9]+\.(conv|recurrent)\.[0-9]+")  # a hybrid model's linear-attention states


class PackError(ValueError):
    """A task pack cannot be used (damaged, edited, or for another model); the message says why."""


STORED = Stored("task pack", "built", PackError, "refusing it (build it again: emloc-stream pack)")


@dataclass(frozen=True)
class TaskExample:
    """One labelled example: a picture (2 frames) or short clip (T, H, W, 3) uint8 RGB, a question
    and its answer. `source` says where it came from (a file and line), for error messages."""

    frames: np.ndarray
    question: str
    answer: str
    source: str = ""


class TaskPack:
    """A compressed cache of labelled examples, read-only once built; any number of streams start
    from one pack (each copies it into its own cache, which attention needs contiguous)."""

    def __init__(self, tensors: dict[str, torch.Tensor], manifest: dict) -> None:
        self.tensors = tensors
        self.manifest = manifest

    # --- building --------------------------------------------------------------------
    @classmethod
    def build(cls, model, examples: list[TaskExample], settings: EMLoCSettings | None = None, *, tokenizer=None,
              examples_per_chunk: int = 20, progress=None, policy=None, **adapter_options) -> TaskPack:
        """Folds `examples` in chunks of `examples_per_chunk` under `settings` (the paper's
        many-shot settings by default). Each chunk's observers are up to `settings.max_observers`
        examples held out from it (the examples after it, wrapping round; with a single chunk,
        its own). progress(chunk, chunks, record) is called after each chunk. policy: another
        retention policy than EMLoC's search (the benchmark's equal-budget baselines)."""
        from .context import StreamContext

        settings = settings or many_shot()
        if not examples:
            raise PackError("a task pack needs at least one example")
        if not isinstance(examples_per_chunk, int) or examples_per_chunk < 1:
            raise PackError(f"examples_per_chunk must be an integer >= 1, got {examples_per_chunk!r}")
        context = StreamContext(model, tokenizer, settings, policy=policy, **adapter_options)
        preamble = context.sink_tokens  # before the examples join the sinks
        chunks = [examples[i:i + examples_per_chunk] for i in range(0, len(examples), examples_per_chunk)]
        clock = time.perf_counter()
        records: list[FoldRecord] = []
        for c, chunk in enumerate(chunks):
            record = context.fold_examples(chunk, held_out(examples, c, examples_per_chunk, settings.max_observers))
            records.append(record)
            if progress:
                progress(c + 1, len(chunks), record)
        tensors, meta = context.snapshot()
        seen = context.tokens_seen - preamble
        lengths = context.cache.lengths()
        manifest = dict(
            format=FORMAT, model=meta["model"], settings=settings.to_dict(), policy=type(context.policy).__name__,
            examples=len(examples),
            examples_per_chunk=examples_per_chunk, examples_sha256=examples_digest(examples),
            counters={name: int(meta[name.lstrip("_")]) for name in COUNTERS},
            kept_tokens=lengths, example_tokens=seen,
            kept_fraction=round((sum(lengths) / len(lengths) - preamble) / max(seen, 1), 4),
            build_s=round(time.perf_counter() - clock, 3),
            prefill_s=round(sum(r.vision_s + r.prefill_s for r in records), 3),
            search_s=round(sum(r.observe_s + r.search_s + r.score_s for r in records), 3))
        return cls(tensors, seal(manifest, tensors))  # its checksum: the identity every stream snapshot records

    # --- what it is ------------------------------------------------------------------
    @property
    def digest(self) -> str:
        """The pack's identity: the checksum over its manifest and tensors."""
        return self.manifest["sha256"]

    @property
    def settings(self) -> EMLoCSettings:
        return EMLoCSettings.from_dict(self.manifest["settings"])

    @property
    def counters(self) -> dict[str, int]:
        return dict(self.manifest["counters"])

    def describe(self) -> str:
        m = self.manifest
        return (f"task pack: {m['examples']} examples, {m['example_tokens']} tokens, kept "
                f"{100 * m['kept_fraction']:.1f}% ({m['kept_tokens']} tokens per layer with the preamble)")

    def check_model(self, identity: dict) -> None:
        """Refuses a pack made by another model (the same identity a saved state carries)."""
        theirs = self.manifest.get("model") or {}
        if theirs != identity:
            differ = sorted(k for k in set(identity) | set(theirs) if identity.get(k) != theirs.get(k))
            raise SettingsError(f"the task pack was made by another model (differs in {differ}); "
                                f"build it again with this model (emloc-stream pack)")

    # --- files -----------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Writes the pack as it is (a pack of the previous format keeps it, and its checksum, its identity)."""
        path = Path(path)
        manifest = self.manifest
        tmp = path.with_name(path.name + ".tmp")
        tmp.unlink(missing_ok=True)
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(tmp),
                  metadata={"manifest": json.dumps(manifest, sort_keys=True)})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> TaskPack:
        """Reads and checks a pack file; PackError naming the problem if it cannot be used."""
        path = Path(path)
        if not path.is_file():
            raise PackError(f"{path}: no such task pack file")
        tensors, metadata = read_tensors(path, STORED)
        if "manifest" not in metadata:
            raise PackError(f"{path}: not a task pack (a safetensors file with no pack manifest in its header)")
        try:
            manifest = json.loads(metadata["manifest"])
        except (json.JSONDecodeError, RecursionError) as error:
            raise PackError(f"{path}: the pack's manifest is not valid JSON ({error})") from error
        if not isinstance(manifest, dict) or manifest.get("format") not in READ_FORMATS:
            found = manifest.get("format") if isinstance(manifest, dict) else None
            raise PackError(f"{path}: not a task pack of format {FORMAT!r} (found {found!r})")
        check_manifest(path, manifest, STORED)
        check_tensors(path, manifest, tensors, STORED)
        pack = cls(tensors, manifest)
        pack._check(path)
        return pack

    def _check(self, path: Path) -> None:
        """Counters and layers consistent with each other: what a start from the pack relies on."""
        m = self.manifest
        counters = m.get("counters")
        def bad(value) -> bool:
            return not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 40

        if not isinstance(counters, dict) or any(bad(counters.get(n)) for n in COUNTERS):
            raise PackError(f"{path}: the pack's counters must be non-negative integers, got {counters!r}")
        if (counters["sink_tokens"] != counters["tokens_seen"]
                or counters["max_position"] + 1 != counters["video_start"]):
            raise PackError(f"{path}: the pack's counters contradict each other: {counters}")
        try:
            EMLoCSettings.from_dict(m.get("settings") or {})
        except (SettingsError, TypeError) as error:
            raise PackError(f"{path}: the pack's settings are invalid: {error}") from error
        layers = sorted({int(k.split(".")[1]) for k in self.tensors if k.startswith("layers.")})
        if not layers or layers != list(range(len(layers))) or any(
                not k.startswith("layers.") or k.split(".")[2] not in PARTS + ("log_mass",) for k in self.tensors
                if not LINEAR_STATE.fullmatch(k)):
            raise PackError(f"{path}: the pack holds unexpected tensors {sorted(self.tensors)[:6]}")
        for name in filter(LINEAR_STATE.fullmatch, self.tensors):  # a hybrid model's (shapes: at the stream's start)
            if not torch.isfinite(self.tensors[name]).all():
                raise PackError(f"{path}: the linear-attention state {name} is not finite")
        for i in layers:
            parts = [self.tensors.get(f"layers.{i}.{p}") for p in PARTS]
            if any(p is None for p in parts):
                raise PackError(f"{path}: layer {i} lacks one of {PARTS}")
            keys, values, origins, importance = parts
            n = keys.shape[2] if keys.dim() == 4 else -1
            if (keys.dim() != 4 or values.dim() != 4 or values.shape[:3] != keys.shape[:3]
                    or origins.shape != keys.shape[:3] or importance.shape != keys.shape[:3]):
                raise PackError(f"{path}: layer {i} has inconsistent shapes")
            if not (torch.isfinite(keys).all() and torch.isfinite(values).all()):
                raise PackError(f"{path}: layer {i}'s keys or values are not finite")
            if n and (int(origins.min()) < 0 or int(origins.max()) >= counters["tokens_seen"]):
                raise PackError(f"{path}: layer {i} holds tokens beyond the {counters['tokens_seen']} the pack saw")
            if any(not bool((torch.diff(head) > 0).all()) for head in origins[0]):
                raise PackError(f"{path}: layer {i}'s tokens are not in stream order")


def held_out(examples: list[TaskExample], chunk: int, per_chunk: int, count: int) -> list[TaskExample]:
    """The observers of chunk `chunk`: up to `count` examples not in it (those after it, wrapping
    round); a pack of one chunk has nothing held out and observes with its own examples."""
    lo, hi = chunk * per_chunk, min(len(examples), (chunk + 1) * per_chunk)
    outside = examples[hi:] + examples[:lo]
    pool = outside or examples[lo:hi]
    step = max(1, len(pool) // count)
    return pool[::step][:count]


def examples_digest(examples: list[TaskExample]) -> str:
    """SHA-256 over every example's frames, question and answer, in order."""
    digest = hashlib.sha256()
    for example in examples:
        frames = np.ascontiguousarray(example.frames, dtype=np.uint8)
        digest.update(json.dumps([list(frames.shape), example.question, example.answer]).encode())
        digest.update(frames.tobytes())
    return digest.hexdigest()

