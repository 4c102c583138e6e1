"""A small UNet denoiser with composable conditioning.

The architecture follows Ho et al. 2020 (Sec. 4, Appendix B: a PixelCNN++-style UNet with
Wide-ResNet blocks, GroupNorm, sinusoidal time embedding, self-attention at chosen resolutions)
with the improvements of Nichol & Dhariwal 2021 / Dhariwal & Nichol 2021: the embedding enters
each residual block as a scale and shift of the second GroupNorm ("adaptive group norm") and
the last layer of each branch starts at zero. It is a lean variant for CPU: one skip per encoder
residual block (Ho et al. also keep the stem and downsampling outputs and use one more decoder
block per level) and upsampling that also reduces the channels to the next level's.

``encode`` and ``decode`` are exposed so that Patch-DM's feature collage (Ding et al. 2023) can
rearrange the bottleneck and skip features of neighbouring patches between the two halves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .embeddings import ConditioningEmbedding


def zero_module(module: nn.Module) -> nn.Module:
    """Set a layer's parameters to zero, so a residual branch starts as the identity (Ho et al. 2020 code)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, embedding as scale/shift of the 2nd GroupNorm, SiLU-dropout-conv, + skip."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0, groups: int = 8):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over the pixels of a feature map, residual (Ho et al. 2020; 64 channels per head)."""

    def __init__(self, ch: int, groups: int = 8, head_channels: int = 64):
        super().__init__()
        self.heads = max(1, ch // head_channels)
        if ch % self.heads:
            raise ValueError(f"attention channels {ch} must be divisible by {self.heads} heads")
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = zero_module(nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (b, heads, hw, d)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 convolution."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 convolution (to ``out_ch`` channels)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """UNet denoiser ``model(x, t, **cond) -> prediction`` with the shape of ``x``.

    Args:
        in_channels, out_channels: image channels (out defaults to in).
        base_channels: channels at full resolution; level i has base_channels * channel_mults[i].
        channel_mults: one entry per resolution level; the image is halved between levels, so
            H and W must be divisible by 2 ** (len(channel_mults) - 1).
        num_res_blocks: residual blocks per level (encoder and decoder).
        attention_resolutions: resolutions (relative to ``image_size``) that get self-attention
            after each residual block. The bottleneck always has one attention block.
        dropout: dropout inside the residual blocks (Ho et al. use 0.1 on CIFAR-10).
        image_size: nominal input size (to place attention); other divisible sizes work too.
        num_classes: class conditioning with a null token (labels=None or -1).
        guidance_embedding: condition on a scalar guidance weight ``w``.
        latent_dim: condition on a latent vector ``latent`` (B, latent_dim) (DDGAN).
        position_embedding: condition on a patch position ``position`` (B, 2) (Patch-DM).
        groups: GroupNorm groups (every channel count must be divisible by it).

    ``forward(x, t, labels=None, w=None, latent=None, position=None)`` equals
    ``decode(*encode(x, t, ...))``; ``t`` is continuous time in [0, 1], shape (B,) or a float.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int | None = None,
        base_channels: int = 32,
        channel_mults: tuple[int, ...] = (1, 2),
        num_res_blocks: int = 1,
        attention_resolutions: tuple[int, ...] = (),
        dropout: float = 0.0,
        image_size: int = 16,
        num_classes: int | None = None,
        guidance_embedding: bool = False,
        latent_dim: int | None = None,
        position_embedding: bool = False,
        groups: int = 8,
    ):
        super().__init__()
        out_channels = out_channels or in_channels
        channel_mults = tuple(channel_mults)
        self.config = dict(
            in_channels=in_channels, out_channels=out_channels, base_channels=base_channels,
            channel_mults=list(channel_mults), num_res_blocks=num_res_blocks,
            attention_resolutions=list(attention_resolutions), dropout=dropout, image_size=image_size,
            num_classes=num_classes, guidance_embedding=guidance_embedding, latent_dim=latent_dim,
            position_embedding=position_embedding, groups=groups,
        )
        if in_channels < 1 or not channel_mults or num_res_blocks < 1:
            raise ValueError("need in_channels >= 1, at least one channel multiplier and num_res_blocks >= 1")
        chs = [base_channels * m for m in channel_mults]
        if any(c % groups for c in chs):
            raise ValueError(f"every level's channels {chs} must be divisible by groups={groups}")
        self.levels = len(chs)
        self.factor = 2 ** (self.levels - 1)
        if image_size % self.factor:
            raise ValueError(f"image_size {image_size} must be divisible by 2**(levels-1) = {self.factor}")
        resolutions = [image_size // 2**i for i in range(self.levels)]
        bad = sorted(set(attention_resolutions) - set(resolutions))
        if bad:
            raise ValueError(f"attention_resolutions {bad} are not among the level resolutions {resolutions}")
        self.in_channels, self.out_channels = in_channels, out_channels

        emb_dim = 4 * base_channels
        self.embedding = ConditioningEmbedding(
            emb_dim, num_classes=num_classes, guidance=guidance_embedding, latent_dim=latent_dim,
            position=position_embedding, freq_dim=base_channels,
        )

        def attn(level: int, ch: int) -> nn.Module:
            use = resolutions[level] in attention_resolutions
            return AttentionBlock(ch, groups) if use else nn.Identity()

        self.conv_in = nn.Conv2d(in_channels, chs[0], 3, padding=1)
        self.down_blocks, self.down_attn, self.downsample = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        ch = chs[0]
        for i, c in enumerate(chs):
            for _ in range(num_res_blocks):
                self.down_blocks.append(ResBlock(ch, c, emb_dim, dropout, groups))
                self.down_attn.append(attn(i, c))
                ch = c
            if i < self.levels - 1:
                self.downsample.append(Downsample(ch))
        self.mid1 = ResBlock(ch, ch, emb_dim, dropout, groups)
        self.mid_attn = AttentionBlock(ch, groups)
        self.mid2 = ResBlock(ch, ch, emb_dim, dropout, groups)
        self.up_blocks, self.up_attn, self.upsample = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(self.levels)):
            for _ in range(num_res_blocks):
                self.up_blocks.append(ResBlock(ch + chs[i], chs[i], emb_dim, dropout, groups))
                self.up_attn.append(attn(i, chs[i]))
                ch = chs[i]
            if i > 0:
                self.upsample.append(Upsample(ch, chs[i - 1]))
                ch = chs[i - 1]
        self.norm_out = nn.GroupNorm(groups, ch)
        self.conv_out = zero_module(nn.Conv2d(ch, out_channels, 3, padding=1))
        self.num_res_blocks = num_res_blocks

    def embed(self, t, batch_size: int, **cond) -> torch.Tensor:
        """The embedding of t and the conditioning that every block reads (what ``encode`` returns as emb).
        Patch-DM's decoder takes the embedding of other positions than its encoder (Chapter 8)."""
        return self.embedding(t, batch_size=batch_size, **cond)

    def encode(self, x: torch.Tensor, t, **cond) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Embedding, encoder and bottleneck: returns (h, skips, emb) for ``decode``."""
        if x.ndim != 4:
            raise ValueError(f"UNet expects images (B, C, H, W), got shape {tuple(x.shape)}")
        b, c, h, w = x.shape
        if c != self.in_channels:
            raise ValueError(f"UNet was built for in_channels={self.in_channels}, got {c} channels")
        if h % self.factor or w % self.factor:
            raise ValueError(
                f"image size {h}x{w} must be divisible by 2**(levels-1) = {self.factor}; "
                f"pad or crop the images or use fewer channel_mults"
            )
        emb = self.embed(t, batch_size=b, **cond)
        h = self.conv_in(x)
        skips = []
        for j, (block, attn) in enumerate(zip(self.down_blocks, self.down_attn, strict=True)):
            h = attn(block(h, emb))
            skips.append(h)
            level, last_in_level = divmod(j, self.num_res_blocks)
            if last_in_level == self.num_res_blocks - 1 and level < self.levels - 1:
                h = self.downsample[level](h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        return h, skips, emb

    def decode(self, h: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor) -> torch.Tensor:
        """Decoder: consumes the skips in reverse order and returns the prediction."""
        if len(skips) != len(self.up_blocks):
            raise ValueError(f"decode expects {len(self.up_blocks)} skip tensors, got {len(skips)}")
        skips = list(skips)
        for j, (block, attn) in enumerate(zip(self.up_blocks, self.up_attn, strict=True)):
            s = skips.pop()
            if s.shape[2:] != h.shape[2:]:
                raise ValueError(f"skip {tuple(s.shape)} does not match decoder features {tuple(h.shape)}")
            h = attn(block(torch.cat([h, s], dim=1), emb))
            level, last_in_level = divmod(j, self.num_res_blocks)
            if last_in_level == self.num_res_blocks - 1 and level < self.levels - 1:
                h = self.upsample[level](h)
        return self.conv_out(F.silu(self.norm_out(h)))

    def forward(self, x: torch.Tensor, t, **cond) -> torch.Tensor:
        """Prediction of the same shape as ``x``; cond keys: labels, w, latent, position."""
        return self.decode(*self.encode(x, t, **cond))
