"""Retention policies: which tokens of a chunk each layer keeps.

`JSBoundedSearch` is EMLoC; the others are the fidelity benchmark's baselines.
"""

from .base import FoldState, GroupDecision, Retention, RetentionPolicy, kept_count, top_tokens
from .js_search import JSBoundedSearch
from .keep_all import KeepAll
from .observer_topk import ObserverTopK
from .random_tokens import RandomTokens
from .streaming_window import StreamingWindow
from .uniform_frames import UniformFrames

__all__ = ["FoldState", "GroupDecision", "JSBoundedSearch", "KeepAll", "ObserverTopK", "RandomTokens", "Retention",
           "RetentionPolicy", "StreamingWindow", "UniformFrames", "kept_count", "top_tokens"]
