"""Noise schedules of variance-preserving diffusion: alpha(t), sigma(t) and logsnr(t).

Continuous time t in [0, 1] (t=0 data, t=1 noise) and the forward marginal
z_t = alpha_t x + sigma_t eps with alpha_t^2 + sigma_t^2 = 1 (Ho et al. 2020, eq. (4) with
alpha-bar_t = alpha_t^2; Salimans & Ho 2022, Sec. 2). The log signal-to-noise ratio is
lambda_t = log(alpha_t^2 / sigma_t^2); in a VP process it fixes everything else:
alpha_t^2 = sigmoid(lambda_t), sigma_t^2 = sigmoid(-lambda_t).

Two kinds of schedule share one interface (:class:`NoiseSchedule`):

* :class:`DiscreteSchedule`: DDPM's betas (T,), with step i in {1..T} at t = i/T.
* continuous ones (:class:`LinearVPSchedule`, :class:`CosineSchedule`), defined by a formula
  for lambda_t that is clipped to [logsnr_min, logsnr_max] so that t=0 and t=1 give finite
  numbers (alpha(0) is then just below 1 and sigma(1) just below 1).

All schedule arithmetic is done in float64; results come back in the dtype of `t`.
``schedule.memoized()`` is a copy that answers repeated questions at the same scalar time from
memory; the sampling loop asks it, so a grid is evaluated once per schedule, not once per step or
per run (Chapter 1 §6).
"""

from __future__ import annotations

import copy
import functools
import math
import weakref

import torch

__all__ = [
    "GRID_TOL",
    "NoiseSchedule",
    "DiscreteSchedule",
    "ContinuousSchedule",
    "LinearVPSchedule",
    "CosineSchedule",
    "linear_betas",
    "cosine_betas",
    "discretize",
    "get_schedule",
    "SCHEDULES",
    "SPACINGS",
    "respace_indices",
    "respace",
    "respaced_schedule",
]

# A time within this many steps of a grid point i/T counts as on the grid. It absorbs the
# rounding of float32 times such as 999/1000 (off by about 1e-5 steps).
GRID_TOL = 1e-3


def _check_time(t) -> tuple[torch.Tensor, torch.dtype, torch.device]:
    """Check that t lies in [0, 1]; return it in float64 with the dtype and device to answer in.

    A tensor answers in its own floating dtype; a Python number in torch's default dtype.
    """
    if isinstance(t, torch.Tensor):
        dtype = t.dtype if t.is_floating_point() else torch.get_default_dtype()
        device = t.device
        t64 = t.cpu() if device.type == "mps" else t  # MPS has no float64
        t64 = t64 if t64.dtype == torch.float64 else t64.to(torch.float64)
    else:
        dtype, device = torch.get_default_dtype(), torch.device("cpu")
        t64 = torch.as_tensor(t, dtype=torch.float64)
    inside = 0 <= float(t64) <= 1 if t64.ndim == 0 else bool(((t64 >= 0) & (t64 <= 1)).all())  # False for NaN
    if t64.numel() > 0 and not inside:
        raise ValueError(
            f"time t must lie in [0, 1] (t=0 is data, t=1 is noise); got values in "
            f"[{t64.min().item():.4g}, {t64.max().item():.4g}]. For DDPM step i of T pass t = i / T."
        )
    return t64, dtype, device


def _answer(x64: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A float64 result in the dtype and on the device to answer in."""
    return x64 if x64.dtype == dtype and x64.device == device else x64.to(dtype=dtype, device=device)


SIDES = ("left", "right")


def _check_side(side: str) -> None:
    if side not in SIDES:
        raise ValueError(f"unknown side {side!r}; choose 'left' (the piece below t, towards data) or 'right' "
                         "(the piece above t, towards noise).")


MEMO_LIMIT = 1 << 16  # answers a memoized schedule keeps before it starts afresh
_MEMOIZED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # schedule -> its memoized copy


def _remembered(method):
    """Let a memoized schedule (:meth:`NoiseSchedule.memoized`) answer `method` at a scalar CPU time from
    memory: the first answer is stored and returned again, the very same tensors, bit for bit."""

    name = method.__name__

    @functools.wraps(method)
    def wrapper(self, t, **kwargs):
        memo = self._memo
        if memo is None or not (isinstance(t, torch.Tensor) and t.ndim == 0 and t.is_cpu
                                and not t.requires_grad):
            return method(self, t, **kwargs)
        key = (name, float(t), t.dtype, *kwargs.values())
        answer = memo.get(key)
        if answer is None:
            if len(memo) >= MEMO_LIMIT:  # many distinct times (continuous grids): start afresh
                memo.clear()
            answer = memo[key] = method(self, t, **kwargs)
        return answer

    return wrapper


class NoiseSchedule:
    """Base class: a VP noise schedule in continuous time t in [0, 1].

    Subclasses implement ``_logsnr64(t)`` (float64 in, float64 out) and may override
    ``_alpha_sigma64(t)``; everything else follows from alpha^2 = sigmoid(lambda).
    """

    _memo: dict | None = None  # a dict on the copies that memoized() makes

    def memoized(self) -> NoiseSchedule:
        """A copy of this schedule (same class and tensors) that computes ``alpha_sigma``, ``logsnr``,
        ``dlogsnr_dt`` and ``alpha_sigma_dt`` once per scalar time (a 0-d CPU tensor) and then answers
        from memory.

        The answers are the tensors the schedule itself returns, so results stay bit for bit the same;
        do not modify them in place. The copy is made once per schedule and kept (for as long as the
        schedule lives), so its memory serves every later run: ``samplers.sample`` asks it, and a grid
        it has seen costs dictionary look-ups only. A DDPM step asked the schedule 9 times per step;
        each answer now costs one evaluation per time, per schedule. At most ``MEMO_LIMIT`` answers
        are kept. A memoized schedule is its own memoized copy.
        """
        if self._memo is not None:
            return self
        clone = _MEMOIZED.get(self)
        if clone is None:
            clone = copy.copy(self)
            clone._memo = {}
            _MEMOIZED[self] = clone
        return clone

    def _logsnr64(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _alpha_sigma64(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lam = self._logsnr64(t)
        return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()

    @_remembered
    def logsnr(self, t) -> torch.Tensor:
        """lambda_t = log(alpha_t^2 / sigma_t^2), decreasing in t."""
        t64, dtype, device = _check_time(t)
        return _answer(self._logsnr64(t64), dtype, device)

    @_remembered
    def alpha_sigma(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) with alpha_t^2 + sigma_t^2 = 1."""
        t64, dtype, device = _check_time(t)
        alpha, sigma = self._alpha_sigma64(t64)
        return _answer(alpha, dtype, device), _answer(sigma, dtype, device)

    def alpha(self, t) -> torch.Tensor:
        """Signal scale alpha_t (DDPM: sqrt(alpha-bar_t))."""
        return self.alpha_sigma(t)[0]

    def sigma(self, t) -> torch.Tensor:
        """Noise scale sigma_t (DDPM: sqrt(1 - alpha-bar_t))."""
        return self.alpha_sigma(t)[1]

    def snr(self, t) -> torch.Tensor:
        """Signal-to-noise ratio alpha_t^2 / sigma_t^2 = exp(lambda_t)."""
        return self.logsnr(t).exp()

    @_remembered
    def dlogsnr_dt(self, t, *, side: str = "left") -> torch.Tensor:
        """d lambda_t / dt (<= 0), by float64 autograd through the formula for lambda_t.

        It is 0 where the logsnr clip is active. The probability-flow ODE solvers need it
        (samplers.probability_flow_velocity; Salimans & Ho 2022, eqs. (8)-(9); Chapter 3 §4).
        `side` picks the one-sided derivative where lambda_t has a kink ('left': from below t,
        'right': from above); a formula's lambda_t is smooth, so here both sides agree.
        """
        _check_side(side)
        t64, dtype, device = _check_time(t)
        with torch.enable_grad():
            tt = t64.detach().clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(self._logsnr64(tt).sum(), tt)
        return _answer(grad, dtype, device)


    @_remembered
    def alpha_sigma_dt(self, t, *, side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
        """(d alpha_t/dt, d sigma_t/dt) = (sigma^2 lambda' alpha / 2, -alpha^2 lambda' sigma / 2), from
        alpha^2 = sigmoid(lambda): the coefficients of the probability-flow ODE dz/dt = alpha' x + sigma' eps
        (Salimans & Ho 2022, eqs. (6)-(9); Chapter 3 §4). `side` as in :meth:`dlogsnr_dt`."""
        alpha, sigma = self.alpha_sigma(t)
        dlam = self.dlogsnr_dt(t, side=side)
        return 0.5 * sigma**2 * dlam * alpha, -0.5 * alpha**2 * dlam * sigma


class DiscreteSchedule(NoiseSchedule):
    """DDPM's discrete schedule from betas (T,), read in continuous time (Ho et al. 2020, eq. (4)).

    Step i in {1..T} sits at t = i/T and alpha(i/T)^2 = alpha-bar_i = prod_{j<=i} (1 - beta_j),
    with alpha-bar at t=0 equal to 1 (so sigma(0) = 0 and logsnr(0) = +inf). Between grid points
    log(alpha-bar) is interpolated linearly in t. Tensors are stored in float64, 0-indexed:
    ``alphas_cumprod[i - 1]`` is alpha-bar_i.
    """

    def __init__(self, betas):
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
        if betas.ndim != 1 or len(betas) == 0:
            raise ValueError(f"betas must be a 1-D tensor of length T >= 1; got shape {tuple(betas.shape)}.")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("every beta must lie in (0, 1); check the schedule (e.g. max_beta < 1).")
        self.T = len(betas)
        self.betas = betas
        self.alphas = 1 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        # log alpha-bar on the grid t = 0, 1/T, ..., 1 (value 0 at t = 0).
        self._log_alpha_bar_grid = torch.cat([torch.zeros(1, dtype=torch.float64),
                                              torch.cumsum(torch.log1p(-betas), dim=0)])
        self._on_grid = self._grid_table()  # the values at t = i/T, looked up by the sampler's times

    def __repr__(self) -> str:
        return f"DiscreteSchedule(T={self.T}, beta_1={self.betas[0]:.4g}, beta_T={self.betas[-1]:.4g})"

    def t_of(self, i):
        """Continuous time t = i / T of DDPM step i."""
        return i / self.T

    def index_of(self, t):
        """DDPM step i with i / T == t (int for a scalar, long tensor otherwise)."""
        t64, _, device = _check_time(t)
        u = t64 * self.T
        i = u.round()
        if not bool(((u - i).abs() < GRID_TOL).all()):
            raise ValueError(f"t is not on the grid i/T of this schedule (T={self.T}); "
                             f"use t = i / {self.T} for an integer i in 0..{self.T}.")
        i = i.long().to(device)
        return int(i) if i.ndim == 0 else i

    def _grid_step(self, t: torch.Tensor) -> int | None:
        """The step i of a scalar CPU time on the grid (t = i/T up to GRID_TOL steps), else None.

        A fast path for the times a sampler visits: there the linear interpolation of log alpha-bar
        returns the grid value itself (lerp with weight 0, or 1 at i = T), so the values in
        ``_on_grid`` are the ones the formulas give, bit for bit.
        """
        if t.ndim != 0 or t.device.type != "cpu":
            return None
        u = float(t) * self.T
        i = round(u)  # half to even, as torch.round
        return i if abs(u - i) < GRID_TOL else None

    def _grid_table(self) -> dict[str, torch.Tensor]:
        """alpha, sigma, lambda and the one-sided lambda' ("left", "right") at the T+1 grid points,
        computed once for the schedule. Every entry is the same elementwise float64 formula as for a
        single time, so looking a value up gives what computing it gives, bit for bit (a test checks)."""
        lab = self._log_alpha_bar_grid
        one_minus_abar = -torch.expm1(lab)
        slope = (lab[1:] - lab[:-1]) * self.T  # L' on the cells 1..T
        table = {"alpha": (0.5 * lab).exp(), "sigma": one_minus_abar.sqrt(),
                 "logsnr": lab - torch.log(one_minus_abar),
                 "left": torch.cat([slope[:1], slope]) / one_minus_abar,    # the cell below (cell 1 at t = 0)
                 "right": torch.cat([slope, slope[-1:]]) / one_minus_abar}  # the cell above (cell T at t = 1)
        alpha, sigma = table["alpha"], table["sigma"]
        for side in SIDES:  # alpha' and sigma', as NoiseSchedule.alpha_sigma_dt computes them
            dlam = table[side]
            table["dt_" + side] = (0.5 * sigma**2 * dlam * alpha, -0.5 * alpha**2 * dlam * sigma)
        return table

    def _log_alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        grid = self._log_alpha_bar_grid.to(t.device)
        u = t * self.T
        nearest = u.round()
        u = torch.where((u - nearest).abs() < GRID_TOL, nearest, u)  # snap onto the grid
        lo = u.floor().clamp(0, self.T - 1).long()
        return torch.lerp(grid[lo], grid[lo + 1], u - lo)  # exact at both ends

    def _logsnr64(self, t):
        i = self._grid_step(t)
        if i is not None:
            return self._on_grid["logsnr"][i].clone()
        log_alpha_bar = self._log_alpha_bar(t)
        return log_alpha_bar - torch.log(-torch.expm1(log_alpha_bar))  # log(abar / (1 - abar))

    @_remembered
    def dlogsnr_dt(self, t, *, side: str = "left") -> torch.Tensor:
        """d lambda / dt = L' / (1 - abar) with L = log abar linear on each cell (Chapter 3 §4).

        lambda_t has a kink at every grid point i/T, where the derivative has two values: side="left"
        takes the slope of the cell below, ((i-1)/T, i/T], side="right" that of the cell above,
        (i/T, (i+1)/T] (at t = 0 and t = 1 the one cell there). Between grid points both agree. A step
        from t down to s lies in the cells between them: it needs "left" at t and "right" at s
        (samplers.HeunStep). It is -inf at t = 0."""
        _check_side(side)
        t64, dtype, device = _check_time(t)
        step = self._grid_step(t64)
        if step is not None:  # a grid point: the cell below it or the one above
            return _answer(self._on_grid[side][step].clone(), dtype, device)
        grid = self._log_alpha_bar_grid
        u = t64.cpu() * self.T
        nearest = u.round()
        u = torch.where((u - nearest).abs() < GRID_TOL, nearest, u)
        i = (u.ceil() if side == "left" else u.floor() + 1).clamp(1, self.T).long()
        slope = (grid[i] - grid[i - 1]) * self.T
        out = slope / -torch.expm1(self._log_alpha_bar(t64.cpu()))
        return _answer(out, dtype, device)

    @_remembered
    def alpha_sigma_dt(self, t, *, side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
        """(d alpha/dt, d sigma/dt) as in :meth:`NoiseSchedule.alpha_sigma_dt`, one-sided at grid points
        (looked up there)."""
        _check_side(side)
        t64, dtype, device = _check_time(t)
        step = self._grid_step(t64)
        if step is None:
            return NoiseSchedule.alpha_sigma_dt(self, t, side=side)
        d_alpha, d_sigma = self._on_grid["dt_" + side]
        return _answer(d_alpha[step].clone(), dtype, device), _answer(d_sigma[step].clone(), dtype, device)

    def _alpha_sigma64(self, t):
        i = self._grid_step(t)
        if i is not None:
            return self._on_grid["alpha"][i].clone(), self._on_grid["sigma"][i].clone()
        log_alpha_bar = self._log_alpha_bar(t)
        return (0.5 * log_alpha_bar).exp(), (-torch.expm1(log_alpha_bar)).sqrt()


class ContinuousSchedule(NoiseSchedule):
    """A schedule given by a formula for lambda_t, clipped to [logsnr_min, logsnr_max].

    The clip keeps t=0 and t=1 finite: at the defaults (+-20) alpha(0)^2 = sigmoid(20), i.e.
    sigma(0) ~ 4.5e-5, and alpha(1) >= 4.5e-5.
    """

    def __init__(self, logsnr_min: float = -20.0, logsnr_max: float = 20.0):
        if not logsnr_min < logsnr_max:
            raise ValueError(f"need logsnr_min < logsnr_max; got {logsnr_min}, {logsnr_max}.")
        self.logsnr_min = float(logsnr_min)
        self.logsnr_max = float(logsnr_max)

    def _unclipped_logsnr64(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _logsnr64(self, t):
        return self._unclipped_logsnr64(t).clamp(self.logsnr_min, self.logsnr_max)


class LinearVPSchedule(ContinuousSchedule):
    """Continuous VP schedule with beta(t) = beta_min + t (beta_max - beta_min) (Song et al. 2021).

    alpha_t^2 = exp(-B(t)) with B(t) = int_0^t beta = beta_min t + (beta_max - beta_min) t^2 / 2,
    so lambda_t = -log(exp(B(t)) - 1). DDPM's linear betas are its discretisation with T=1000.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, logsnr_min: float = -20.0,
                 logsnr_max: float = 20.0):
        super().__init__(logsnr_min, logsnr_max)
        if not 0 < beta_min <= beta_max:
            raise ValueError(f"need 0 < beta_min <= beta_max; got {beta_min}, {beta_max}.")
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)

    def __repr__(self) -> str:
        return f"LinearVPSchedule(beta_min={self.beta_min}, beta_max={self.beta_max})"

    def _unclipped_logsnr64(self, t):
        integral = self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2
        return -torch.log(torch.expm1(integral))


class CosineSchedule(ContinuousSchedule):
    """Cosine schedule alpha_t = cos(pi/2 (t+s)/(1+s)) / cos(pi/2 s/(1+s)) (Nichol & Dhariwal 2021).

    Normalised so alpha_0 = 1; lambda_t = log(alpha_t^2 / (1 - alpha_t^2)) clipped to
    [logsnr_min, logsnr_max] (Salimans & Ho 2022 clip at about +-20).
    """

    def __init__(self, s: float = 0.008, logsnr_min: float = -20.0, logsnr_max: float = 20.0):
        super().__init__(logsnr_min, logsnr_max)
        if s < 0:
            raise ValueError(f"the cosine offset s must be >= 0; got {s}.")
        self.s = float(s)

    def __repr__(self) -> str:
        return f"CosineSchedule(s={self.s}, logsnr in [{self.logsnr_min}, {self.logsnr_max}])"

    def _unclipped_logsnr64(self, t):
        angle = 0.5 * math.pi * (t + self.s) / (1 + self.s)
        alpha2 = (torch.cos(angle) / math.cos(0.5 * math.pi * self.s / (1 + self.s))) ** 2
        return torch.log(alpha2) - torch.log1p(-alpha2)


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM's linear betas, beta_1 = beta_start ... beta_T = beta_end (Ho et al. 2020, Sec. 4)."""
    _check_T(T)
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal's cosine betas: beta_i = min(1 - abar(i/T) / abar((i-1)/T), max_beta),
    abar(t) = f(t) / f(0), f(t) = cos^2(pi/2 (t+s)/(1+s))."""
    _check_T(T)
    t = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos(0.5 * math.pi * (t + s) / (1 + s)) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def discretize(schedule: NoiseSchedule, T: int) -> DiscreteSchedule:
    """The discrete schedule on t = i/T: alpha-bar_i = alpha(i/T)^2, beta_i = 1 - abar_i / abar_{i-1}
    (alpha-bar_0 = 1)."""
    _check_T(T)
    t = torch.arange(1, T + 1, dtype=torch.float64) / T
    alpha_bar = torch.cat([torch.ones(1, dtype=torch.float64), schedule.alpha(t) ** 2])
    return DiscreteSchedule(1 - alpha_bar[1:] / alpha_bar[:-1])


SPACINGS = ("leading", "trailing", "linspace")


def respace_indices(T: int, steps: int, spacing: str = "leading") -> torch.Tensor:
    """`steps` of the DDPM steps {1..T}, increasing (long tensor), chosen as diffusers / DDIM do.

    With 1-based DDPM steps (t = i/T) and k = 0..steps-1:

    * "leading":  i = k * (T // steps) + 1   (diffusers "leading" with steps_offset=0; DDIM's
      uniform skip). The largest step is (steps-1)(T//steps)+1 < T in general: sampling does
      not start at t=1, which costs quality at few steps.
    * "trailing": i = round(T - k T / steps)  (diffusers "trailing"; Lin et al. 2024). It always
      includes i = T, i.e. t = 1, the noisiest step, where z ~ N(0, I) is correct.
    * "linspace": i = round(linspace(0, T-1, steps)) + 1  (diffusers "linspace"); includes 1 and T.

    round() is round-half-to-even, as numpy's. Raises ValueError for steps < 1, steps > T or an
    unknown spacing.
    """
    _check_T(T)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer in 1..T = 1..{T} (a step count that fits the "
                         f"schedule); got {steps!r}.")
    k = torch.arange(steps, dtype=torch.float64)
    if spacing == "leading":
        idx = k * (T // steps) + 1
    elif spacing == "trailing":
        idx = torch.round(T * (steps - k) / steps).flip(0)
    elif spacing == "linspace":
        idx = torch.round(torch.linspace(0, T - 1, steps, dtype=torch.float64)) + 1
    else:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}.")
    return idx.long()


def respace(T: int, steps: int, spacing: str = "leading") -> torch.Tensor:
    """Sampling times for `steps` steps on a T-step grid: [i_steps/T, ..., i_1/T, 0] (float64,
    decreasing, length steps+1), with the DDPM steps i_k of :func:`respace_indices` and a final 0
    (data). Pass it to samplers.sample as `timesteps`. "trailing" starts at t = 1; "leading"
    usually starts below 1."""
    idx = respace_indices(T, steps, spacing)
    return torch.cat([idx.flip(0).to(torch.float64) / T, torch.zeros(1, dtype=torch.float64)])


def respaced_schedule(schedule: DiscreteSchedule, indices) -> DiscreteSchedule:
    """The DDPM schedule of a subset of steps (Nichol & Dhariwal 2021, Sec. 4): with the chosen
    1-based steps i_1 < ... < i_K, alpha-bar'_k = alpha-bar_{i_k} and
    beta'_k = 1 - alpha-bar_{i_k} / alpha-bar_{i_{k-1}} (alpha-bar_{i_0} = 1).

    Step k of the new schedule (t' = k/K) is step i_k (t = i_k/T) of the old one: a network
    trained on the old schedule must be called at t = i_k/T, not at k/K.
    """
    if not isinstance(schedule, DiscreteSchedule):
        raise ValueError(f"respaced_schedule needs a DiscreteSchedule (alpha-bars on a grid); got "
                         f"{type(schedule).__name__}. Use discretize(schedule, T) first.")
    idx = torch.as_tensor(indices).detach().cpu()
    if idx.is_floating_point():
        if not bool((idx == idx.round()).all()):
            raise ValueError("indices must be integer DDPM steps in 1..T (not times).")
        idx = idx.long()
    idx = idx.reshape(-1)
    if len(idx) == 0 or not bool(((idx >= 1) & (idx <= schedule.T)).all()):
        raise ValueError(f"indices must be a non-empty set of DDPM steps in 1..T = 1..{schedule.T}.")
    idx = idx.sort().values
    if not bool((idx[1:] > idx[:-1]).all()):
        raise ValueError("indices must not repeat a step.")
    abar = schedule.alphas_cumprod[idx - 1]
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    return DiscreteSchedule(1 - abar / abar_prev)


def _check_T(T) -> None:
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"the number of steps T must be a positive integer; got {T!r}.")


SCHEDULES = ("linear", "cosine", "linear_vp", "cosine_continuous")


def get_schedule(name: str, T: int | None = None, **kwargs) -> NoiseSchedule:
    """A schedule by name: "linear" / "cosine" (discrete, T defaults to 1000) or
    "linear_vp" / "cosine_continuous" (continuous; use discretize() for a grid)."""
    if name in ("linear", "cosine"):
        T = 1000 if T is None else T
        betas = linear_betas(T, **kwargs) if name == "linear" else cosine_betas(T, **kwargs)
        return DiscreteSchedule(betas)
    if name in ("linear_vp", "cosine_continuous"):
        if T is not None:
            raise ValueError(f"schedule {name!r} is continuous and takes no T; "
                             f"use discretize(get_schedule({name!r}), {T}) for a {T}-step grid.")
        return LinearVPSchedule(**kwargs) if name == "linear_vp" else CosineSchedule(**kwargs)
    raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}.")
