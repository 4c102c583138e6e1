"""Time-conditional discriminators D(x_{t-1}, x_t, t) for denoising diffusion GANs.

DDGAN's discriminator judges a *pair*: is x_{t-1} a plausible denoised version of x_t at step t
(Xiao et al. 2022, Sec. 3.2; trained with eq. (5))? Both networks here read the pair side by side (the two
points concatenated, or the two images stacked as channels, as in the official code) and the time
through the book's :class:`~minidiff.nn.embeddings.TimeEmbedding`, added to the features of every
layer. They return one logit per example, shape (B,); D = sigmoid(logit) is the probability
"real". LeakyReLU(0.2) activations and no normalisation layers, so that the R1 penalty on the
input gradient (Mescheder et al. 2018) acts on a plain function of each example.

* :class:`MLPDiscriminator`: points in R^dim (the 2-D toys).
* :class:`ConvDiscriminator`: images (B, C, H, W), strided convolutions then a linear head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .embeddings import TimeEmbedding, sinusoidal_embedding


def _check_time(t, batch: int, device) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=torch.float32, device=device)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"t must be a float or a tensor of shape ({batch},) (one time per example); "
                         f"got shape {tuple(t.shape)}.")
    if t.numel() and not bool(((t >= 0) & (t <= 1)).all()):  # also catches NaN
        raise ValueError("t must be continuous time in [0, 1] (t = i / T for DDPM step i).")
    return t


def _check_pair(x_prev: torch.Tensor, x_t: torch.Tensor, what: str) -> None:
    if x_prev.shape != x_t.shape:
        raise ValueError(f"{what}: x_prev and x_t must have the same shape (a denoised point and the noisy "
                         f"point it came from); got {tuple(x_prev.shape)} and {tuple(x_t.shape)}.")


class MLPDiscriminator(nn.Module):
    """D(x_{t-1}, x_t, t) -> logit (B,) for points in R^dim.

    Input: [x_prev, x_t] and, with ``fourier_features`` > 0, sinusoidal features of every
    coordinate (as in :class:`~minidiff.nn.mlp.MLPDenoiser`: narrow modes need high frequencies).
    Then ``depth`` layers Linear -> + Linear(emb(t)) -> LeakyReLU(0.2), and a linear head.

    Args:
        dim: data dimension (2 for the toys).
        hidden, depth: width and number of hidden layers.
        emb_dim: size of the time embedding.
        fourier_features: sinusoids per input coordinate (0: raw coordinates only).
        fourier_scale: highest angular frequency of those features (radians per unit of x).
    """

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, emb_dim: int = 64,
                 fourier_features: int = 0, fourier_scale: float = 30.0):
        super().__init__()
        if dim < 1 or hidden < 1 or depth < 1:
            raise ValueError(f"need dim, hidden and depth >= 1; got {dim}, {hidden}, {depth}.")
        self.config = dict(dim=dim, hidden=hidden, depth=depth, emb_dim=emb_dim,
                           fourier_features=fourier_features, fourier_scale=fourier_scale)
        self.dim, self.fourier_features, self.fourier_scale = dim, fourier_features, fourier_scale
        self.time = TimeEmbedding(emb_dim)
        width = 2 * dim * (1 + fourier_features)
        self.layers = nn.ModuleList(nn.Linear(width if i == 0 else hidden, hidden) for i in range(depth))
        self.emb = nn.ModuleList(nn.Linear(emb_dim, hidden) for _ in range(depth))
        self.head = nn.Linear(hidden, 1)

    def forward(self, x_prev: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        _check_pair(x_prev, x_t, "MLPDiscriminator")
        if x_prev.ndim != 2 or x_prev.shape[1] != self.dim:
            raise ValueError(f"MLPDiscriminator expects points of shape (B, {self.dim}); got "
                             f"{tuple(x_prev.shape)}. For images use ConvDiscriminator.")
        emb = self.time(_check_time(t, x_prev.shape[0], x_prev.device))
        h = torch.cat([x_prev, x_t], dim=1)
        if self.fourier_features:
            feats = [sinusoidal_embedding(h[:, i] * self.fourier_scale, self.fourier_features).to(h.dtype)
                     for i in range(h.shape[1])]
            h = torch.cat([h, *feats], dim=1)
        for layer, proj in zip(self.layers, self.emb, strict=True):
            h = F.leaky_relu(layer(h) + proj(emb), 0.2)
        return self.head(h).squeeze(1)


class ConvDiscriminator(nn.Module):
    """D(x_{t-1}, x_t, t) -> logit (B,) for images (B, C, H, W).

    The two images are stacked as 2C channels (as in the official DDGAN code). Each level is a
    3x3 convolution, + a per-channel bias from the time embedding, LeakyReLU(0.2), then a stride-2
    3x3 convolution to the next level's channels; the last feature map is flattened into a linear
    head. H and W must equal ``image_size`` (the head's input size depends on it).

    Args:
        in_channels: image channels C.
        base_channels: channels at full resolution; level i has base_channels * channel_mults[i].
        channel_mults: one entry per level; the image is halved after each level.
        image_size: H = W of the inputs; divisible by 2 ** len(channel_mults).
        emb_dim: size of the time embedding.
    """

    def __init__(self, in_channels: int = 1, base_channels: int = 32, channel_mults: tuple[int, ...] = (1, 2),
                 image_size: int = 8, emb_dim: int = 64):
        super().__init__()
        channel_mults = tuple(channel_mults)
        if in_channels < 1 or base_channels < 1 or not channel_mults:
            raise ValueError("need in_channels >= 1, base_channels >= 1 and at least one channel multiplier.")
        factor = 2 ** len(channel_mults)
        if image_size % factor:
            raise ValueError(f"image_size {image_size} must be divisible by 2**len(channel_mults) = "
                             f"{factor}; use fewer channel_mults.")
        self.config = dict(in_channels=in_channels, base_channels=base_channels,
                           channel_mults=list(channel_mults), image_size=image_size, emb_dim=emb_dim)
        self.in_channels, self.image_size = in_channels, image_size
        self.time = TimeEmbedding(emb_dim)
        chs = [base_channels * m for m in channel_mults]
        self.convs, self.emb, self.down = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        ch = 2 * in_channels
        for i, c in enumerate(chs):
            self.convs.append(nn.Conv2d(ch, c, 3, padding=1))
            self.emb.append(nn.Linear(emb_dim, c))
            nxt = chs[i + 1] if i + 1 < len(chs) else c
            self.down.append(nn.Conv2d(c, nxt, 3, stride=2, padding=1))
            ch = nxt
        self.head = nn.Linear(ch * (image_size // factor) ** 2, 1)

    def forward(self, x_prev: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        _check_pair(x_prev, x_t, "ConvDiscriminator")
        s = self.image_size
        if x_prev.ndim != 4 or x_prev.shape[1] != self.in_channels or x_prev.shape[2:] != (s, s):
            raise ValueError(f"ConvDiscriminator expects images of shape (B, {self.in_channels}, {s}, {s}); "
                             f"got {tuple(x_prev.shape)}. Build it with the data's channels and image_size.")
        emb = self.time(_check_time(t, x_prev.shape[0], x_prev.device))
        h = torch.cat([x_prev, x_t], dim=1)
        for conv, proj, down in zip(self.convs, self.emb, self.down, strict=True):
            h = F.leaky_relu(conv(h) + proj(emb)[:, :, None, None], 0.2)
            h = F.leaky_relu(down(h), 0.2)
        return self.head(h.flatten(1)).squeeze(1)
