"""Patched diffusion models (Luhman & Luhman 2022, "PDM"; Chapter 7): cheaper steps, not fewer.

* :func:`patchify` / :func:`unpatchify` reshape an image (B, C, H, W) into its grid of non-overlapping
  P x P patches, (B, C P^2, H/P, W/P) (Sec. 3), with the channels in the order of the official code and
  of TensorFlow's ``image.extract_patches``: (row in the patch, column in the patch, channel),
  ``b c (h p1) (w p2) -> b (p1 p2 c) h w``. (The paper's Appendix B ``convert_patches_to_image`` drops
  the result of one ``reshape``: its output has the right shape and scrambled pixels. Chapter 7 shows it.)
* :class:`Patched` wraps a network that works on the patch grid as a model of the image, with the
  model contract ``model(z, t, **cond)``: training, sampling, distillation and guidance use it unchanged.
* :class:`SplitModel` is model splitting (Sec. 4.1): several networks, each for its own range of t,
  picked per example by t. Its networks may use different patch sizes (the paper's closing suggestion:
  large patches at high noise, small ones at low noise). :func:`split_time` finds the t of a given SNR
  (the paper splits at SNR = 0.25: timestep 396 of the official code, t = 0.397 here).

The optimal denoiser x* of a data set (eq. (4)) is ``analytic.EmpiricalDenoiser``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Sequence

import torch
from einops import rearrange
from torch import nn

from .contracts import network_evaluations
from .schedules import DiscreteSchedule, NoiseSchedule

__all__ = ["check_patch_size", "patchify", "unpatchify", "Patched", "patched_unet_kwargs", "patched_unet",
           "SplitModel", "split_time", "radial_power_spectrum", "high_frequency_fraction",
           "saved_activation_bytes", "peak_allocated_bytes"]


def check_patch_size(P, height: int | None = None, width: int | None = None) -> int:
    """P as an int >= 1 that divides the image's height and width (ValueError otherwise)."""
    if isinstance(P, bool) or not isinstance(P, int) or P < 1:
        raise ValueError(f"the patch size P must be an integer >= 1; got {P!r}.")
    for name, size in (("height", height), ("width", width)):
        if size is not None and size % P:
            raise ValueError(f"the image {name} {size} is not divisible by the patch size P = {P}: crop or "
                             f"pad the images to a multiple of {P}, or choose a P that divides {size}.")
    return P


def _check_images(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f"{what} must be a batch of images (B, C, H, W); got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}.")


def patchify(x: torch.Tensor, P: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C P^2, H/P, W/P): each P x P patch becomes one pixel of the grid with C P^2
    channels, ordered (row, column, channel) as TF ``extract_patches`` and the official code do
    (Luhman & Luhman 2022, Sec. 3 and Appendix B; Chapter 7 §2). P = 1 returns x unchanged."""
    _check_images(x, "x")
    check_patch_size(P, x.shape[2], x.shape[3])
    return rearrange(x, "b c (h p1) (w p2) -> b (p1 p2 c) h w", p1=P, p2=P)


def unpatchify(x: torch.Tensor, P: int) -> torch.Tensor:
    """The inverse of :func:`patchify`: (B, C P^2, H/P, W/P) -> (B, C, H, W), exactly."""
    _check_images(x, "patches")
    check_patch_size(P)
    if x.shape[1] % (P * P):
        raise ValueError(f"patches have {x.shape[1]} channels, not a multiple of P^2 = {P * P}; were they "
                         f"made with patch size {P}?")
    return rearrange(x, "b (p1 p2 c) h w -> b c (h p1) (w p2)", p1=P, p2=P)


def patched_unet_kwargs(P: int, in_channels: int, image_size: int, **unet_kwargs) -> dict:
    """The ``nn.UNet`` keyword arguments of a network that works on the patch grid of a C x H x H image:
    C P^2 channels in and out, image_size H / P (Appendix B: "input/output projections use 3 P^2
    channels"). Width, depth and conditioning stay as given."""
    check_patch_size(P, image_size)
    return dict(unet_kwargs, in_channels=in_channels * P * P, out_channels=in_channels * P * P,
                image_size=image_size // P)


def patched_unet(patch_size: int, in_channels: int, image_size: int, **unet_kwargs) -> Patched:
    """A UNet on the patch grid of a C x H x H image as a model of the image: ``Patched(UNet(...), P)``
    with :func:`patched_unet_kwargs` (the "patched_unet" architecture of ``pretrained.build_model``;
    Chapter 7 §3). ``patch_size`` 1 is a plain UNet behind an identity reshape."""
    from .nn import UNet

    net = UNet(**patched_unet_kwargs(patch_size, in_channels, image_size, **unet_kwargs))
    return Patched(net, patch_size)


class Patched(nn.Module):
    """A network on the patch grid as a model of the image (Luhman & Luhman 2022, Appendix B's
    ``PatchedUNet.forward``; Chapter 7 §2): ``model(z, t, **cond) = unpatchify(net(patchify(z), t, **cond))``.

    The prediction type is the network's (eps, x or v of the whole image). One network evaluation per
    call (``nfe_per_call`` is the network's). With P = 1 it is the network itself.
    """

    def __init__(self, net, P: int):
        super().__init__()
        self.net, self.P = net, check_patch_size(P)

    @property
    def nfe_per_call(self) -> int:
        return network_evaluations(self.net)

    def forward(self, z: torch.Tensor, t, **cond) -> torch.Tensor:
        return unpatchify(self.net(patchify(z, self.P), t, **cond), self.P)


def split_time(schedule: NoiseSchedule, snr: float) -> float:
    """The time S of model splitting: on a discrete schedule the first step i/T whose SNR is <= snr, else
    the t where SNR(t) = snr (bisection on the monotone log-SNR). The paper splits at S = 396 (SNR 0.25)
    on DDPM's linear betas (Sec. 4.1): the official code's 0-indexed timestep 396, which is step
    i = 397, t = 0.397, here (alpha-bar_i = ``alphas_cumprod[i - 1]``)."""
    if not snr > 0:
        raise ValueError(f"snr must be > 0; got {snr!r}.")
    target = torch.log(torch.tensor(float(snr), dtype=torch.float64))
    if isinstance(schedule, DiscreteSchedule):
        steps = torch.arange(1, schedule.T + 1, dtype=torch.float64) / schedule.T
        below = torch.nonzero(schedule.logsnr(steps) <= target).flatten()
        if len(below) == 0:
            raise ValueError(f"no step of this schedule has SNR <= {snr}.")
        return float(steps[below[0]])
    def logsnr(t: float) -> float:
        return float(schedule.logsnr(torch.tensor(t, dtype=torch.float64)))

    lo, hi = 0.0, 1.0
    if not logsnr(hi) <= float(target) <= logsnr(lo):
        raise ValueError(f"SNR {snr} lies outside this schedule's range.")
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if logsnr(mid) > float(target) else (lo, mid)
    return 0.5 * (lo + hi)


class SplitModel(nn.Module):
    """Model splitting (Luhman & Luhman 2022, Sec. 4.1; Chapter 7 §5): networks ``models[k]`` for the time
    ranges (boundaries[k-1], boundaries[k]], from low noise to high noise, with boundaries[-1] = 1 implied:
    ``SplitModel([low, high], [S])`` uses ``low`` for t <= S and ``high`` for t > S. Each example goes to
    the network of its own t (per example in training, where a batch mixes times), so one call costs one
    network evaluation per example. The networks may be ``Patched`` with different patch sizes. Train
    network k with ``diffusion.training_loss(t_range=model.ranges[k])``.
    """

    def __init__(self, models: Sequence, boundaries: Sequence[float]):
        super().__init__()
        boundaries = [float(b) for b in boundaries]
        if len(models) != len(boundaries) + 1 or not models:
            raise ValueError(f"need one more network than boundaries; got {len(models)} networks and "
                             f"{len(boundaries)} boundaries.")
        steps = zip(boundaries[:-1], boundaries[1:], strict=True)
        if any(not 0 < b < 1 for b in boundaries) or any(a >= b for a, b in steps):
            raise ValueError(f"boundaries must be increasing times strictly inside (0, 1); got {boundaries}.")
        self.models = nn.ModuleList(m if isinstance(m, nn.Module) else _Callable(m) for m in models)
        self.boundaries = boundaries

    @property
    def ranges(self) -> list[tuple[float, float]]:
        """The (t_min, t_max] of each network, for ``training_loss(t_range=...)``."""
        edges = [0.0, *self.boundaries, 1.0]
        return list(zip(edges[:-1], edges[1:], strict=True))

    @property
    def nfe_per_call(self) -> int:
        return max(network_evaluations(m) for m in self.models)

    def index(self, t) -> torch.Tensor:
        """The network of each time: k with boundaries[k-1] < t <= boundaries[k] (long, shape of t). The
        boundaries are rounded to t's own float dtype first, so a float32 t equal to S (as the sampler and the
        training loss pass it) goes to the network below S, the one trained on it."""
        t = torch.as_tensor(t)
        if not t.is_floating_point():
            t = t.to(torch.float64)
        edges = torch.tensor(self.boundaries, dtype=t.dtype, device=t.device)
        return torch.bucketize(t.contiguous(), edges, right=False)

    def forward(self, z: torch.Tensor, t, **cond) -> torch.Tensor:
        t = torch.as_tensor(t, device=z.device)
        t_vec = t.expand(len(z)) if t.ndim == 0 else t
        which = self.index(t_vec)
        out = None
        for k, model in enumerate(self.models):
            mask = which == k
            if not bool(mask.any()):
                continue
            sub = {key: (v[mask] if isinstance(v, torch.Tensor) and v.ndim > 0 and len(v) == len(z) else v)
                   for key, v in cond.items()}
            part = model(z[mask], t_vec[mask], **sub)
            if out is None:
                out = torch.empty((len(z), *part.shape[1:]), dtype=part.dtype, device=part.device)
            out[mask] = part
        return out


class _Callable(nn.Module):
    """A plain function as a module (so a SplitModel may hold analytic denoisers or lambdas)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


# ----------------------------------------------------------------------------- measuring Sec. 2.2


def radial_power_spectrum(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(frequencies, power): the mean power |FFT|^2 of the images (B, C, H, W) in rings of radial frequency
    k = 0, 1, ..., min(H, W) // 2 (cycles per image), averaged over the batch, the channels and the
    ring (Chapter 7 §1). The mean of each image is removed first, so k = 0 holds no energy. Float64."""
    _check_images(images, "images")
    x = images.to(torch.float64)
    x = x - x.mean(dim=(2, 3), keepdim=True)
    power = torch.fft.fft2(x).abs().pow(2).mean(dim=(0, 1))                        # (H, W)
    H, W = power.shape
    fy = torch.fft.fftfreq(H, 1 / H, dtype=torch.float64)                          # cycles per image
    fx = torch.fft.fftfreq(W, 1 / W, dtype=torch.float64)
    radius = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2).round().long()
    top = min(H, W) // 2
    freqs = torch.arange(top + 1)
    ring = torch.stack([power[radius == k].mean() if bool((radius == k).any()) else power.new_zeros(())
                        for k in freqs])
    return freqs, ring


def high_frequency_fraction(images: torch.Tensor, cutoff: float = 0.25) -> float:
    """The share of the images' (mean-removed) energy above `cutoff` times the Nyquist frequency, from
    the full 2-D power spectrum (Parseval: the shares sum to 1). A blurred image has less of it
    (Luhman & Luhman 2022, Sec. 2.2: x* blurs as t grows; Chapter 7 §1)."""
    _check_images(images, "images")
    if not 0 < cutoff < 1:
        raise ValueError(f"cutoff must lie in (0, 1) (a fraction of the Nyquist frequency); got {cutoff!r}.")
    x = images.to(torch.float64)
    x = x - x.mean(dim=(2, 3), keepdim=True)
    power = torch.fft.fft2(x).abs().pow(2).sum(dim=(0, 1))
    H, W = power.shape
    fy = torch.fft.fftfreq(H, dtype=torch.float64)                                 # cycles per pixel
    fx = torch.fft.fftfreq(W, dtype=torch.float64)
    radius = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2) / 0.5                 # in units of Nyquist
    total = float(power.sum())
    return float(power[radius > cutoff].sum()) / total if total > 0 else 0.0


def saved_activation_bytes(loss_fn: Callable[[], torch.Tensor], exclude: Iterable[torch.Tensor] = ()) -> int:
    """The activation memory of one training step: the bytes of the tensors autograd saves for the backward
    pass while ``loss_fn()`` runs (``torch.autograd.graph.saved_tensors_hooks``), each storage counted once,
    leaving out `exclude` (pass the parameters). Runs the backward pass too, so the graph is freed. This
    is the memory that patching divides (Luhman & Luhman 2022, Sec. 4: 4x; Chapter 7 §3)."""
    seen: dict[int, int] = {}
    skip = {t.untyped_storage().data_ptr() for t in exclude}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    loss.backward()
    return sum(seen.values())


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silence what native code writes to file descriptor 2 (the profiler's start/stop lines); Python's own
    warnings and errors are unaffected."""
    try:
        saved = os.dup(2)
    except OSError:          # no file descriptor 2 to redirect
        yield
        return
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def peak_allocated_bytes(fn: Callable[[], object]) -> int:
    """The peak of the bytes allocated while ``fn()`` runs, above what was allocated before it. PyTorch's
    profiler attributes every allocation to the operator that made it and records frees as [memory] events;
    their running sum, in the order the events start, is the live memory. Measures sampling (no_grad)
    memory, where nothing is saved for a backward pass (Chapter 8 §1)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with _quiet_native_stderr(), profile(activities=activities, profile_memory=True) as prof:
        fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage + getattr(e, "self_device_memory_usage", 0)
        peak = max(peak, live)
    return int(peak)
