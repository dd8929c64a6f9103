"""Temporal novelty per spatial patch (InfiniPot-V's TaR, made causal-free and position-free):
how unlike a token's key is to the same patch in the frames around it. Static background
scores near 0; what appears, moves or changes scores high."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import ChunkView, Scorer


@dataclass(frozen=True)
class TemporalNovelty(Scorer):
    """1 - cos(key, mean key of the same patch over the `window` steps either side, within the
    chunk), on keys with RoPE undone (a rotated key changes with its position alone).

    window: steps on each side that form the patch's background (>= 1).
    recent: the chunk's last `recent` steps score as high as its most novel token, as
        InfiniPot-V keeps its most recent frames: what is on screen *now* is never dropped
        for being static (0 = off).
    """

    window: int = 2
    recent: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be an integer >= 1, got {self.window!r}")
        if not isinstance(self.recent, int) or self.recent < 0:
            raise ValueError(f"recent must be an integer >= 0, got {self.recent!r}")

    def raw(self, chunk: ChunkView, layer: int) -> torch.Tensor:
        steps, patches = chunk.patches()
        keys = F.normalize(chunk.unrotated_keys(layer), dim=-1)  # (1, H, n, D)
        if steps * patches != keys.shape[2]:
            return self._ragged(chunk, keys)
        heads, dim = keys.shape[1], keys.shape[-1]
        grid = keys.reshape(heads, steps, patches, dim)
        if steps == 1:
            return keys.new_zeros(1, heads, steps * patches)
        # sum of neighbours within +-window steps (a box filter along time), minus the token itself
        padded = F.pad(grid.permute(0, 2, 3, 1).reshape(-1, 1, steps), (self.window, self.window))
        ones = keys.new_ones(1, 1, 2 * self.window + 1)
        box = F.conv1d(padded, ones).reshape(heads, patches, dim, steps)
        counts = F.conv1d(F.pad(keys.new_ones(1, 1, steps), (self.window, self.window)), ones).reshape(steps) - 1
        neighbours = (box.permute(0, 3, 1, 2) - grid) / counts.view(1, steps, 1, 1)
        novelty = (1 - F.cosine_similarity(grid, neighbours, dim=-1)).clamp_min(0)  # (H, steps, patches)
        if self.recent:
            novelty[:, -self.recent:] = novelty.amax(dim=(1, 2)).view(heads, 1, 1)
        return novelty.reshape(1, heads, steps * patches)

    def _ragged(self, chunk: ChunkView, keys: torch.Tensor) -> torch.Tensor:
        """Steps of different lengths (Qwen3-VL: a step's timestamp text is longer from 10 s, 100 s, ...):
        each step's tokens aligned from its end, where its frame's patches are, and compared with the
        tokens in the same slot of the steps around it that have one."""
        token_steps = chunk.token_steps.to(keys.device)
        counts = torch.bincount(token_steps)
        steps, width, (_, heads, n, dim) = len(counts), int(counts.max()), keys.shape
        first = torch.cumsum(counts, 0) - counts
        slot = torch.arange(n, device=keys.device) - first[token_steps] + (width - counts[token_steps])
        grid = keys.new_zeros(heads, steps, width, dim)
        grid[:, token_steps, slot] = keys[0]
        valid = keys.new_zeros(steps, width)
        valid[token_steps, slot] = 1
        ones = keys.new_ones(1, 1, 2 * self.window + 1)

        def along_time(x: torch.Tensor) -> torch.Tensor:  # (..., steps) summed over +-window steps
            shape = x.shape
            return F.conv1d(F.pad(x.reshape(-1, 1, steps), (self.window, self.window)), ones).reshape(shape)

        box = along_time(grid.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) - grid  # (H, steps, width, D)
        others = (along_time(valid.T).T - valid).clamp_min(0)  # (steps, width) neighbours with this slot
        neighbours = box / others.clamp_min(1).view(1, steps, width, 1)
        novelty = (1 - F.cosine_similarity(grid, neighbours, dim=-1)).clamp_min(0) * (others > 0)
        if self.recent:
            novelty[:, -self.recent:] = novelty.amax(dim=(1, 2)).view(heads, 1, 1)
        return novelty[:, token_steps, slot].unsqueeze(0)

