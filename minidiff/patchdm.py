"""Patch-DM (Ding et al. 2023, "Patched Denoising Diffusion Models for High-Resolution Image Synthesis";
Chapter 8): one network that only ever sees a p x p patch generates a whole image, of any size that is a
multiple of p, without seams.

The network is the book's UNet with a position embedding (``position_embedding=True``) and, optionally, a
global semantic code (``latent_dim``). It is used through ``encode`` / ``embed`` / ``decode``. Four ways to
turn it into a model of the large image, all with the model contract ``model(z, t, **cond)``, so the one
sampler loop (``samplers.sample``) runs each of them unchanged (seed 000's Fig. 2, plus one from the
community):

1. :class:`NaivePatches`: the image cut into its grid of patches, each denoised on its own, tiled back.
2. :class:`ShiftedWindows`: pixel-space collage. Every other sampling step the grid is shifted by half a
   patch (on the image zero-padded by p/2), so no border stays a border for two steps in a row.
3. :class:`FeatureCollage`: Patch-DM. The image zero-padded by p/2 is cut into (R+1) x (C+1) patches, each
   goes through the encoder, and at the decoder's entrance **and on every skip connection** the features of
   4 neighbouring patches are arranged on the grid and cropped by half a patch (at that resolution): the
   features of the shifted patch, which the decoder turns into the prediction of the R x C patches of the
   image (the official code's ``unet_autoenc.py``; the seed's summary says the encoder instead).
4. :class:`OverlapAverage`: MultiDiffusion (Bar-Tal et al. 2023): windows at a stride of half a patch, their
   predictions averaged at every pixel, at every step.

Training (:func:`patch_dm_loss`) follows the official code: the clean image is zero-padded by p/2, a random
2 x 2 block of patches is taken, noised (the padded border set back to zero), encoded patch by patch, and the
loss is the shifted centre patch (from the collaged features) plus the four unshifted patches (from their own
features) with the padded border masked out.

Positions are the centres of the windows in units of the image's patch grid, (row, column) mapped to
[-1, 1]^2 over the image (``patch_positions``): the unshifted patches of the padded grid sit at integer
centres 0..R, the shifted ones at +0.5, as in the official code (which embeds the raw indices). The official
code concatenates the position embedding to the time embedding; the book's UNet adds it. Its semantic code is
a per-image ``nn.Embedding(N, 512)`` started from CLIP ViT-B/16 features and applied as a scale in each block;
CLIP weights cannot be downloaded here, so :class:`SemanticCodes` starts at random and enters the UNet as its
``latent`` conditioning (summed into the embedding). Dropped with probability 0.1 for classifier-free
guidance (w = 0.5 in the official code), with the position dropped in the unconditional pass as well.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .contracts import network_evaluations
from .diffusion import (
    check_mask,
    convert_prediction,
    loss_weight,
    null_conditioning,
    q_sample,
    sample_training_times,
)
from .schedules import NoiseSchedule

__all__ = ["check_patch_layout", "pad_half", "crop_half", "to_patches", "from_patches", "patch_positions",
           "collage", "collage_windows", "NaivePatches", "ShiftedWindows", "FeatureCollage", "OverlapAverage",
           "SemanticCodes", "PatchDenoiser", "patch_dm_loss", "seam_score"]


# ----------------------------------------------------------------------------- geometry


def check_patch_layout(height: int, width: int, patch: int, factor: int = 1) -> tuple[int, int]:
    """(rows, cols) of the image's patch grid; ValueError with what to do when the layout is impossible:
    a patch that is not a positive even integer (half a patch is the collage's shift), a patch larger than
    the image, an image size that is not a multiple of the patch, or (``factor``: the UNet's downsampling,
    2^(levels-1)) half a patch that is not a multiple of the factor, so the crop would fall between the
    pixels of a coarse level (Chapter 8 §2)."""
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 2 or patch % 2:
        raise ValueError(f"the patch size must be an even integer >= 2 (the collage shifts by half a patch); "
                         f"got {patch!r}.")
    if patch > height or patch > width:
        raise ValueError(f"the patch ({patch} x {patch}) is larger than the image ({height} x {width}): use "
                         f"a patch of at most {min(height, width)} pixels, or a larger image.")
    if height % patch or width % patch:
        raise ValueError(f"the image size {height} x {width} is not a multiple of the patch size {patch}: "
                         f"crop or pad the image to a multiple of {patch} (e.g. "
                         f"{height // patch * patch} x {width // patch * patch}).")
    if (patch // 2) % factor:
        raise ValueError(f"half a patch ({patch // 2} pixels) must be a multiple of the network's "
                         f"downsampling factor {factor}, so the half-patch crop lands on whole pixels at "
                         f"every level: use a patch that is a multiple of {2 * factor}, or fewer levels.")
    return height // patch, width // patch


def pad_half(x: torch.Tensor, patch: int, value: float = 0.0) -> torch.Tensor:
    """Pad an image batch by half a patch on every side (the official code pads with zeros)."""
    half = patch // 2
    return F.pad(x, (half, half, half, half), value=value)


def crop_half(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Undo :func:`pad_half`: remove half a patch from every side."""
    half = patch // 2
    return x[..., half:x.shape[-2] - half, half:x.shape[-1] - half]


def to_patches(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, R p, C' p) -> (B R C', C, p, p): the grid of non-overlapping patches, row by row."""
    return rearrange(x, "b c (h p1) (w p2) -> (b h w) c p1 p2", p1=patch, p2=patch)


def from_patches(patches: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The inverse of :func:`to_patches`: (B R C', C, p, p) -> (B, C, R p, C' p)."""
    return rearrange(patches, "(b h w) c p1 p2 -> b c (h p1) (w p2)", h=rows, w=cols)


def patch_positions(rows: int, cols: int, grid_rows: int, grid_cols: int, offset: float = 0.0,
                    device=None) -> torch.Tensor:
    """(rows * cols, 2) positions (row, column) of windows with centres (i + offset, j + offset),
    i < rows, j < cols, in units of the image's grid_rows x grid_cols patches, mapped to [-1, 1]:
    2 c / grid - 1. The padded grid's unshifted patches take offset 0 (centres 0..R), the image's own
    patches (the shifted ones) offset 0.5 (Ding et al. 2023, position embedding P(i, j))."""
    i = torch.arange(rows, dtype=torch.float32, device=device) + offset
    j = torch.arange(cols, dtype=torch.float32, device=device) + offset
    ii, jj = torch.meshgrid(2 * i / grid_rows - 1, 2 * j / grid_cols - 1, indexing="ij")
    return torch.stack([ii.flatten(), jj.flatten()], dim=1)


def collage(features: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Feature collage (Ding et al. 2023, Fig. 2c): features (B (rows+1) (cols+1), ch, q, q) of the padded
    grid's patches -> (B rows cols, ch, q, q), the features of the shifted patches. Each shifted patch takes
    the bottom-right, bottom-left, top-right and top-left quarters of its 4 neighbours: the features are
    arranged on the grid and cropped by half a patch, q / 2, at their own resolution."""
    q = features.shape[-1]
    grid = from_patches(features, rows + 1, cols + 1)
    return to_patches(crop_half(grid, q), q)


def collage_windows(features: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The uncropped version of :func:`collage` (the book's margin variant, Chapter 8 §5): features
    (B (rows+1) (cols+1), ch, q, q) of the padded grid's patches -> (B rows cols, ch, 2q, 2q), for each
    shifted patch its 4 neighbours arranged on their 2 x 2 grid. The shifted patch is its centre q x q."""
    q = features.shape[-1]
    grid = from_patches(features, rows + 1, cols + 1)
    windows = F.unfold(grid, 2 * q, stride=q)                      # (B, ch 2q 2q, rows cols)
    return rearrange(windows, "b (c p1 p2) n -> (b n) c p1 p2", p1=2 * q, p2=2 * q)


def _repeat(cond: dict, times: int) -> dict:
    """Each example's conditioning repeated for its `times` patches (tensors with a batch dimension)."""
    return {k: (v.repeat_interleave(times, dim=0) if isinstance(v, torch.Tensor) and v.ndim > 0 else v)
            for k, v in cond.items()}


def _time(t, z: torch.Tensor, times: int) -> torch.Tensor:
    t = torch.as_tensor(t, device=z.device)
    t = t.expand(len(z)) if t.ndim == 0 else t
    return t.repeat_interleave(times)


def _with_position(cond: dict, position: torch.Tensor, batch: int, use_position: bool) -> dict:
    if not use_position:    # a network without position embedding: a "position" entry only marks dropping
        return {k: v for k, v in cond.items() if k != "position"}
    pos = position.repeat(batch, 1)                       # image by image, as _repeat lays out the patches
    if "position" in cond and cond["position"] is not None:  # a NaN row per image (repeated) drops it
        drop = torch.isnan(cond["position"]).any(dim=-1)
        pos = torch.where(drop[:, None], torch.full_like(pos, float("nan")), pos)
    return dict(cond, position=pos)


def _uses_position(net) -> bool:
    emb = getattr(net, "embedding", None)
    return emb is not None and getattr(emb, "position", None) is not None


class _PatchSampler(nn.Module):
    """Shared parts of the four patch-wise models of a large image."""

    def __init__(self, net, patch: int):
        super().__init__()
        self.net, self.patch = net, patch
        self.use_position = _uses_position(net)

    @property
    def nfe_per_call(self) -> int:
        return network_evaluations(self.net)

    def _layout(self, z: torch.Tensor) -> tuple[int, int]:
        if z.ndim != 4:
            raise ValueError(f"z must be images (B, C, H, W); got shape {tuple(z.shape)}.")
        return check_patch_layout(z.shape[2], z.shape[3], self.patch, getattr(self.net, "factor", 1))

    def _windows(self, z: torch.Tensor, t, cond: dict, rows: int, cols: int, grid: tuple[int, int],
                 offset: float) -> torch.Tensor:
        """The network on every p x p window of z (a rows x cols grid of them), tiled back."""
        windows = to_patches(z, self.patch)
        n = rows * cols
        c = _with_position(_repeat(cond, n), patch_positions(rows, cols, *grid, offset, z.device), len(z),
                           self.use_position)
        return from_patches(self.net(windows, _time(t, z, n), **c), rows, cols)


class NaivePatches(_PatchSampler):
    """Fig. 2a of Ding et al. 2023: the image's R x C patches denoised independently and tiled back. Each
    patch sees nothing of its neighbours, so nothing makes neighbouring patches agree at their border."""

    def forward(self, z: torch.Tensor, t, **cond) -> torch.Tensor:
        rows, cols = self._layout(z)
        return self._windows(z, t, cond, rows, cols, (rows, cols), 0.5)


class ShiftedWindows(_PatchSampler):
    """Fig. 2b of Ding et al. 2023, pixel-space collage: the image's own grid at the even steps of
    `timesteps`, and at the odd ones the grid of the image zero-padded by p/2 (windows shifted by half a
    patch, (R+1) x (C+1) of them), cropped back. A time not on `timesteps` is refused."""

    def __init__(self, net, patch: int, timesteps: Sequence[float] | torch.Tensor):
        super().__init__(net, patch)
        self.register_buffer("timesteps", torch.as_tensor(timesteps, dtype=torch.float64).flatten(),
                             persistent=False)

    def shifted_at(self, t) -> bool:
        """True when the sampling step of time t uses the shifted windows (its index on the grid is odd)."""
        t = float(torch.as_tensor(t, dtype=torch.float64).flatten()[0])
        hits = torch.nonzero((self.timesteps - t).abs() < 1e-6).flatten()
        if len(hits) == 0:
            raise ValueError(f"t = {t} is not a time of this sampler's grid: build ShiftedWindows with the "
                             "timesteps you pass to samplers.sample.")
        return bool(int(hits[0]) % 2)

    def forward(self, z: torch.Tensor, t, **cond) -> torch.Tensor:
        rows, cols = self._layout(z)
        if not self.shifted_at(t):
            return self._windows(z, t, cond, rows, cols, (rows, cols), 0.5)
        out = self._windows(pad_half(z, self.patch), t, cond, rows + 1, cols + 1, (rows, cols), 0.0)
        return crop_half(out, self.patch)


class FeatureCollage(_PatchSampler):
    """Fig. 2c of Ding et al. 2023, Patch-DM: z zero-padded by p/2 and cut into (R+1) x (C+1) patches; each
    through the encoder (positions 0..R); the bottleneck output and every skip collaged (:func:`collage`)
    into the features of the R x C shifted patches; the decoder (positions + 0.5) predicts them. The shifted
    patches are the image's own grid, so their predictions tile the image exactly. One network evaluation
    (encoder and decoder once per patch) per call.

    The decoder still pads each shifted patch with zeros, at the borders of the image's grid, which the
    collage does not reach. ``margin=True`` (the book's diagnostic, not the paper's method) decodes instead
    the uncropped 2 x 2 arrangement (:func:`collage_windows`, a 2p x 2p window) and keeps its centre p x p,
    so the decoder's zero padding falls p/2 outside every kept pixel, at 4 times the decoder's cost.

    stream=True encodes one row of the padded grid at a time and keeps the features of two rows: the same
    output, with memory that grows with the image's width only (Chapter 8 §1)."""

    def __init__(self, net, patch: int, stream: bool = False, margin: bool = False):
        super().__init__(net, patch)
        self.stream, self.margin = stream, margin

    def _gather(self, features, rows, cols):
        return (collage_windows if self.margin else collage)(features, rows, cols)

    def _keep(self, out, rows, cols):
        """The decoder's outputs (B rows cols, C, p, p) (margin: their centres) tiled into the image."""
        if self.margin:
            half = self.patch // 2
            out = out[..., half:half + self.patch, half:half + self.patch]
        return from_patches(out, rows, cols)

    def _encode(self, patches, t, cond, positions, batch):
        c = _with_position(_repeat(cond, len(positions)), positions, batch, self.use_position)
        h, skips, _ = self.net.encode(patches, t.repeat_interleave(len(positions)), **c)
        return [h, *skips]

    def _decode(self, feats, t, cond, positions, batch):
        c = _with_position(_repeat(cond, len(positions)), positions, batch, self.use_position)
        t_out = t.repeat_interleave(len(positions))
        return self.net.decode(feats[0], feats[1:], self.net.embed(t_out, batch_size=len(t_out), **c))

    def forward(self, z: torch.Tensor, t, **cond) -> torch.Tensor:
        rows, cols = self._layout(z)
        p, B = self.patch, len(z)
        t = torch.as_tensor(t, device=z.device)
        t = t.expand(B) if t.ndim == 0 else t
        padded = pad_half(z, p)
        pos_in = patch_positions(rows + 1, cols + 1, rows, cols, 0.0, z.device)       # centres 0..R
        pos_out = patch_positions(rows, cols, rows, cols, 0.5, z.device)              # centres + 0.5
        if not self.stream:
            feats = self._encode(to_patches(padded, p), t, cond, pos_in, B)
            out = self._decode([self._gather(f, rows, cols) for f in feats], t, cond, pos_out, B)
            return self._keep(out, rows, cols)

        def encode_row(r):                         # padded-grid row r: B x (cols + 1) patches
            strip = padded[:, :, r * p:(r + 1) * p]
            return self._encode(to_patches(strip, p), t, cond, pos_in[r * (cols + 1):(r + 1) * (cols + 1)], B)

        def two_rows(a, b):                        # rows r and r+1 as one 2 x (cols + 1) grid per image
            a, b = (f.reshape(B, cols + 1, *f.shape[1:]) for f in (a, b))
            return torch.stack([a, b], dim=1).reshape(B * 2 * (cols + 1), *a.shape[2:])

        out_rows, above = [], encode_row(0)
        for i in range(rows):
            below = encode_row(i + 1)
            feats = [self._gather(two_rows(a, b), 1, cols) for a, b in zip(above, below, strict=True)]
            out = self._decode(feats, t, cond, pos_out[i * cols:(i + 1) * cols], B)
            out_rows.append(self._keep(out, 1, cols))
            above = below
        return torch.cat(out_rows, dim=2)


class OverlapAverage(_PatchSampler):
    """MultiDiffusion (Bar-Tal et al. 2023, eq. (5) with uniform weights): on z zero-padded by p/2, windows
    of p x p at a stride of p/2, (2R+1) x (2C+1) of them; every pixel's prediction is the average of the
    windows that cover it (4 inside the image). Four times the windows of :class:`NaivePatches` per call,
    so ``nfe_per_call`` counts 4 evaluations of the patch network per image patch."""

    @property
    def nfe_per_call(self) -> int:
        return 4 * network_evaluations(self.net)

    def forward(self, z: torch.Tensor, t, **cond) -> torch.Tensor:
        rows, cols = self._layout(z)
        p, half = self.patch, self.patch // 2
        padded = pad_half(z, p)
        total = torch.zeros_like(padded)
        count = torch.zeros_like(padded[:, :1])
        for dy in (0, half):
            for dx in (0, half):
                part = padded[:, :, dy:, dx:]
                r, c = part.shape[2] // p, part.shape[3] // p
                part = part[:, :, :r * p, :c * p]
                offset_r, offset_c = dy / p, dx / p        # window centres at (i + offset) in image patches
                windows = to_patches(part, p)
                pos = patch_positions(r, c, rows, cols, 0.0, z.device) + torch.tensor(
                    [2 * offset_r / rows, 2 * offset_c / cols], device=z.device)
                cond_w = _with_position(_repeat(cond, r * c), pos, len(z), self.use_position)
                pred = from_patches(self.net(windows, _time(t, z, r * c), **cond_w), r, c)
                total[:, :, dy:dy + r * p, dx:dx + c * p] += pred
                count[:, :, dy:dy + r * p, dx:dx + c * p] += 1
        return crop_half(total / count, p)


# ----------------------------------------------------------------------------- conditioning and training


class SemanticCodes(nn.Module):
    """The global semantic embedding E(x_0) of Ding et al. 2023: one learned code per training image,
    ``nn.Embedding(num_images, dim)``, trained with the denoiser. The paper starts it from CLIP ViT-B/16
    image features; those weights cannot be downloaded here, so it starts from N(0, init_std^2) (or from
    given ``init`` codes, e.g. a small encoder's features). ``codes(index)`` gives the ``latent`` of those
    images; index -1 gives NaN, the "absent" code of classifier-free guidance."""

    def __init__(self, num_images: int, dim: int, init: torch.Tensor | None = None, init_std: float = 1.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        if num_images < 1 or dim < 1:
            raise ValueError(f"need num_images >= 1 and dim >= 1; got {num_images}, {dim}.")
        if init is None:
            init = init_std * torch.randn(num_images, dim, generator=generator)
        elif tuple(init.shape) != (num_images, dim):
            raise ValueError(f"init must have shape ({num_images}, {dim}); got {tuple(init.shape)}.")
        self.table = nn.Parameter(init.clone().float())

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        index = torch.as_tensor(index, device=self.table.device).long()
        if bool((index >= len(self.table)).any()) or bool((index < -1).any()):
            raise ValueError(f"image index out of range 0..{len(self.table) - 1} (or -1 for no code).")
        codes = self.table[index.clamp(min=0)]
        return torch.where((index < 0)[:, None], torch.full_like(codes, float("nan")), codes)


class PatchDenoiser(nn.Module):
    """Patch-DM's network (Chapter 8 §3): the book's UNet on p x p patches with the position embedding
    (``position=False`` for the ablation) and, with ``num_images``, one :class:`SemanticCodes` code of size
    ``code_dim`` per training image, read by the UNet as its ``latent``. ``encode`` / ``embed`` / ``decode``
    and the call are the UNet's; :meth:`code` gives the codes of image indices (-1: none)."""

    def __init__(self, patch: int, num_images: int | None = None, code_dim: int = 16, position: bool = True,
                 **unet_kwargs):
        super().__init__()
        from .nn import UNet

        if num_images is not None and num_images < 1:
            raise ValueError(f"num_images must be >= 1 (or None for no semantic code); got {num_images}.")
        self.patch = patch
        self.unet = UNet(image_size=patch, position_embedding=position,
                         latent_dim=code_dim if num_images else None, **unet_kwargs)
        self.codes = SemanticCodes(num_images, code_dim) if num_images else None
        check_patch_layout(patch, patch, patch, self.unet.factor)

    @property
    def factor(self) -> int:
        return self.unet.factor

    @property
    def embedding(self):
        return self.unet.embedding

    def code(self, index) -> torch.Tensor:
        if self.codes is None:
            raise ValueError("this PatchDenoiser has no semantic codes: build it with num_images=...")
        return self.codes(index)

    def embed(self, t, batch_size: int, **cond) -> torch.Tensor:
        return self.unet.embed(t, batch_size, **cond)

    def encode(self, x, t, **cond):
        return self.unet.encode(x, t, **cond)

    def decode(self, h, skips, emb):
        return self.unet.decode(h, skips, emb)

    def forward(self, x, t, **cond):
        return self.unet(x, t, **cond)


def patch_dm_loss(net, schedule: NoiseSchedule, x: torch.Tensor, patch: int, prediction: str = "eps",
                  weighting: str = "eps", generator: torch.Generator | None = None, cond: dict | None = None,
                  p_uncond: float = 0.0, p_drop_position: float = 0.0) -> torch.Tensor:
    """Patch-DM's training loss on a batch of images x (B, C, H, W) (Ding et al. 2023, Sec. 3; the official
    ``diffusion/base.py``; Chapter 8 §3), in four steps:

    1. x zero-padded by p/2; per image, a random 2 x 2 block of the padded grid's patches (top-left
       (a, b), a < R, b < C) and its mask m (1 on the image, 0 on the padded border);
    2. t and eps drawn, z = m * (alpha_t x_block + sigma_t eps) (the official code zeroes the border of z);
    3. the encoder on the 4 patches (positions a, a+1 by b, b+1); the decoder on their own features
       (4 unshifted predictions) and on the collaged ones (the shifted centre patch, positions + 0.5);
    4. loss = w(lambda_t) [ mean over the centre patch of (x-hat - x)^2
                            + sum(m (x-hat - x)^2) / sum(m) over the 4 unshifted patches ],
       the masked mean of ``diffusion.training_loss(mask=...)``. With prediction "eps" and weighting "eps" the
       two terms are the official eps-MSEs (the official code averages the masked term over all pixels).

    Draws per image (the official code draws one block for the whole batch). cond: the network's other
    conditioning per image (e.g. ``latent`` codes); p_uncond drops it (classifier-free guidance, 0.1 in the
    official code), p_drop_position drops the position (0.5 there, with guidance on).
    """
    if x.ndim != 4:
        raise ValueError(f"x must be images (B, C, H, W); got shape {tuple(x.shape)}.")
    B, C, H, W = x.shape
    rows, cols = check_patch_layout(H, W, patch, getattr(net, "factor", 1))
    p, half = patch, patch // 2
    device = x.device if generator is None else generator.device
    padded = pad_half(x, p)
    inside = pad_half(torch.ones_like(x[:, :1]), p)
    a = torch.randint(rows, (B,), generator=generator, device=device).to(x.device)   # block's top-left patch
    b = torch.randint(cols, (B,), generator=generator, device=device).to(x.device)
    two = torch.arange(2, device=x.device)
    which = (torch.arange(B, device=x.device)[:, None, None], (a[:, None] + two)[:, :, None],
             (b[:, None] + two)[:, None, :])

    def take_block(images):                              # (B, C', 2p, 2p): the 2 x 2 patches at (a, b)
        grid = rearrange(images, "b c (i p1) (j p2) -> b i j c p1 p2", p1=p, p2=p)
        return rearrange(grid[which], "b i j c p1 p2 -> b c (i p1) (j p2)")

    block, mask = take_block(padded), take_block(inside)
    t = sample_training_times(schedule, B, x, generator, (0.0, 1.0))
    z, _ = q_sample(schedule, block, t, generator=generator)
    z = z * mask
    cond = dict(cond or {})
    if p_uncond > 0 and cond:
        drop = torch.rand(B, generator=generator, device=device) < p_uncond
        cond = null_conditioning(cond, where=drop.to(x.device))
    use_position = _uses_position(net)
    pos_u = pos_c = None
    if use_position:
        grid = torch.tensor([rows, cols], dtype=torch.float32, device=x.device)
        corner = torch.stack([a, b], dim=1).float()                                     # padded-grid index
        offsets = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=torch.float32, device=x.device)
        pos_u = (2 * (corner[:, None] + offsets[None]) / grid - 1).reshape(4 * B, 2)
        pos_c = 2 * (corner + 0.5) / grid - 1
        if p_drop_position > 0:
            drop = (torch.rand(B, generator=generator, device=device) < p_drop_position).to(x.device)
            pos_c = torch.where(drop[:, None], torch.full_like(pos_c, float("nan")), pos_c)
            drop4 = drop.repeat_interleave(4)[:, None]
            pos_u = torch.where(drop4, torch.full_like(pos_u, float("nan")), pos_u)
    cond_u = _repeat(cond, 4)
    cond_c = dict(cond)
    if use_position:
        cond_u["position"], cond_c["position"] = pos_u, pos_c
    t_u = t.repeat_interleave(4)
    h, skips, emb_u = net.encode(to_patches(z, p), t_u, **cond_u)
    out_u = from_patches(net.decode(h, skips, emb_u), 2, 2)                          # (B, C, 2p, 2p)
    emb_c = net.embed(t, batch_size=B, **cond_c)
    out_c = net.decode(collage(h, 1, 1), [collage(s, 1, 1) for s in skips], emb_c)   # (B, C, p, p)
    alpha, sigma = schedule.alpha_sigma(t)
    alpha, sigma = alpha.to(x.dtype)[:, None, None, None], sigma.to(x.dtype)[:, None, None, None]
    x_u, _ = convert_prediction(out_u, prediction, z_t=z, alpha=alpha, sigma=sigma)
    x_c, _ = convert_prediction(out_c, prediction, z_t=z[:, :, half:half + p, half:half + p], alpha=alpha,
                                sigma=sigma)
    mask, mask_sum = check_mask(mask, block)
    centre = (x_c - block[:, :, half:half + p, half:half + p]).pow(2).reshape(B, -1).mean(dim=1)
    unshifted = (mask * (x_u - block).pow(2)).reshape(B, -1).sum(dim=1) / mask_sum
    weight = loss_weight(weighting, schedule.logsnr(t)).to(x.dtype)
    return (weight * (centre + unshifted)).mean()


# ----------------------------------------------------------------------------- seams


def seam_score(images: torch.Tensor, patch: int, offset: int = 0) -> float:
    """Mean |difference of neighbouring pixels| across the borders of the patch grid over the same inside the
    patches (both directions, all channels; Chapter 8 §4). ``offset`` shifts the grid by that many pixels:
    offset = p/2 scores the half-shifted grid, where the collage's encoder patches meet and where
    ShiftedWindows decodes every other step. A seamless image scores like real images (about 1 for borders
    that fall at random places); visible seams score above it."""
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W); got shape {tuple(images.shape)}.")
    check_patch_layout(images.shape[2], images.shape[3], patch)
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < patch:
        raise ValueError(f"offset must be an integer in 0..{patch - 1} (pixels); got {offset!r}.")
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs()      # between column j and j+1
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs()
    border_x = ((torch.arange(1, images.shape[3]) - offset) % patch == 0)  # column j+1 starts a patch
    border_y = ((torch.arange(1, images.shape[2]) - offset) % patch == 0)
    across = torch.cat([dx[..., border_x].flatten(), dy[..., border_y, :].flatten()])
    within = torch.cat([dx[..., ~border_x].flatten(), dy[..., ~border_y, :].flatten()])
    return float(across.double().mean() / within.double().mean().clamp(min=1e-12))
