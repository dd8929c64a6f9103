"""EMLoC: fold video chunks into a bounded, group-wise pruned KV cache.

Knows tensors and models only; sources, queues and delivery live in `stream/` and `sinks/`.
"""

from .adapters import InputError, ModelAdapter, UnsupportedModelError, adapter_for
from .cache import PrunedCache, PrunedLayer
from .context import StreamContext
from .loading import load_adapter
from .observer import Observer, js_divergence
from .policies import GroupDecision, JSBoundedSearch, Retention, RetentionPolicy
from .records import Answer, FoldRecord
from .scorers import Scorer, build_scorer
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
from .task_pack import PackError, TaskExample, TaskPack

__all__ = [
    "Answer", "EMLoCSettings", "FoldRecord", "GroupDecision", "InputError", "JSBoundedSearch", "ModelAdapter",
    "Observer", "PrunedCache", "PrunedLayer", "Retention", "RetentionPolicy", "Scorer", "SettingsError",
    "StreamContext", "UnsupportedModelError", "adapter_for", "build_scorer", "js_divergence", "load_adapter",
    "layer_wise", "many_shot", "PackError", "TaskExample", "TaskPack", "preset", "query_agnostic", "reference_code",
    "videomme_online",
]
