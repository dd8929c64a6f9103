"""Importance scorers: one small file each, one interface (`Scorer.score`).

`scorer_from_settings` builds what `EMLoCSettings.scorer` names: one name, or several joined
by '+' (equal weights), optionally under a coverage floor (`coverage_buckets`).
"""

from __future__ import annotations

from .base import ChunkView, Scorer, relative
from .combined import Combined
from .coverage import CoverageFloor
from .key_diversity import KeyDiversity
from .observer_attention import ObserverAttention, TemplateAttention, attention_share, smooth
from .temporal_novelty import TemporalNovelty
from .value_norm import ValueNorm

SCORERS = {
    "observer": "observers' attention (EMLoC; smoothing_kernel applies)",
    "template": "attention of the assistant-turn template, a proxy query (StreamMem)",
    "tar": "temporal novelty of each spatial patch (InfiniPot-V TaR)",
    "van": "value norm (InfiniPot-V VaN)",
    "keydiff": "key diversity from the chunk's mean key (KeyDiff)",
}


def scorer_names(spec: str) -> list[str]:
    """The names in a spec such as 'tar+observer'; raises ValueError naming an unknown one."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a scorer spec is one or more of {sorted(SCORERS)} joined by '+', got {spec!r}")
    names = [part.strip() for part in spec.split("+")]
    unknown = [n for n in names if n not in SCORERS]
    if unknown:
        raise ValueError(f"unknown scorer(s) {unknown} in {spec!r}; scorers are {sorted(SCORERS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"scorer spec {spec!r} names a scorer twice")
    return names


def build_scorer(spec: str, *, smoothing_kernel: int = 5, coverage_buckets: int = 0) -> Scorer:
    def one(name: str) -> Scorer:
        if name == "observer":
            return ObserverAttention(smoothing_kernel)
        if name == "template":
            return TemplateAttention(smoothing_kernel)
        return {"tar": TemporalNovelty, "van": ValueNorm, "keydiff": KeyDiversity}[name]()

    names = scorer_names(spec)
    scorer = one(names[0]) if len(names) == 1 else Combined(tuple((one(n), 1.0) for n in names))
    return CoverageFloor(scorer, coverage_buckets) if coverage_buckets else scorer


def scorer_from_settings(settings) -> Scorer:
    return build_scorer(settings.scorer, smoothing_kernel=settings.smoothing_kernel,
                        coverage_buckets=settings.coverage_buckets)


__all__ = ["SCORERS", "ChunkView", "Combined", "CoverageFloor", "KeyDiversity", "ObserverAttention", "Scorer",
           "TemplateAttention", "TemporalNovelty", "ValueNorm", "attention_share", "build_scorer", "relative",
           "scorer_from_settings", "scorer_names", "smooth"]
