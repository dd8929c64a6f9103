"""Retention policies: which tokens of a chunk each layer keeps."""

from .base import FoldState, GroupDecision, Retention, RetentionPolicy, top_tokens
from .js_search import JSBoundedSearch

__all__ = ["FoldState", "GroupDecision", "JSBoundedSearch", "Retention", "RetentionPolicy", "top_tokens"]
