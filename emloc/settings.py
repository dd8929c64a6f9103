"""Typed EMLoC settings and the presets the paper and its reference code use.

Every field is checked when the object is built, so a wrong setting fails at load
time with a message naming it, never halfway through a stream. Checks that need
the model (how many layers a group holds, does the chunk fit its temporal patch?) run in `for_model`,
the one place settings meet a model's depth.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields, replace

DEFAULT_PROBE = "Describe what happens in the video."
# The longest answer in tokens, on every path that answers: `StreamContext.answer`, and in stream/ the
# CLI, HTTP, MQTT, the OpenAI endpoint, Ray workers and the video job (`model.max_new_tokens` of a config).
MAX_NEW_TOKENS = 16


class SettingsError(ValueError):
    """A setting is impossible; the message names it and says what is allowed."""


@dataclass(frozen=True)
class EMLoCSettings:
    """How a stream's context is folded and pruned.

    The defaults are the query-agnostic setting that won the benchmark
    (docs/benchmarks/agnostic.md): the paper's online search (groups, delta 0.04, m = 16) with
    a finer ratio ladder, bounded on the probe plus the model's own answer, tokens ranked by
    temporal novelty + key diversity (no question needed), dropped tokens merged. The paper's exact method is
    the `videomme_online` preset (and `reference_code`, `layer_wise`).

    layer_group_size: consecutive decoder layers that share one retention ratio
        (1 = layer-wise). Must divide the model's layer count. None (the default): the model's
        layers cut into `layer_groups` equal groups, decided by `for_model` once the model is known.
    layer_groups: how many equal groups the model's layers are cut into when `layer_group_size`
        is None. 2: half the model's layers a group (14 of Qwen2-VL-7B's 28, the paper's online
        setting); a depth the count does not divide is searched layer-wise (groups of 1).
    delta: Jensen-Shannon bound (nats) on the observer's output distribution.
    ratios: retention candidates, tried in ascending order per group; a group
        where none passes keeps its whole chunk.
    chunk_frames: frames folded at a time (a multiple of the temporal patch).
    observed_positions: the last `m` observer positions whose output must stay
        within `delta` (the reference code uses 16).
    smoothing_kernel: width of the average pool applied to importance along the
        token axis (odd).
    token_budget: optional hard cap of tokens per layer; when committing would
        exceed it the lowest-importance tokens are evicted, never the sinks.
    importance_decay: weight of past observer attention when a committed token's
        importance is updated at a later fold (0 = only the newest observation).
    probe_prompt: observer used when no question is waiting or standing.
    system_prompt: the text at the start of the stream (it is the attention sink).
    max_observers: how many waiting/standing questions act as observers per chunk.
    probe_answer_tokens: when > 0, the probe observer is followed by the model's own greedy
        answer to it (up to this many tokens) over the unpruned chunk, so the bound covers
        what the model says about the video and not only the prompt's next-token guesses
        (0 = the paper's observer, the prompt alone).
    probe_answer_refresh: how that answer follows the video. 'carry' (default): the answer the
        model gave over the previous chunk rides in this chunk's prefill pass, which checks it
        token by token (the bound covers the tokens the model still says) and adds the next token,
        so it costs no pass of its own (a GPU pays per sequential pass, and a fresh decode is one
        pass per token); the answer grows a token a chunk. 'carry_start': the same, the first
        answer decoded in full (once per stream, `probe_answer_tokens` passes). 'decode': a fresh
        greedy answer over every chunk, `probe_answer_tokens` sequential passes each.
        docs/benchmarks/search.md has what each costs and keeps.
    scorer: how a chunk's tokens are ranked before the search decides how many each layer
        group keeps: one of `emloc.scorers.SCORERS` ('observer' = EMLoC's observer attention,
        'tar' temporal novelty, 'van' value norm, 'keydiff' key diversity, 'template' the
        assistant-turn template as proxy query) or several joined by '+' (equal weights).
        The budget evicts by the same score.
    coverage_buckets: when > 0, each chunk is cut into this many stretches of time and each
        stretch's best token is ranked first, so no stretch is dropped whole (0 = off).
    merge_dropped: each dropped chunk token is merged into the kept token whose key is most
        like it, as proportional attention: a kept token that stands for m tokens draws the
        attention m of them would (its logit + log m). Pruning then no longer shifts attention
        onto what is kept, which counting needs (not with flash attention).
    temporal_range: temporal positions the model can read a video over. When the next chunk
        would reach past it, the video's temporal positions are halved (the committed keys
        re-rotated, the stream going on at half the spacing) as often as needed, so an endless
        stream stays in the range the model reads well (position interpolation). None: the
        range the checkpoint declares (`emloc_temporal_range` in its config.json: 256 and 128 for the
        shipped tiny models; real Qwen2-VL checkpoints declare none, so their positions are
        never compressed, as in the paper); 0: never compress.
    """

    layer_group_size: int | None = None
    layer_groups: int = 2
    delta: float = 0.04
    ratios: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
    chunk_frames: int = 64
    observed_positions: int = 16
    smoothing_kernel: int = 5
    token_budget: int | None = None
    importance_decay: float = 0.5
    probe_prompt: str = DEFAULT_PROBE
    system_prompt: str = "You are a helpful assistant."
    max_observers: int = 4
    probe_answer_tokens: int = 16
    probe_answer_refresh: str = "carry"
    scorer: str = "tar+keydiff"
    coverage_buckets: int = 0
    merge_dropped: bool = True
    temporal_range: int | None = None

    def __post_init__(self) -> None:
        given = self.ratios
        ratios = tuple(given) if not isinstance(given, (str, bytes, dict)) and hasattr(given, "__iter__") else None
        _require(ratios is not None and all(isinstance(r, numbers.Real) and not isinstance(r, bool) for r in ratios),
                 f"ratios must be a list of numbers, got {given!r}")
        object.__setattr__(self, "ratios", tuple(float(r) for r in ratios))
        _require(self.layer_group_size is None or (_integer(self.layer_group_size) and self.layer_group_size >= 1),
                 f"layer_group_size must be an integer >= 1 (or none: layer_groups equal groups), "
                 f"got {self.layer_group_size!r}")
        _require(_integer(self.layer_groups) and self.layer_groups >= 1,
                 f"layer_groups must be an integer >= 1, got {self.layer_groups!r}")
        _require(isinstance(self.delta, (int, float)) and math.isfinite(self.delta) and self.delta >= 0,
                 f"delta must be a finite number >= 0, got {self.delta!r}")
        _require(len(self.ratios) > 0, "ratios must not be empty: give at least one retention ratio, e.g. (0.1, 1.0)")
        for r in self.ratios:
            _require(0 < r <= 1, f"every ratio must lie in (0, 1], got {r} in {self.ratios}")
        _require(all(a < b for a, b in zip(self.ratios, self.ratios[1:])),
                 f"ratios must be strictly ascending (they are tried in order), got {self.ratios}")
        _require(isinstance(self.chunk_frames, int) and self.chunk_frames >= 1,
                 f"chunk_frames must be an integer >= 1, got {self.chunk_frames!r}")
        _require(isinstance(self.observed_positions, int) and self.observed_positions >= 1,
                 f"observed_positions must be an integer >= 1, got {self.observed_positions!r}")
        kernel = self.smoothing_kernel
        _require(isinstance(kernel, int) and kernel >= 1 and kernel % 2 == 1,
                 f"smoothing_kernel must be an odd integer >= 1, got {self.smoothing_kernel!r}")
        _require(self.token_budget is None or (isinstance(self.token_budget, int) and self.token_budget >= 1),
                 f"token_budget must be None or an integer >= 1, got {self.token_budget!r}")
        _require(0 <= self.importance_decay < 1, f"importance_decay must lie in [0, 1), got {self.importance_decay!r}")
        _require(isinstance(self.probe_prompt, str) and self.probe_prompt.strip() != "",
                 "probe_prompt must be a non-empty string")
        _require(isinstance(self.probe_answer_tokens, int) and self.probe_answer_tokens >= 0,
                 f"probe_answer_tokens must be an integer >= 0, got {self.probe_answer_tokens!r}")
        _require(self.probe_answer_refresh in ("carry", "carry_start", "decode"),
                 f"probe_answer_refresh must be 'carry' or 'decode', got {self.probe_answer_refresh!r}")
        from .scorers import scorer_names  # here, not at the top: the scorers import torch, a config need not

        try:
            scorer_names(self.scorer)
        except ValueError as error:
            raise SettingsError(f"scorer: {error}") from None
        _require(isinstance(self.coverage_buckets, int) and self.coverage_buckets >= 0,
                 f"coverage_buckets must be an integer >= 0, got {self.coverage_buckets!r}")
        _require(isinstance(self.merge_dropped, bool),
                 f"merge_dropped must be true or false, got {self.merge_dropped!r}")
        _require(self.temporal_range is None or (isinstance(self.temporal_range, int)
                                                  and not isinstance(self.temporal_range, bool)
                                                  and (self.temporal_range == 0 or self.temporal_range >= 2)),
                 f"temporal_range must be None (the model's), 0 (never compress) or an integer >= 2, "
                 f"got {self.temporal_range!r}")
        _require(isinstance(self.max_observers, int) and self.max_observers >= 1,
                 f"max_observers must be an integer >= 1, got {self.max_observers!r}")

    def for_model(self, num_layers: int, temporal_patch: int) -> EMLoCSettings:
        """These settings on a model with `num_layers` decoder layers (a hybrid model counts its
        full-attention ones) and `temporal_patch` frames a temporal patch: the layer group size
        decided (`layer_group_size`, else `layer_groups` equal groups) and checked, as is the chunk
        length. The one place the group size is decided: the engine and `StreamContext` call it."""
        g = self.layer_group_size
        if g is None:
            g = num_layers // self.layer_groups if num_layers % self.layer_groups == 0 else 1
        if g > num_layers or num_layers % g:
            divisors = [d for d in range(1, num_layers + 1) if num_layers % d == 0]
            raise SettingsError(
                f"layer_group_size={g} does not divide the model's {num_layers} decoder layers into equal groups "
                f"(a hybrid model counts its full-attention layers, the ones that hold keys and values); "
                f"use one of {divisors}"
            )
        if self.chunk_frames % temporal_patch:
            raise SettingsError(
                f"chunk_frames={self.chunk_frames} must be a multiple of the model's temporal patch size "
                f"{temporal_patch}, so that chunks join into one continuous video"
            )
        return self if g == self.layer_group_size else replace(self, layer_group_size=g)

    @classmethod
    def from_dict(cls, data: dict) -> EMLoCSettings:
        """Builds settings from plain data (a YAML section); an unknown key is an error."""
        _check_names(data)
        data = dict(data)
        return cls(**data)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["ratios"] = list(self.ratios)
        return out


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise SettingsError(message)


# The paper's method: its observer alone ranks and bounds, nothing merged.
PAPER = dict(scorer="observer", probe_answer_tokens=0, coverage_buckets=0, merge_dropped=False)


def _over(base: dict, overrides: dict) -> EMLoCSettings:
    """A preset's `base` with `overrides` over it; `layer_groups` given without `layer_group_size`
    replaces the preset's group size (the preset's grouping relative to the model's depth)."""
    if "layer_groups" in overrides and "layer_group_size" not in overrides:
        base = {k: v for k, v in base.items() if k != "layer_group_size"}
    return EMLoCSettings(**{**base, **overrides})


def query_agnostic(**overrides) -> EMLoCSettings:
    """The default: what won the query-agnostic benchmark (see `EMLoCSettings`)."""
    return EMLoCSettings(**overrides)


def videomme_online(**overrides) -> EMLoCSettings:
    """The paper's online VideoMME setting (Qwen2-VL-7B: 27.9k -> 2.3k tokens)."""
    base = dict(layer_group_size=14, delta=0.04, ratios=(0.02, 0.1, 0.5, 1.0), chunk_frames=64, **PAPER)
    return _over(base, overrides)


def reference_code(**overrides) -> EMLoCSettings:
    """The setting of the authors' video code path: groups of 7, delta 0.05, fallback keeps all."""
    base = dict(layer_group_size=7, delta=0.05, ratios=(0.02, 0.05, 0.1, 1.0), chunk_frames=64, **PAPER)
    return _over(base, overrides)


def layer_wise(**overrides) -> EMLoCSettings:
    """Layer-wise search with the paper's many-shot bound and ratios."""
    base = dict(layer_group_size=1, delta=0.005, ratios=(0.1, 0.2, 0.5, 1.0), chunk_frames=64, **PAPER)
    return _over(base, overrides)


def many_shot(**overrides) -> EMLoCSettings:
    """The paper's many-shot adaptation (ImageNet100, 200 examples in chunks of 20): layer-wise,
    delta 0.005, ratios 0.1/0.2/0.5/1.0, observer attention; what task packs are built with.
    Up to 16 held-out examples observe each chunk (the paper gives no count): with 4, the
    classes no observer showed lost their examples' tokens, 12 points below full context at 50
    examples against 1 with 16 (docs/benchmarks/examples.md)."""
    base = dict(layer_group_size=1, delta=0.005, ratios=(0.1, 0.2, 0.5, 1.0), max_observers=16, **PAPER)
    return _over(base, overrides)


PRESETS = {"query_agnostic": query_agnostic, "videomme_online": videomme_online, "reference_code": reference_code,
           "layer_wise": layer_wise, "many_shot": many_shot}


def preset(name: str, **overrides) -> EMLoCSettings:
    if not isinstance(name, str) or name not in PRESETS:
        raise SettingsError(f"unknown preset {name!r}; presets are {sorted(PRESETS)}")
    _check_names(overrides)
    return PRESETS[name](**overrides)


def _check_names(data: dict) -> None:
    known = {f.name for f in fields(EMLoCSettings)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SettingsError(f"unknown EMLoC setting(s) {unknown}; known settings are {sorted(known)}")
