"""A small UNet velocity network for 28×28 digits: x_t, t, tt, class → v (docs/algorithm.md §1).

t and tt are signed (a negative time marks the twin trajectory), so their embedding keeps
the sign: sin features are odd, and the raw value is appended. Class ``num_classes`` is the
null label of the unconditional branch.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn
import torch.nn.functional as F

__all__ = ["MnistUNet", "NULL_LABEL_OFFSET"]

NULL_LABEL_OFFSET = 0  # null label = num_classes + this (one extra embedding row)


class TimeFeatures(nn.Module):
    """[t, sin(ω t), cos(ω t)] on a geometric ladder of frequencies."""

    def __init__(self, n_freq: int):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(1000.0), n_freq)),
                             persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        a = t.float()[:, None] * self.freqs
        return torch.cat([t.float()[:, None], torch.sin(a), torch.cos(a)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int = 8):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)  # scale and shift after the second norm
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class MnistUNet(nn.Module):
    """Three resolutions (28, 14, 7), one residual block per level and side.

    ``forward(x_t, t, tt, c=None)``: x_t [B, 1, 28, 28], t and tt [B] in [−1, 1],
    ``c`` = ``[labels]`` (int64 [B], ``num_classes`` = null) or None (all null).
    """

    def __init__(self, width: int = 16, mults: Sequence[int] = (1, 2, 4), num_classes: int = 10,
                 emb_dim: int = 128, n_freq: int = 16):
        super().__init__()
        self.config = dict(width=width, mults=list(mults), num_classes=num_classes,
                           emb_dim=emb_dim, n_freq=n_freq)
        self.num_classes = num_classes
        self.time = TimeFeatures(n_freq)
        self.time_mlp = nn.Sequential(nn.Linear(2 * (2 * n_freq + 1), emb_dim), nn.SiLU(),
                                      nn.Linear(emb_dim, emb_dim))
        self.label = nn.Embedding(num_classes + 1, emb_dim)
        chans = [width * m for m in mults]
        self.conv_in = nn.Conv2d(1, chans[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        c = chans[0]
        for i, ch in enumerate(chans):
            self.down.append(ResBlock(c, ch, emb_dim))
            c = ch
            if i < len(chans) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.mid = ResBlock(c, c, emb_dim)
        self.up = nn.ModuleList()
        for i, ch in reversed(list(enumerate(chans))):
            self.up.append(ResBlock(c + ch, ch, emb_dim))
            c = ch
        self.norm_out = nn.GroupNorm(8, c)
        self.conv_out = nn.Conv2d(c, 1, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def null_labels(self, n: int, device=None) -> torch.Tensor:
        return torch.full((n,), self.num_classes, dtype=torch.long, device=device)

    def forward(self, x: torch.Tensor, t: torch.Tensor, tt: torch.Tensor,
                c: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        labels = c[0] if c else self.null_labels(x.shape[0], x.device)
        emb = self.time_mlp(torch.cat([self.time(t), self.time(tt)], dim=1)) + self.label(labels)
        emb = F.silu(emb)
        h = self.conv_in(x)
        skips = []
        for i, block in enumerate(self.down):
            h = block(h, emb)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid(h, emb)
        for i, block in enumerate(self.up):
            skip = skips.pop()
            if h.shape[-1] != skip.shape[-1]:
                h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = block(torch.cat([h, skip], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))
