"""A residual MLP denoiser for 2-D toy data (25 Gaussians, swiss roll, ...).

The same ingredients as the UNet's residual blocks, with linear layers in place of convolutions:
the time / conditioning embedding enters each block as a scale and shift (adaptive
normalisation, Nichol & Dhariwal 2021), and each block's last layer starts at zero.
The input point also gets sinusoidal (Fourier) features: near t = 0 the denoiser must be a
steep function of z around every mode, which a plain MLP of raw coordinates learns slowly
(spectral bias; Tancik et al. 2020).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .embeddings import ConditioningEmbedding, sinusoidal_embedding
from .unet import zero_module


class MLPBlock(nn.Module):
    """h + Linear(Dropout(SiLU(LN(Linear(SiLU(LN(h)))) * (1 + scale) + shift)))."""

    def __init__(self, hidden: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden)
        self.lin1 = nn.Linear(hidden, hidden)
        self.emb = nn.Linear(emb_dim, 2 * hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(dropout)
        self.lin2 = zero_module(nn.Linear(hidden, hidden))

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        r = self.lin1(F.silu(self.norm1(h)))
        scale, shift = self.emb(F.silu(emb)).chunk(2, dim=1)
        r = self.norm2(r) * (1 + scale) + shift
        return h + self.lin2(self.dropout(F.silu(r)))


class MLPDenoiser(nn.Module):
    """Denoiser ``model(z, t, **cond) -> (B, dim)`` for points in R^dim.

    Args:
        dim: data dimension (2 for the toy sets).
        hidden, depth: width and number of residual blocks.
        emb_dim: size of the summed time / conditioning embedding.
        num_classes: class labels with a null token (Ho & Salimans 2021).
        latent_dim: a latent vector input, e.g. DDGAN's z (Xiao et al. 2022).
        guidance_embedding: a scalar guidance weight ``w`` input (Meng et al. 2023).
        dropout: dropout inside the blocks.
        fourier_features: sinusoidal features per input coordinate (0: raw coordinates only).
        fourier_scale: highest angular frequency of those features (radians per unit of z).
    """

    def __init__(
        self,
        dim: int = 2,
        hidden: int = 256,
        depth: int = 4,
        emb_dim: int = 128,
        num_classes: int | None = None,
        latent_dim: int | None = None,
        guidance_embedding: bool = False,
        dropout: float = 0.0,
        fourier_features: int = 32,
        fourier_scale: float = 30.0,
    ):
        super().__init__()
        self.config = dict(
            dim=dim, hidden=hidden, depth=depth, emb_dim=emb_dim, num_classes=num_classes,
            latent_dim=latent_dim, guidance_embedding=guidance_embedding, dropout=dropout,
            fourier_features=fourier_features, fourier_scale=fourier_scale,
        )
        self.dim, self.fourier_features, self.fourier_scale = dim, fourier_features, fourier_scale
        self.embedding = ConditioningEmbedding(
            emb_dim, num_classes=num_classes, guidance=guidance_embedding, latent_dim=latent_dim,
            freq_dim=emb_dim // 2,
        )
        self.inp = nn.Linear(dim * (1 + fourier_features), hidden)
        self.blocks = nn.ModuleList(MLPBlock(hidden, emb_dim, dropout) for _ in range(depth))
        self.norm_out = nn.LayerNorm(hidden)
        self.out = zero_module(nn.Linear(hidden, dim))

    def forward(self, z: torch.Tensor, t, **cond) -> torch.Tensor:
        if z.ndim != 2 or z.shape[1] != self.dim:
            raise ValueError(f"MLPDenoiser expects points of shape (B, {self.dim}), got {tuple(z.shape)}")
        emb = self.embedding(t, batch_size=z.shape[0], **cond)
        feats = [z] + [
            sinusoidal_embedding(z[:, i] * self.fourier_scale, self.fourier_features).to(z.dtype)
            for i in range(self.dim if self.fourier_features else 0)
        ]
        h = self.inp(torch.cat(feats, dim=1))
        for block in self.blocks:
            h = block(h, emb)
        return self.out(F.silu(self.norm_out(h)))
