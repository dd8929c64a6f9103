"""The observers' attention (EMLoC's importance): what the waiting questions, the standing
questions or the probe (with the model's own answer) look at in the chunk."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import EPS, ChunkView, Scorer


def attention_share(per_pass: list[torch.Tensor], skip: int = 0) -> torch.Tensor | None:
    """Mean over observers of each observer's share of its attention onto the scored tokens,
    times their number: (1, kv_heads, n) with mean 1 per head. Every observer has one equal
    voice however many tokens it has; the first `skip` tokens (sinks) are scored 0 and left
    out of the shares. None when there is no observer."""
    if not per_pass:
        return None
    shares = []
    for attention in per_pass:
        a = attention.float().clone()
        a[..., :skip] = 0
        shares.append(a / a.sum(dim=-1, keepdim=True).clamp_min(EPS))
    return torch.stack(shares).mean(dim=0) * max(per_pass[0].shape[-1] - skip, 1)


def smooth(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Average pool of width `kernel` along the token axis of (1, kv_heads, n) scores
    (zero-padded at the ends, as the reference code does)."""
    if kernel == 1:
        return scores
    return F.avg_pool1d(scores, kernel_size=kernel, stride=1, padding=kernel // 2)


@dataclass(frozen=True)
class ObserverAttention(Scorer):
    """Each observer's attention share, averaged over observers, smoothed along the tokens.

    kernel: width of the smoothing average pool (odd; 1 = none).
    """

    kernel: int = 5
    needs_attention = True

    def __post_init__(self) -> None:
        if not isinstance(self.kernel, int) or self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel must be an odd integer >= 1, got {self.kernel!r}")

    def raw(self, chunk: ChunkView, layer: int) -> torch.Tensor:
        share = attention_share(chunk.attention[layer])
        if share is None:  # no observer ran (a policy that needs none): no preference
            return chunk.keys[layer].new_zeros(chunk.keys[layer].shape[:3], dtype=torch.float32)
        return smooth(share, self.kernel)


@dataclass(frozen=True)
class TemplateAttention(ObserverAttention):
    """StreamMem's proxy query: the attention of the assistant-turn template (the tokens that
    close the user turn and open the answer, with no question) onto the chunk. Costs one pass
    of a few tokens and needs no question and no generated answer."""

    needs_attention = False
    needs_template = True

    def raw(self, chunk: ChunkView, layer: int) -> torch.Tensor:
        if chunk.template is None:
            raise ValueError("the template scorer needs the template's attention, which the fold did not run")
        return smooth(attention_share([chunk.template[layer]]), self.kernel)
