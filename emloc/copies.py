"""Observer copies: several short observer runs stacked along one sequence, run in one pass.

A GPU pays for a run of a few observer tokens with one sequential pass through the layers,
whatever its width. So the JS search evaluates every candidate ratio of a layer group together
(one copy of each observer per candidate), and the fold observes every waiting question
together. Copy c's rows see the cache (where a layer is being searched, only its candidate's
selection of the chunk, with that selection's merged log-mass) and themselves causally, never
another copy; `lead` rows before the copies (a chunk prefilled in the same pass) are causal.

    rows:    [ lead (causal) | copy 0 | copy 1 | ... ]
    columns: [ committed | tail (the chunk) | the new rows ]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .adapters import ModelAdapter
from .cache import PrunedCache


@dataclass
class ChunkView:
    """What one copy sees of a layer's tail: visible (1, kv_heads, tail) booleans and the
    log-mass (1, kv_heads, tail) to add to the visible keys' logits (None: none)."""

    visible: torch.Tensor
    log_mass: torch.Tensor | None = None


@dataclass
class Copies:
    """lengths: rows of each copy, after `lead` causal rows.
    views[layer][c]: what copy c sees of that layer's tail; a layer absent sees the tail whole."""

    lengths: list[int]
    lead: int = 0
    views: dict[int, list[ChunkView]] = field(default_factory=dict)

    @property
    def spans(self) -> list[tuple[int, int]]:
        """(first, end) row of each copy in the pass's hidden state."""
        out, start = [], self.lead
        for n in self.lengths:
            out.append((start, start + n))
            start += n
        return out

    @property
    def rows(self) -> int:
        return self.lead + sum(self.lengths)

    def owners(self, device: torch.device) -> torch.Tensor:
        """(rows,) the copy each row belongs to, -1 for lead rows."""
        ids = [torch.full((self.lead,), -1, dtype=torch.long)]
        ids += [torch.full((n,), c, dtype=torch.long) for c, n in enumerate(self.lengths)]
        return torch.cat(ids).to(device)

    def mask(self, adapter: ModelAdapter, cache: PrunedCache, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """The additive mask (1, heads, rows, cached + rows) in `hidden`'s dtype for layer `index`,
        whose cache holds `cached` keys (committed + tail) before this pass's rows."""
        layer = cache.layers[index]
        n, device = hidden.shape[1], hidden.device
        if n != self.rows:
            raise ValueError(f"copies span {self.rows} rows, the pass has {n}")
        cached = layer.get_seq_length()
        kv_heads = adapter.num_kv_heads
        owner = self.owners(device)
        rows = torch.arange(n, device=device)
        # new columns: causal, and a copy sees its own rows and the lead rows only
        new_ok = (rows.view(1, -1) <= rows.view(-1, 1)) & (
            (owner.view(1, -1) == owner.view(-1, 1)) | (owner.view(1, -1) == -1))
        bias = torch.zeros(1, kv_heads, n, cached + n, dtype=torch.float32, device=device)
        if cached:
            cached_bias = layer.attention_bias()
            if cached_bias is not None:
                bias[..., :cached] = cached_bias[..., :cached].unsqueeze(2)
        bias[..., cached:] = bias[..., cached:].masked_fill(~new_ok, float("-inf"))
        views = self.views.get(index)
        if views is not None:
            start = layer.length  # the tail: the chunk being searched
            for (first, end), view in zip(self.spans, views):
                tail = bias[:, :, first:end, start:cached]
                extra = torch.zeros_like(view.visible, dtype=torch.float32) if view.log_mass is None else view.log_mass
                tail.copy_(extra.unsqueeze(2).expand_as(tail))
                tail.masked_fill_(~view.visible.unsqueeze(2).expand_as(tail), float("-inf"))
        bias = bias.repeat_interleave(adapter.num_heads // kv_heads, dim=1)
        return bias.to(hidden.dtype)


def observer_attention(queries: torch.Tensor, keys: torch.Tensor, scale: float, n: int,
                       key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of `queries` (1, H, n, D) onto `keys` (1, Hkv, P + n, D), the last n
    keys being the queries' own (causal). Returns (1, Hkv, P): attention onto the first P keys,
    summed over the n queries and the query heads of each KV head, in float32.
    key_bias: (1, Hkv, >= P + n) log-mass of merged keys, added to their logits."""
    heads, kv_heads = queries.shape[1], keys.shape[1]
    q = queries.float().reshape(1, kv_heads, heads // kv_heads * n, -1)
    scores = torch.matmul(q, keys.float().transpose(-1, -2)) * scale  # (1, Hkv, G*n, P+n)
    if key_bias is not None:
        scores = scores + key_bias[..., :keys.shape[2]].unsqueeze(2)
    prefix = keys.shape[2] - n
    own = torch.arange(n, device=keys.device)
    future = own.view(1, -1) > own.view(-1, 1)  # (n, n): query i must not see key j > i
    scores[..., prefix:] = scores[..., prefix:].masked_fill(future.repeat(heads // kv_heads, 1), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return probs[..., :prefix].sum(dim=2)


def copy_attention(queries: torch.Tensor, keys: torch.Tensor, scale: float, copies: Copies, prefix: int,
                   key_bias: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Per copy, its attention onto the first `prefix` keys (everything before the copies: the
    committed cache and lead rows), summed over its positions and the query heads of each KV head:
    a list of (1, kv_heads, prefix) float32. queries: (1, heads, rows - lead, head_dim) of the copies'
    rows; keys: (1, kv_heads, prefix + rows - lead, head_dim), the copies' own keys last."""
    out = []
    for first, end in copies.spans:
        a, b = first - copies.lead, end - copies.lead
        own = torch.cat([keys[:, :, :prefix], keys[:, :, prefix + a:prefix + b]], dim=2)
        bias = None
        if key_bias is not None:
            bias = torch.cat([key_bias[..., :prefix], key_bias[..., prefix + a:prefix + b]], dim=-1)
        out.append(observer_attention(queries[:, :, a:b], own, scale, b - a, bias))
    return out
