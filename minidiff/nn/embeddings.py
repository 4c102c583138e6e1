"""Embeddings of time and of every conditioning signal, summed into one vector.

One mechanism serves every chapter: the network sees a single embedding vector
``emb = e_t(t) + e_y(labels) + e_w(w) + e_z(latent) + e_p(position)``; each term is present
only when the model was built with it. The residual blocks read ``emb`` (as a scale and shift).

* time: sinusoidal features of ``1000 t`` then an MLP (Ho et al. 2020, Sec. 4 / Appendix B;
  Transformer sinusoids of Vaswani et al. 2017).
* labels: a learned table with one extra *null token* (index ``num_classes``) used for
  unconditional predictions in classifier-free guidance (Ho & Salimans 2021, Sec. 3.2).
* w: a scalar such as the guidance weight of a guided-distilled student (Meng et al. 2023).
* latent: a vector such as DDGAN's latent z (Xiao et al. 2022, Sec. 4; the official code maps z
  to adaptive group-norm scales, which is what the blocks do with ``emb``) or Patch-DM's
  global semantic code (Ding et al. 2023).
* position: the patch centre (x, y) in [-1, 1]^2, sinusoids per coordinate then an MLP
  (Ding et al. 2023, Patch-DM, position embedding P(i, j)).

A row of NaN in ``w``, ``latent`` or ``position`` means "absent": that term is left out of the sum
for that example (how Patch-DM drops position / semantic code for classifier-free guidance).
"""

from __future__ import annotations

import math

import torch
from torch import nn

CONDITIONING_KEYS = ("labels", "w", "latent", "position")


def sinusoidal_embedding(x: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of a batch of scalars: (B,) -> (B, dim), [cos | sin] halves.

    Frequencies are max_period^(-k / (dim/2)), k = 0..dim/2-1 (Vaswani et al. 2017, Sec. 3.5;
    used for the diffusion step by Ho et al. 2020). An odd ``dim`` is padded with one zero.
    """
    if x.ndim != 1:
        raise ValueError(f"sinusoidal_embedding expects a 1-D tensor (B,), got shape {tuple(x.shape)}")
    if dim < 2:
        raise ValueError(f"dim must be >= 2, got {dim}")
    half = dim // 2
    k = torch.arange(half, device=x.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(max_period) * k / half)
    args = x.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def _mlp(in_dim: int, dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, dim), nn.SiLU(), nn.Linear(dim, dim))


class TimeEmbedding(nn.Module):
    """Continuous t in [0, 1] -> sinusoid of 1000 t -> MLP (Ho et al. 2020, Appendix B).

    The factor 1000 makes t = i/T with T = 1000 match DDPM's embedding of the integer step i.
    """

    def __init__(self, dim: int, freq_dim: int | None = None, scale: float = 1000.0):
        super().__init__()
        self.freq_dim = freq_dim or dim
        self.scale = scale
        self.mlp = _mlp(self.freq_dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        feats = sinusoidal_embedding(t * self.scale, self.freq_dim)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


class ScalarEmbedding(TimeEmbedding):
    """Any real scalar per example, e.g. the guidance weight w (Meng et al. 2023): sinusoid then MLP."""


class ClassEmbedding(nn.Module):
    """Learned class embedding with a null token at index ``num_classes`` (Ho & Salimans 2021).

    ``labels=None`` (whole batch) or ``labels == -1`` (per example) selects the null token, which
    gives the unconditional prediction of classifier-free guidance.
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: torch.Tensor | None, batch_size: int | None = None) -> torch.Tensor:
        if labels is None:
            if batch_size is None:
                raise ValueError("ClassEmbedding needs batch_size when labels is None")
            labels = torch.full((batch_size,), -1, dtype=torch.long, device=self.table.weight.device)
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
        if labels.numel() and (labels.min() < -1 or labels.max() > self.num_classes):
            raise ValueError(
                f"labels must be in 0..{self.num_classes - 1} (or -1 / {self.num_classes} for the null "
                f"token), got values in [{int(labels.min())}, {int(labels.max())}]"
            )
        labels = torch.where(labels < 0, self.num_classes, labels)
        return self.table(labels)


class VectorEmbedding(nn.Module):
    """A vector per example, e.g. DDGAN's latent z (Xiao et al. 2022): (B, in_dim) -> MLP -> (B, dim)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        if in_dim < 1:
            raise ValueError(f"in_dim must be >= 1, got {in_dim}")
        self.in_dim = in_dim
        self.mlp = _mlp(in_dim, dim)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.mlp(v)


class PositionEmbedding(nn.Module):
    """Patch centre (x, y) in [-1, 1]^2 -> sinusoid per coordinate -> MLP (Ding et al. 2023, Patch-DM).

    Each coordinate is mapped to [0, 1000] like time, embedded with ``freq_dim // 2`` sinusoids,
    and the two halves are concatenated before the MLP.
    """

    def __init__(self, dim: int, freq_dim: int | None = None):
        super().__init__()
        self.freq_dim = 2 * ((freq_dim or dim) // 2)
        self.mlp = _mlp(self.freq_dim, dim)

    def forward(self, position: torch.Tensor) -> torch.Tensor:
        u = (position.float() + 1) * 500.0
        half = self.freq_dim // 2
        feats = [sinusoidal_embedding(u[:, 0], half), sinusoidal_embedding(u[:, 1], half)]
        return self.mlp(torch.cat(feats, dim=1).to(self.mlp[0].weight.dtype))


def _as_batch(value, batch_size: int, name: str, device) -> torch.Tensor:
    """A float or 0-d tensor is broadcast to (B,); a (B,) tensor is checked."""
    v = torch.as_tensor(value, dtype=torch.float32, device=device)
    if v.ndim == 0:
        return v.expand(batch_size)
    if v.shape != (batch_size,):
        raise ValueError(f"{name} must be a float or a tensor of shape ({batch_size},), got {tuple(v.shape)}")
    return v


class ConditioningEmbedding(nn.Module):
    """Sum of the time embedding and every conditioning the model was built with.

    Args:
        dim: size of the output embedding.
        time: embed t (on for every denoiser).
        num_classes: class labels with a null token (classifier-free guidance).
        guidance: embed a scalar guidance weight ``w``.
        latent_dim: embed a latent vector ``latent`` of this size (DDGAN z, semantic code).
        position: embed a patch position ``position`` (B, 2) in [-1, 1]^2 (Patch-DM).
        freq_dim: number of sinusoidal features (default dim // 4, at least 16).

    ``forward(t, batch_size=None, **cond)`` with keys from ``CONDITIONING_KEYS``. ``labels`` may be
    omitted (null token); ``w``, ``latent`` and ``position`` are required when built with them
    (a row of NaN marks an example where that conditioning is dropped).
    """

    def __init__(
        self,
        dim: int,
        time: bool = True,
        num_classes: int | None = None,
        guidance: bool = False,
        latent_dim: int | None = None,
        position: bool = False,
        freq_dim: int | None = None,
    ):
        super().__init__()
        freq_dim = freq_dim or max(16, dim // 4)
        self.dim = dim
        self.time = TimeEmbedding(dim, freq_dim) if time else None
        self.labels = ClassEmbedding(num_classes, dim) if num_classes is not None else None
        self.w = ScalarEmbedding(dim, freq_dim) if guidance else None
        self.latent = VectorEmbedding(latent_dim, dim) if latent_dim is not None else None
        self.position = PositionEmbedding(dim, freq_dim) if position else None
        self.register_buffer("_anchor", torch.empty(0), persistent=False)  # tracks the device

    @property
    def active(self) -> tuple[str, ...]:
        """Names of the conditionings this embedding accepts."""
        return tuple(k for k in CONDITIONING_KEYS if getattr(self, k) is not None)

    def forward(self, t=None, batch_size: int | None = None, **cond) -> torch.Tensor:
        unknown = sorted(set(cond) - set(CONDITIONING_KEYS))
        if unknown:
            raise ValueError(
                f"unknown conditioning {unknown}; accepted keys are {list(CONDITIONING_KEYS)} "
                f"(this model uses {list(self.active)})"
            )
        if batch_size is None:
            if not (torch.is_tensor(t) and t.ndim == 1):
                raise ValueError("pass batch_size or t as a tensor of shape (B,)")
            batch_size = t.shape[0]
        device, dtype = self._anchor.device, self._anchor.dtype
        emb = torch.zeros(batch_size, self.dim, device=device, dtype=dtype)
        if self.time is not None:
            if t is None:
                raise ValueError("t is required: continuous time in [0, 1], shape (B,)")
            t = _as_batch(t, batch_size, "t", device)
            if t.numel() and not (t.min() >= 0 and t.max() <= 1):  # also catches NaN
                raise ValueError(
                    f"t must be continuous time in [0, 1], got values in [{float(t.min()):.4g}, "
                    f"{float(t.max()):.4g}]; for a discrete step i of T pass t = i / T"
                )
            emb = emb + self.time(t)
        for key in CONDITIONING_KEYS:
            value = cond.get(key)
            module = getattr(self, key)
            if module is None:
                if value is not None:
                    raise ValueError(
                        f"got '{key}' but this model was built without it; build it with the matching "
                        f"option (num_classes / guidance_embedding / latent_dim / position_embedding)"
                    )
                continue
            if key == "labels":
                if value is not None:
                    value = torch.as_tensor(value, device=device)
                    value = value.expand(batch_size) if value.ndim == 0 else value
                    if value.shape != (batch_size,):
                        raise ValueError(f"labels must have shape ({batch_size},), got {tuple(value.shape)}")
                emb = emb + module(value, batch_size)
                continue
            if value is None:
                raise ValueError(
                    f"'{key}' is required by this model (built with it); pass {key}=... "
                    f"(a row of NaN drops it for that example)"
                )
            if key == "w":
                value = _as_batch(value, batch_size, "w", device)[:, None]
            else:
                width = module.in_dim if key == "latent" else 2
                value = torch.as_tensor(value, dtype=dtype, device=device)
                if value.shape != (batch_size, width):
                    shape = tuple(value.shape)
                    raise ValueError(f"{key} must have shape ({batch_size}, {width}), got {shape}")
            emb = emb + self._embed_with_nulls(module, value, key)
        return emb

    @staticmethod
    def _embed_with_nulls(module: nn.Module, value: torch.Tensor, key: str) -> torch.Tensor:
        """Embed ``value`` (B, k); rows that are all NaN contribute zero (dropped conditioning)."""
        nan = torch.isnan(value)
        if not nan.any():
            return module(value[:, 0] if key == "w" else value)
        null = nan.all(dim=1)
        if (nan.any(dim=1) & ~null).any():
            raise ValueError(f"{key} has rows with some NaN entries; use a row of all NaN to drop it")
        value = torch.where(nan, torch.zeros_like(value), value)
        out = module(value[:, 0] if key == "w" else value)
        return out * (~null)[:, None].to(out.dtype)
