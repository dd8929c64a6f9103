"""One interface for query-agnostic (and observer) importance: a scorer ranks a chunk's tokens.

A scorer returns, per layer, a (1, kv_heads, chunk_len) score; the retention policy decides
how many tokens each layer keeps (EMLoC's JS-bounded search, group by group) and keeps the
top-scoring ones; the budget later evicts the lowest committed scores. Scores are *relative
to the chunk*: every scorer's output is divided by its mean over the chunk (per layer and KV
head), so a token's importance says how much it stands out among the tokens it arrived
with. That makes importance comparable across folds and across scorers, whoever happened to
be watching (one probe or four questions) and however long their prompts were.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

EPS = 1e-12


@dataclass
class ChunkView:
    """What a scorer sees of the chunk being folded.

    keys[l], values[l]: (1, kv_heads, n, head_dim) the chunk's keys (rotated by RoPE) and values.
    rotary: (cos, sin), each (1, n, head_dim), the rotation the chunk's keys carry.
    token_steps: (n,) temporal step (frame pair) of each token, from 0 within the chunk;
        tokens of one step are its spatial patches in raster order.
    attention[l]: one (1, kv_heads, n) tensor per observer pass: that observer's attention onto
        the chunk, summed over its positions and the query heads sharing each KV head.
    template[l]: the same for the assistant-turn template (a proxy query), or None if not run.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    rotary: tuple[torch.Tensor, torch.Tensor]
    token_steps: torch.Tensor
    attention: list[list[torch.Tensor]]
    template: list[torch.Tensor] | None = None

    @property
    def chunk_len(self) -> int:
        return self.keys[0].shape[2]

    def unrotated_keys(self, layer: int) -> torch.Tensor:
        """(1, kv_heads, n, head_dim) float32 keys before RoPE, so that the same content compares
        equal at any position (a rotation by -angle undoes the rotate-half RoPE)."""
        cos, sin = (t.float().unsqueeze(1) for t in self.rotary)
        keys = self.keys[layer].float()
        rot = cos.shape[-1]  # a partial rotary (Qwen3.5) turns the first channels only
        part, half = keys[..., :rot], rot // 2
        rotated_half = torch.cat((-part[..., half:], part[..., :half]), dim=-1)
        return torch.cat((part * cos - rotated_half * sin, keys[..., rot:]), dim=-1)

    def patches(self) -> tuple[int, int]:
        """(steps, patches per step) of the chunk's token grid."""
        steps = int(self.token_steps.max()) + 1
        return steps, self.chunk_len // steps


def relative(scores: torch.Tensor) -> torch.Tensor:
    """(1, kv_heads, n) non-negative scores divided by their mean per head (mean 1; all-zero stays zero)."""
    scores = scores.float().clamp_min(0)
    return scores / scores.mean(dim=-1, keepdim=True).clamp_min(EPS)


class Scorer(ABC):
    """Importance of a chunk's tokens, per layer and KV head.

    needs_attention: uses the observers' attention (the fold then carries observer attention
        over to committed tokens at later folds, too).
    needs_template: uses the assistant-turn template's attention (the fold runs it).
    """

    needs_attention: bool = False
    needs_template: bool = False

    @abstractmethod
    def raw(self, chunk: ChunkView, layer: int) -> torch.Tensor:
        """(1, kv_heads, n) non-negative scores for `layer`, on the scorer's own scale."""

    def score(self, chunk: ChunkView, layer: int) -> torch.Tensor:
        """(1, kv_heads, n) float32 importance, mean 1 over the chunk per KV head."""
        return relative(self.raw(chunk, layer))
