"""EMLoC: fold video chunks into a bounded, group-wise pruned KV cache.

Knows tensors and models only; sources, queues and delivery live in `stream/` and `sinks/`.

The settings and the errors are imported with the package; everything else when first used
(`from emloc import StreamContext` loads the model code then): the model code imports torch and
transformers, seconds of work that `emloc-stream --help` or checking a config does not need.
"""

from __future__ import annotations

import importlib

from .errors import InputError, UnsupportedModelError
from .settings import (
    EMLoCSettings,
    SettingsError,
    layer_wise,
    many_shot,
    preset,
    query_agnostic,
    reference_code,
    videomme_online,
)

_LAZY = {  # name -> the module that defines it
    "ModelAdapter": ".adapters", "adapter_for": ".adapters",
    "PrunedCache": ".cache", "PrunedLayer": ".cache",
    "StreamContext": ".context",
    "load_adapter": ".loading",
    "Observer": ".observer", "js_divergence": ".observer",
    "GroupDecision": ".policies", "JSBoundedSearch": ".policies", "Retention": ".policies",
    "RetentionPolicy": ".policies",
    "Answer": ".records", "FoldRecord": ".records",
    "Scorer": ".scorers", "build_scorer": ".scorers",
    "PackError": ".task_pack", "TaskExample": ".task_pack", "TaskPack": ".task_pack",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # once
    return value


__all__ = [
    "Answer", "EMLoCSettings", "FoldRecord", "GroupDecision", "InputError", "JSBoundedSearch", "ModelAdapter",
    "Observer", "PrunedCache", "PrunedLayer", "Retention", "RetentionPolicy", "Scorer", "SettingsError",
    "StreamContext", "UnsupportedModelError", "adapter_for", "build_scorer", "js_divergence", "load_adapter",
    "layer_wise", "many_shot", "PackError", "TaskExample", "TaskPack", "preset", "query_agnostic", "reference_code",
    "videomme_online",
]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
