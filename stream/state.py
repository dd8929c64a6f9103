"""Saved stream state: the compressed cache as safetensors plus a JSON manifest.

    DIR/manifest.json        format, the name of the cache file, the context's positions/settings/
                             model identity, the stream's state (its questions in the schema's fields,
                             stream/questions.py), and the checksums of emloc/integrity.py
    DIR/cache-<n>.safetensors  the cache, plus the manifest's counters and times again

A saved state is untrusted input. Loading checks, before it restores anything: the
manifest's own checksum (an edited field is named as an edit), that the one file it names
is `cache-<serial>.safetensors` directly inside DIR (no absolute path, no `..`, no symlink),
the cache's checksum (emloc/integrity.py: one scheme for states and task packs; states of the
previous format, 3, are still read), then that every field agrees with the cache it
describes (the counters stored in both, the layers' shapes, the token origins against the
tokens seen, the attention sinks against the cache the stream starts from: its preamble, or its
task pack, whose checksum the state records). Nothing is ever unpickled.
A checksum finds damage and edits, not a forger who recomputes it: keep DIR as private as
the model.

Saving writes a new cache file, then replaces the manifest atomically, then removes the
older cache files of DIR (regular files named cache-<n>.safetensors only), so a crash at
any moment leaves one complete, consistent state. A save that cannot be written (a full
disk, a folder made read-only) removes what it wrote, leaves the previous state as it was,
and raises `StateNotSaved`, one line naming the folder, the reason and the free space.

A state records which video it was folded from (`source_fingerprint`): for a file its size,
modification time and the SHA-256 of its first MiB; for a folder of images their number and a
hash of their names, sizes and the first image's first MiB; for a live source its URL.
`check_source` refuses another video. The first MiB rather than decoded frames: it is read
without decoding (so it is checked before any work and does not depend on which decoder, or
which version of it, reads the file), and it holds the container's header and the first frames'
compressed data, which two different videos share only if they are the same video up to there.
Size and hash decide; the modification time is recorded, not compared, because a copy or a
restored backup of the same video changes it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from emloc import SettingsError, StreamContext
from emloc.integrity import LEGACY_STATE, Stored, check_manifest, check_tensors, read_tensors, seal
from emloc.snapshot import COUNTERS

FORMAT = "emloc-stream-state/4"  # 3: compressed temporal positions (halvings, video layout); 4: emloc/integrity.py
READ_FORMATS = (FORMAT, LEGACY_STATE)
CACHE_NAME = re.compile(r"cache-([1-9][0-9]{0,17})\.safetensors")
EXTRA = ("state.counters", "state.times", "state.layout")  # the tensors besides the layers
TENSOR_PARTS = ("keys", "values", "origins", "importance")
LINEAR_NAME = re.compile(r"layers\.[0-9]+\.(conv|recurrent)\.[0-9]+")  # a hybrid model's linear-attention states


class StateError(RuntimeError):
    """A saved state cannot be used; the message says why. The context it was loaded into must not be used."""


class StateNotSaved(StateError):
    """A save could not be written (full disk, unwritable folder); the previous state is intact."""


STORED = Stored("state", "saved", StateError, "refusing to resume from it (start a new state folder)")


FINGERPRINT_BYTES = 1 << 20  # the first MiB of a video file identifies it (see the module's docstring)


def save_state(folder: str | Path, context: StreamContext, stream: dict) -> Path:
    """Saves `context` and `stream` (plain data: last timestamp, pending questions, ...); StateNotSaved, with
    the previous state left intact, when the folder cannot take it."""
    folder = Path(folder)
    written: list[Path] = []
    try:
        return _save(folder, context, stream, written)
    except (OSError, SafetensorError) as error:
        for path in written:  # a partial cache file must not fill what little room is left
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass
        raise StateNotSaved(f"{folder}: state not saved: {_reason(error)} ({_free(folder)}); the previous state "
                            f"there is intact") from error


def _reason(error: Exception) -> str:
    """The system's words for a failed write (safetensors wraps them: "I/O error: ... (os error 28)")."""
    if isinstance(error, OSError):
        return error.strerror or str(error)
    code = re.search(r"\(os error (\d+)\)", str(error))
    return os.strerror(int(code.group(1))) if code else str(error).splitlines()[0][:200]


def _free(folder: Path) -> str:
    """The free space on `folder`'s disk, in words."""
    import shutil

    for place in (folder, *folder.parents):
        try:
            free = shutil.disk_usage(place).free
        except OSError:
            continue
        for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
            if free < 1024 or unit == "TiB":
                amount = f"{free:.0f} bytes" if unit == "bytes" else f"{free:.1f} {unit}"
                return f"{amount} free on its disk"
            free /= 1024
    return "free space unknown"


def _save(folder: Path, context: StreamContext, stream: dict, written: list[Path]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tensors, meta = context.snapshot()
    tensors["state.counters"] = torch.tensor([int(meta[name]) for name in COUNTERS], dtype=torch.int64)
    tensors["state.times"] = torch.tensor(_times(meta, stream), dtype=torch.float64)
    tensors["state.layout"] = torch.tensor(meta["video_layout"], dtype=torch.int64).reshape(-1, 3)
    serial = max([_serial_of(folder)] + [int(m.group(1)) for p in folder.iterdir()
                                         if (m := CACHE_NAME.fullmatch(p.name))]) + 1
    cache = folder / f"cache-{serial}.safetensors"
    written.append(cache)
    save_file(tensors, str(cache))
    _fsync(cache)
    manifest = seal(dict(format=FORMAT, serial=serial, cache=cache.name, context=meta, stream=stream), tensors)
    tmp = folder / "manifest.json.tmp"
    tmp.unlink(missing_ok=True)  # never write through a planted symlink
    written.append(tmp)
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    _fsync(tmp)
    os.replace(tmp, folder / "manifest.json")
    written.clear()  # the new state is in place: nothing to take back
    for old in folder.iterdir():  # only our own files, found by name in this folder, never a path from a manifest
        if CACHE_NAME.fullmatch(old.name) and old.name != cache.name and not old.is_symlink() and old.is_file():
            old.unlink(missing_ok=True)
    return folder / "manifest.json"


def source_fingerprint(source: str | Path, *, live: bool = False) -> dict:
    """What identifies the video a state is folded from (see the module's docstring)."""
    if live:
        return dict(kind="live", url=str(source))
    path = Path(source)
    digest = hashlib.sha256()
    if path.is_dir():
        from .sources import IMAGE_SUFFIXES

        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for file in files:
            digest.update(f"{file.name}\0{file.stat().st_size}\0".encode())
        if files:
            with files[0].open("rb") as f:
                digest.update(f.read(FINGERPRINT_BYTES))
        return dict(kind="images", images=len(files), sha256=digest.hexdigest())
    stat = path.stat()
    with path.open("rb") as f:
        digest.update(f.read(FINGERPRINT_BYTES))
    return dict(kind="file", bytes=stat.st_size, mtime=stat.st_mtime, sha256_first_mib=digest.hexdigest())


SAME_SOURCE = {"live": ("url",), "images": ("images", "sha256"), "file": ("bytes", "sha256_first_mib")}


def check_source(folder: str | Path, saved, current: dict, *, moved_ok: bool = False) -> str | None:
    """Refuses (StateError) a state folded from another video than `current` (a fingerprint); returns a note
    for a state saved before fingerprints (accepted: it was checked by path or stream id as before), or for a
    live source that moved and `moved_ok` accepts."""
    if saved is None:
        return (f"{folder}: this state was saved before states recorded their source; resuming it as the same "
                f"video (if the video was replaced, start a new state folder)")
    if not isinstance(saved, dict) or saved.get("kind") not in SAME_SOURCE:
        raise StateError(f"{folder}: the manifest's source must be a source fingerprint, got {str(saved)[:200]}")
    if saved["kind"] == current["kind"] and all(saved.get(k) == current[k] for k in SAME_SOURCE[current["kind"]]):
        return None
    if current["kind"] == "live" == saved["kind"]:
        if moved_ok:
            return f"{folder}: the source moved from {saved.get('url')!r} to {current['url']!r}; resuming as asked"
        raise StateError(f"{folder}: this state was folded from {str(saved.get('url'))[:200]!r}, not "
                         f"{current['url']!r}; if the camera moved there, resume with --source-moved (else start a "
                         f"new state folder)")
    if current["kind"] == "live" or saved["kind"] == "live":
        raise StateError(f"{folder}: this state was folded from a {saved['kind']} source, not a {current['kind']} one; "
                         f"start a new state folder")
    what = (f"{saved.get('bytes')} bytes" if saved["kind"] == "file" else f"{saved.get('images')} images")
    raise StateError(f"{folder}: this state was folded from another video ({what}, different content) than the "
                     f"one given now; start a new state folder for it")


def has_state(folder: str | Path) -> bool:
    return (Path(folder) / "manifest.json").exists()


def check_saved(folder: str | Path) -> None:
    """What can be checked of a saved state without the model, before it loads: the manifest (readable,
    of a format this version reads, its checksum) and the cache file it names. `load_state` checks
    the rest (the cache's checksum, and that it fits the model and the stream) when it restores."""
    folder = Path(folder)
    _cache_path(folder, _manifest(folder))


def saved_stream(folder: str | Path) -> dict:
    """The stream data a saved state's manifest holds (which video, folded how), read without the model so
    that resuming the wrong video, or the right one another way, is refused before the model loads."""
    folder = Path(folder)
    stream = _manifest(folder).get("stream")
    if not isinstance(stream, dict):
        raise StateError(f"{folder}: the manifest's 'context' and 'stream' must be objects")
    return stream


def load_state(folder: str | Path, context: StreamContext) -> dict:
    """Restores `context` from `folder` and returns the saved stream data; StateError if unusable."""
    folder = Path(folder)
    manifest = _manifest(folder)
    cache = _cache_path(folder, manifest)
    tensors, _ = read_tensors(cache, STORED)
    check_tensors(cache, manifest, tensors, STORED)
    meta, stream = manifest.get("context"), manifest.get("stream")
    if not isinstance(meta, dict) or not isinstance(stream, dict):
        raise StateError(f"{folder}: the manifest's 'context' and 'stream' must be objects")
    start = _start_of(context)  # the cache this stream starts from (preamble, or task pack), before it is replaced
    _check_task(folder, meta, context)
    _check_counters(folder, meta, stream, tensors, start)
    try:
        context.restore({k: v for k, v in tensors.items() if k.startswith("layers.")}, meta)
    except SettingsError as error:
        raise StateError(f"{folder}: {error}") from error
    except (KeyError, ValueError, TypeError, RuntimeError) as error:
        raise StateError(f"{folder}: the saved state is inconsistent: {error}") from error
    _check_cache(folder, context, start, tensors)
    return stream


def _start_of(context: StreamContext) -> dict:
    """What every state of this stream must begin with: the sink counters and each layer's committed
    tokens (origins; and keys when they come from a task pack, which are copied bit for bit)."""
    layers = [layer.committed_origins().cpu().clone() for layer in context.cache.layers]
    keys = ([layer.keys[:, :, :layer.length].cpu().clone() for layer in context.cache.layers]
            if context.task is not None else None)
    return dict(sink_tokens=context.sink_tokens, video_start=context.video_start, origins=layers, keys=keys)


def _check_task(folder: Path, meta: dict, context: StreamContext) -> None:
    """A state folded after a task pack resumes only from that pack, and one folded without a pack without one."""
    saved, mine = meta.get("task"), context.task.digest if context.task is not None else None
    if saved == mine:
        return
    if saved is None:
        raise StateError(f"{folder}: this state was saved without a task pack; resume it without --task (or use a "
                         f"new state folder)")
    if not isinstance(saved, str):
        raise StateError(f"{folder}: the manifest's task must be a pack's checksum, got {saved!r}")
    if mine is None:
        raise StateError(f"{folder}: this state was saved with a task pack (checksum {saved[:12]}...); resume it "
                         f"with the same --task")
    raise StateError(f"{folder}: this state was saved with another task pack (checksum {saved[:12]}..., this "
                     f"one is {mine[:12]}...); resume it with the same --task")


def _manifest(folder: Path) -> dict:
    path = folder / "manifest.json"
    if path.is_symlink():
        raise StateError(f"{path}: the manifest is a symbolic link; a state folder holds its own files")
    try:
        manifest = json.loads(path.read_text())
    except OSError as error:
        raise StateError(f"{path}: cannot read the state manifest: {error.strerror or error}") from error
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError) as error:
        raise StateError(f"{path}: the state manifest is not valid JSON ({error}); it was damaged") from error
    if not isinstance(manifest, dict) or not str(manifest.get("format", "")).startswith("emloc-stream-state/"):
        raise StateError(f"{path}: not an emloc-stream state (format {FORMAT!r} expected)")
    if manifest["format"] not in READ_FORMATS:
        raise StateError(f"{path}: a state of format {manifest['format']!r}, from another version of emloc-stream "
                         f"({FORMAT!r} expected); start a new state")
    check_manifest(path, manifest, STORED)
    return manifest


def _cache_path(folder: Path, manifest: dict) -> Path:
    """The cache file the manifest names: cache-<serial>.safetensors, a regular file directly in `folder`."""
    name, serial = manifest.get("cache"), manifest.get("serial")
    if not isinstance(name, str) or not CACHE_NAME.fullmatch(name) or name != f"cache-{serial}.safetensors":
        raise StateError(f"{folder}: the manifest names the cache file {str(name)[:200]!r}; only "
                         f"'cache-<serial>.safetensors' inside the state folder is allowed")
    path = folder / name
    if path.is_symlink():
        raise StateError(f"{path}: the cache file is a symbolic link; a state folder holds its own files")
    if not path.is_file():
        raise StateError(f"{folder}: the cache file {name!r} named by the manifest is missing")
    if path.resolve().parent != folder.resolve():
        raise StateError(f"{path}: resolves outside the state folder")
    return path


def _times(meta: dict, stream: dict) -> list[float]:
    span = meta.get("time_span") or (math.nan, math.nan)
    last = stream.get("last_time")
    return [float(span[0]), float(span[1]), math.nan if last is None else float(last)]


def _check_counters(folder: Path, meta: dict, stream: dict, tensors: dict, start: dict) -> None:
    """The manifest's counters and times against their copy in the checksummed cache file, and each other."""
    for name in COUNTERS:
        value = meta.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 62:
            raise StateError(f"{folder}: the manifest's {name} must be a non-negative integer, got {value!r}")
    span, last = meta.get("time_span"), stream.get("last_time")
    if span is not None and not (isinstance(span, list) and len(span) == 2 and all(_finite(t) for t in span)
                                 and span[0] <= span[1]):
        raise StateError(f"{folder}: the manifest's time_span must be [start, end] seconds, got {span!r}")
    if last is not None and not (_finite(last) and span is not None and last == span[1]):
        raise StateError(f"{folder}: last_time {last!r} is not the end of the folded video {span!r}")
    counters, times = tensors.get("state.counters"), tensors.get("state.times")
    if counters is None or times is None or counters.shape != (len(COUNTERS),) or times.shape != (3,):
        raise StateError(f"{folder}: the cache file lacks the state's counters")
    for name, saved in zip(COUNTERS, counters.tolist()):
        if saved != meta[name]:
            raise StateError(f"{folder}: the manifest says {name} = {meta[name]} but the cache file it describes "
                             f"was saved with {saved}; the manifest was edited")
    expected_times = torch.tensor(_times(meta, stream), dtype=torch.float64)
    if not torch.equal(times.nan_to_num(-1.0), expected_times.nan_to_num(-1.0)):
        raise StateError(f"{folder}: the manifest's times {expected_times.tolist()} differ from the cache file's "
                         f"{times.tolist()}; the manifest was edited")
    c = meta
    if (c["video_start"] != start["video_start"] or c["tokens_seen"] < c["sink_tokens"]
            or (c["chunks_folded"] == 0) != (c["tokens_seen"] == c["sink_tokens"]) or c["steps"] < c["chunks_folded"]
            or c["max_position"] < c["video_start"] - 1
            or (c["chunks_folded"] and c["max_position"] < c["video_start"])):
        raise StateError(f"{folder}: the saved counters contradict each other: {dict((n, c[n]) for n in COUNTERS)}")
    _check_layout(folder, meta, tensors.get("state.layout"))
    expected = {k for k in tensors if k.startswith("layers.")}
    if len(expected) + len(EXTRA) != len(tensors):
        raise StateError(f"{folder}: the cache file holds unexpected tensors "
                         f"{sorted(set(tensors) - expected - set(EXTRA))[:5]}")


def _check_layout(folder: Path, meta: dict, saved: torch.Tensor | None) -> None:
    """The video's layout, [[first origin, first step, tokens per step], ...]: where each frame size's
    tokens begin in the stream and in time, which compressing positions moves keys by."""
    layout, c = meta.get("video_layout"), meta
    if not isinstance(layout, list) or len(layout) > c["steps"] or not all(
            isinstance(e, list) and len(e) == 3 and all(isinstance(x, int) and not isinstance(x, bool) for x in e)
            for e in layout):
        raise StateError(f"{folder}: the manifest's video_layout must be a list of [first origin, first step, "
                         f"tokens per step] integers, one per frame size, got {str(layout)[:200]}")
    if (bool(layout) != bool(c["steps"]) or (layout and (layout[0][0] != c["sink_tokens"] or layout[0][1] != 0))
            or any(e[2] < 1 for e in layout)
            or any(b[0] <= a[0] or b[1] <= a[1] or b[0] - a[0] != (b[1] - a[1]) * a[2]
                   for a, b in zip(layout, layout[1:]))
            or (layout and layout[-1][0] + (c["steps"] - layout[-1][1]) * layout[-1][2] != c["tokens_seen"])):
        raise StateError(f"{folder}: the manifest's video_layout {str(layout)[:200]} does not add up to the "
                         f"{c['steps']} temporal steps and {c['tokens_seen'] - c['sink_tokens']} video tokens saved")
    if saved is None or saved.dtype != torch.int64 or saved.tolist() != layout:
        raise StateError(f"{folder}: the manifest's video_layout differs from the cache file's; the manifest "
                         f"was edited")


def _check_cache(folder: Path, context: StreamContext, start: dict, tensors: dict) -> None:
    """The restored layers against the model, the counters and the cache the stream starts from:
    shapes, sinks (each layer begins with exactly the tokens it started with), origins."""
    adapter, sink = context.adapter, context.sink_tokens
    if sink != start["sink_tokens"]:
        raise StateError(f"{folder}: the state keeps {sink} attention-sink tokens, this stream starts from "
                         f"{start['sink_tokens']} (this model's preamble"
                         + (" and its task pack)" if context.task is not None else ")"))
    merged = sum(k.endswith(".log_mass") for k in tensors)  # a layer that merged dropped tokens keeps their mass
    linear = sum(bool(LINEAR_NAME.fullmatch(k)) for k in tensors)  # a hybrid model's recurrent states, checked below
    if len(tensors) - len(EXTRA) - merged - linear != 4 * adapter.num_layers or merged > adapter.num_layers:
        raise StateError(f"{folder}: the cache file holds {len(tensors) - len(EXTRA)} layer tensors, the model needs "
                         f"{4 * adapter.num_layers} (and up to {adapter.num_layers} log_mass)")
    expected = context.temporal.halvings_for(context.temporal.steps - 1)
    if context.temporal.halvings != expected:
        raise StateError(f"{folder}: temporal_halvings = {context.temporal.halvings}, but a stream of "
                         f"{context.temporal.steps} temporal steps under temporal_range {context.temporal.range} "
                         f"has halved its spacing {expected} times")
    for i, layer in enumerate(context.cache.layers):
        keys, origins = layer.keys, layer.committed_origins()
        shape = (1, adapter.num_kv_heads, layer.length, adapter.head_dim)
        if tuple(keys.shape) != shape or tuple(layer.values.shape[:3]) != shape[:3]:
            raise StateError(f"{folder}: layer {i} holds keys {tuple(keys.shape)}; this model needs {shape}")
        if keys.dtype != adapter.dtype or not (torch.isfinite(keys).all() and torch.isfinite(layer.values).all()):
            raise StateError(f"{folder}: layer {i}'s keys/values are not finite {adapter.dtype} numbers")
        first = start["origins"][i]
        n = first.shape[-1]
        if (layer.length < n or not torch.equal(origins[..., :n].cpu(), first)
                or int((origins[..., n:] < sink).sum()) or (start["keys"] is not None and not torch.equal(
                    keys[:, :, :n].cpu(), start["keys"][i]))):
            raise StateError(f"{folder}: layer {i} lost its attention-sink tokens")
        if int(origins.min()) < 0 or int(origins.max()) >= context.tokens_seen:
            raise StateError(f"{folder}: layer {i} holds tokens beyond the {context.tokens_seen} tokens seen")
        if any(len(torch.unique(head)) != layer.length for head in origins[0]):
            raise StateError(f"{folder}: layer {i} holds a token twice")
        mass = layer.attention_bias()
        if mass is not None and not (torch.isfinite(mass).all() and (mass >= 0).all()):
            raise StateError(f"{folder}: layer {i}'s log_mass is not finite and >= 0")
        _check_recurrent(folder, i, layer, adapter.recurrent_state_shapes(i))


def _check_recurrent(folder: Path, i: int, layer, expected: dict) -> None:
    """A hybrid model's linear-attention states of layer i: exactly the ones the model has, each of its
    shape and dtype and finite (nothing else can be checked of a recurrence: any state is possible)."""
    saved = layer.recurrent.export() if layer.recurrent is not None else {}
    if set(saved) != set(expected):
        raise StateError(f"{folder}: layer {i} holds linear-attention states {sorted(saved)}, this model needs "
                         f"{sorted(expected)}")
    for name, (shape, dtype) in expected.items():
        state = saved[name]
        if tuple(state.shape) != tuple(shape) or state.dtype != dtype:
            raise StateError(f"{folder}: layer {i}'s linear-attention state {name} is {tuple(state.shape)} "
                             f"{state.dtype}; this model needs {tuple(shape)} {dtype}")
        if not torch.isfinite(state).all():
            raise StateError(f"{folder}: layer {i}'s linear-attention state {name} is not finite")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _serial_of(folder: Path) -> int:
    """The serial of the manifest now in `folder` (0 if none, or if it cannot be trusted)."""
    try:
        serial = json.loads((folder / "manifest.json").read_text()).get("serial", 0)
        return serial if isinstance(serial, int) and 0 <= serial < 1 << 60 else 0
    except (OSError, ValueError, AttributeError, RecursionError):
        return 0


def _fsync(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())
