"""Exact answers for Gaussian-mixture data: the optimal denoiser and the Gaussian probability-flow map.

For data x ~ sum_k pi_k N(c_k, s^2 I) and z_t = alpha_t x + sigma_t eps, each component gives
z_t | k ~ N(alpha c_k, v I) with v = alpha^2 s^2 + sigma^2, and by Bayes (Gaussian conditioning)

    E[x | z_t, k] = c_k + (alpha s^2 / v) (z_t - alpha c_k),
    x*(z_t)       = sum_k r_k(z_t) E[x | z_t, k],   r_k ∝ pi_k exp(-|z_t - alpha c_k|^2 / (2 v)),

the posterior-weighted average that minimises the denoising loss (Luhman & Luhman 2022, eq. (4)).
The matching eps* = (z_t - alpha x*) / sigma = sum_k r_k sigma (z_t - alpha c_k) / v is finite at
sigma = 0. Plugging x* into a sampler isolates the sampler's own error from the network's.

The whole denoising distribution q(z_s | z_t) (s < t) of such data is again a Gaussian mixture
(``GaussianMixtureDenoiser.reverse_step``): with few, large steps it is multimodal, which DDPM's
Gaussian reverse step cannot represent (Xiao et al. 2022, Sec. 3.1; chapter 4). ``moment_match``
gives its best Gaussian fit and ``mixture_log_prob`` its density.

With classes (each component k has a label y_k, e.g. the rows of the 25-Gaussians grid), the same
formulas restricted to the components of class y give the conditional denoiser E[x | z_t, y], and the
class posterior p(y | z_t) = sum_{k: y_k = y} r_k(z_t) is the exact noise-conditional classifier
(``GaussianMixtureClassifier``): the answers classifier guidance and classifier-free guidance are
checked against (Chapter 6 §2).
"""

from __future__ import annotations

import torch

from .diffusion import PREDICTIONS, posterior_coefficients, prediction_from
from .schedules import NoiseSchedule

__all__ = ["GaussianMixtureDenoiser", "GaussianMixtureClassifier", "EmpiricalDenoiser", "gaussian_flow_map",
           "mixture_log_prob", "moment_match", "ExactMixtureStep"]


class GaussianMixtureDenoiser(torch.nn.Module):
    """The optimal denoiser of a mixture of isotropic Gaussians, usable as a model(z, t).

    centers: (K, D) component means (D = number of features per example); std: the common
    standard deviation s (0 allowed: point masses); weights: (K,) mixture weights (default equal).
    Returns the `prediction` ("x", "eps" or "v") of the exact posterior mean at (z, t) for `schedule`.
    Computed in float64, returned in z's dtype. A single component is the Gaussian case.
    classes: optional (K,) integer label of each component (0..C-1). Then ``model(z, t, labels=y)`` is the
    exact conditional denoiser E[x | z_t, y] (the mixture of class y's components, with their weights),
    and labels None or -1 (the null token of ``diffusion.null_conditioning``) the unconditional one.
    """

    null_token = True  # labels=-1 is the exact unconditional denoiser (classifier-free guidance)

    def __init__(self, centers: torch.Tensor, std: float, schedule: NoiseSchedule, prediction: str = "x",
                 weights: torch.Tensor | None = None, classes: torch.Tensor | None = None):
        super().__init__()
        centers = torch.as_tensor(centers, dtype=torch.float64)
        if centers.ndim != 2:
            raise ValueError(f"centers must be a (K, D) tensor of component means; "
                             f"got shape {tuple(centers.shape)}.")
        if not float(std) >= 0:
            raise ValueError(f"std must be >= 0; got {std}.")
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}.")
        if weights is None:
            weights = torch.full((len(centers),), 1.0 / len(centers), dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (len(centers),) or bool((weights < 0).any()) or float(weights.sum()) <= 0:
            raise ValueError("weights must be K non-negative numbers (one per center) with a positive sum.")
        if classes is not None:
            classes = torch.as_tensor(classes)
            bad = classes.shape != (len(centers),) or classes.dtype.is_floating_point
            if bad or bool((classes < 0).any()):
                raise ValueError(f"classes must hold one integer label >= 0 per center, shape "
                                 f"({len(centers)},); got {classes.dtype}, shape {tuple(classes.shape)}.")
            classes = classes.long()
        self.register_buffer("centers", centers)
        self.register_buffer("log_weights", (weights / weights.sum()).log())
        self.register_buffer("classes", classes)
        self.num_classes = None if classes is None else int(classes.max()) + 1
        self.std, self.schedule, self.prediction = float(std), schedule, prediction

    def _log_weights(self, labels, batch: int, device) -> torch.Tensor:
        """(B, K) log mixture weights given the labels: those of class y's components (renormalised), -inf
        elsewhere; all components where the label is None or -1 (the unconditional mixture)."""
        log_w = self.log_weights.to(device)[None].expand(batch, -1)
        if labels is None:
            return log_w
        if self.classes is None:
            raise ValueError("this denoiser was built without classes=; pass classes (one label per center) "
                             "to condition it on labels.")
        labels = torch.as_tensor(labels, device=device).reshape(-1).expand(batch).long()
        if bool(((labels < -1) | (labels >= self.num_classes)).any()):
            raise ValueError(f"labels must lie in 0..{self.num_classes - 1} (or -1 for the unconditional "
                             f"denoiser); got values in [{int(labels.min())}, {int(labels.max())}].")
        member = self.classes.to(device)[None] == labels[:, None]                  # (B, K)
        member = member | (labels[:, None] < 0)                                       # null: every component
        masked = torch.where(member, log_w, torch.full_like(log_w, -torch.inf))
        return masked - torch.logsumexp(masked, dim=1, keepdim=True)

    def _responsibilities(self, z: torch.Tensor, t, labels=None):
        """(flat z, alpha, sigma, v, diff, log r) at (z, t): log r_k(z_t) = log posterior of component k."""
        flat = z.reshape(len(z), -1).to(torch.float64)
        if flat.shape[1] != self.centers.shape[1]:
            raise ValueError(f"z has {flat.shape[1]} features per example but the centers have "
                             f"{self.centers.shape[1]}.")
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(len(z))
        alpha, sigma = self.schedule.alpha_sigma(t.cpu())
        alpha, sigma = alpha.to(flat.device)[:, None], sigma.to(flat.device)[:, None]
        v = alpha**2 * self.std**2 + sigma**2                                       # (B, 1)
        diff = flat[:, None, :] - alpha[:, :, None] * self.centers[None]  # z - alpha c_k, (B, K, D)
        logits = self._log_weights(labels, len(z), flat.device) - (diff**2).sum(-1) / (2 * v)
        return flat, alpha, sigma, v, diff, torch.log_softmax(logits, dim=1)

    def class_log_posterior(self, z: torch.Tensor, t) -> torch.Tensor:
        """log p(y | z_t) for every class, (B, C) in float64: log sum_{k: y_k = y} r_k(z_t), the exact
        noise-conditional classifier (Bayes' rule on the mixture; Chapter 6 §2)."""
        if self.classes is None:
            raise ValueError("class_log_posterior needs a denoiser built with classes= (one label per "
                             "center).")
        log_r = self._responsibilities(z, t)[-1]                                   # (B, K)
        member = self.classes.to(log_r.device)[None, :] == torch.arange(self.num_classes,
                                                                         device=log_r.device)[:, None]
        return torch.logsumexp(torch.where(member[None], log_r[:, None, :], -torch.inf), dim=2)

    def posterior_mean(self, z: torch.Tensor, t: torch.Tensor, labels=None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x*, eps*) at z (B, ...) and times t (B,) or a scalar, in float64; given labels (classes=), the
        conditional ones E[x | z_t, y]."""
        flat, alpha, sigma, v, diff, log_r = self._responsibilities(z, t, labels)
        r = log_r.exp()[:, :, None]                                                  # responsibilities r_k
        x_k = self.centers[None] + (alpha * self.std**2 / v)[:, :, None] * diff      # E[x | z, k]
        eps_k = (sigma / v)[:, :, None] * diff
        return (r * x_k).sum(1).reshape(z.shape), (r * eps_k).sum(1).reshape(z.shape)

    def forward(self, z: torch.Tensor, t: torch.Tensor, labels=None, **cond) -> torch.Tensor:
        """The model contract ``model(z, t, **cond)`` (``contracts.Model``; labels as in the class docstring,
        other cond ignored): x*, eps* or v* = alpha eps* - sigma x*, written with
        ``diffusion.prediction_from`` (Chapter 1 §4)."""
        x, eps = self.posterior_mean(z, t, labels)
        alpha = sigma = None
        if self.prediction == "v":
            t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(len(z)).cpu()
            alpha, sigma = (a.to(x.device) for a in self.schedule.alpha_sigma(t))
        return prediction_from(x, eps, self.prediction, alpha=alpha, sigma=sigma).to(z.dtype)

    def reverse_step(self, z_t: torch.Tensor, t, s) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The exact denoising distribution q(z_s | z_t) for 0 <= s < t, a Gaussian mixture.

        Given z_t and component k, x ~ N(m_k, tau^2 I) with m_k = E[x | z_t, k] and
        tau^2 = s^2 sigma_t^2 / v_t (Gaussian conditioning); the posterior of the forward process is
        q(z_s | z_t, x) = N(a z_t + b x, var I) with a = e^{lambda_t - lambda_s} alpha_s / alpha_t,
        b = (1 - e^{lambda_t - lambda_s}) alpha_s, var = (1 - e^{lambda_t - lambda_s}) sigma_s^2
        (``diffusion.posterior_coefficients``; Chapter 4 §1). Integrating x out of
        q(z_s | z_t, x) q(x | z_t):

            q(z_s | z_t) = sum_k r_k(z_t) N(a z_t + b m_k, (var + b^2 tau^2) I),

        with the responsibilities r_k of :meth:`posterior_mean`. z_t: (B, D) (or (B, ...) with D
        features); t, s: scalars or (B,). Returns (weights (B, K), means (B, K, D), variances (B,)),
        float64. Its mean is a z_t + b x*(z_t), the mean DDPM's reverse step uses.
        """
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(len(z_t)).cpu()
        s = torch.as_tensor(s, dtype=torch.float64).reshape(-1).expand(len(z_t)).cpu()
        if not bool((s < t).all()) or not bool((s >= 0).all()):
            raise ValueError("reverse_step needs 0 <= s < t (z_s is the less noisy point).")
        flat, alpha_t, sigma_t, v, diff, log_r = self._responsibilities(z_t, t)  # as posterior_mean
        r = log_r.exp()  # (B, K)
        coefs = posterior_coefficients(self.schedule, t=t, s=s)  # q(z_s | z_t, x) = N(a z_t + b x, var I)
        a, b, var = (c.to(flat.device)[:, None] for c in coefs)                                # (B, 1)
        m = self.centers[None] + (alpha_t * self.std**2 / v)[:, :, None] * diff                # E[x | z_t, k]
        tau2 = self.std**2 * sigma_t**2 / v
        means = a[:, :, None] * flat[:, None, :] + b[:, :, None] * m
        return r, means, (var + b**2 * tau2)[:, 0]


class GaussianMixtureClassifier(torch.nn.Module):
    """The exact noise-conditional classifier of a class-labelled Gaussian mixture: ``classifier(z, t)``
    returns the logits log p(y | z_t) (B, C) (``GaussianMixtureDenoiser.class_log_posterior``), in z's
    dtype. It is what a classifier trained on noised data (``guidance.train_noisy_classifier``) tends to,
    so classifier guidance can be checked against it (Dhariwal & Nichol 2021, Sec. 4; Chapter 6 §2)."""

    trained_on_noise = True  # exact at every t, as guidance needs

    def __init__(self, denoiser: GaussianMixtureDenoiser):
        super().__init__()
        if not isinstance(denoiser, GaussianMixtureDenoiser) or denoiser.classes is None:
            raise ValueError("GaussianMixtureClassifier needs a GaussianMixtureDenoiser built with classes=.")
        self.denoiser = denoiser
        self.num_classes = denoiser.num_classes

    def forward(self, z: torch.Tensor, t) -> torch.Tensor:
        return self.denoiser.class_log_posterior(z, t).to(z.dtype)


class EmpiricalDenoiser(torch.nn.Module):
    """The optimal denoiser x* of a finite data set, usable as a model(z, t) (Luhman & Luhman 2022, eq. (4)
    and Appendix A; Chapter 7 §1). For the empirical distribution q(x) = (1/N) sum_n delta(x - x_n),

        x*(z_t, t) = E_q(x)[x q(z_t | x) / q(z_t)] = sum_n w_n(z_t) x_n,
        w_n ∝ exp(-|z_t - alpha_t x_n|^2 / (2 sigma_t^2)),

    the posterior-weighted average of the data that minimises the x-MSE at every z_t. Computed in float64
    in chunks of ``batch_size`` data points (a running log-sum-exp), so N may exceed memory for one
    (B, N) matrix; :meth:`posterior_weights` gives the whole (B, N) matrix for small N. At sigma_t = 0 the
    weights pick the nearest data point (the limit). Returns the `prediction` in z's dtype.
    """

    def __init__(self, data: torch.Tensor, schedule: NoiseSchedule, prediction: str = "x",
                 batch_size: int = 1024):
        super().__init__()
        data = torch.as_tensor(data)
        if data.ndim < 2 or len(data) == 0:
            raise ValueError(f"data must be a non-empty batch (N, ...); got shape {tuple(data.shape)}.")
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}.")
        self.register_buffer("data", data.to(torch.float64))
        self.schedule, self.prediction, self.batch_size = schedule, prediction, batch_size

    def _flat(self, z: torch.Tensor) -> torch.Tensor:
        if tuple(z.shape[1:]) != tuple(self.data.shape[1:]):
            raise ValueError(f"z has example shape {tuple(z.shape[1:])}, the data "
                             f"{tuple(self.data.shape[1:])}.")
        return z.reshape(len(z), -1).to(torch.float64)

    def _coefficients(self, z: torch.Tensor, t):
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(len(z)).cpu()
        alpha, sigma = self.schedule.alpha_sigma(t)
        return alpha.to(z.device)[:, None], sigma.to(z.device).clamp(min=1e-12)[:, None]

    def posterior_weights(self, z: torch.Tensor, t) -> torch.Tensor:
        """w_n(z_t) = q(x_n | z_t), shape (B, N), rows summing to 1 (all data at once: B x N floats)."""
        flat, data = self._flat(z), self.data.reshape(len(self.data), -1).to(z.device)
        alpha, sigma = self._coefficients(z, t)
        return torch.softmax(self._logits(flat, data, alpha, sigma), dim=1)

    @staticmethod
    def _logits(flat: torch.Tensor, data: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
                ) -> torch.Tensor:
        """log w_n up to a constant, -|z - alpha x_n|^2 / (2 sigma^2), (B, N), with
        |z - alpha x_n|^2 = |z|^2 - 2 alpha z.x_n + alpha^2 |x_n|^2 (no (B, N, D) tensor)."""
        sq = (flat**2).sum(1, keepdim=True) - 2 * alpha * flat @ data.T + alpha**2 * (data**2).sum(1)[None]
        return -sq.clamp(min=0) / (2 * sigma**2)

    def posterior_mean(self, z: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(x*, eps*) at z (B, ...) and t (scalar or (B,)), float64, in chunks over the data."""
        flat = self._flat(z)
        alpha, sigma = self._coefficients(z, t)
        data = self.data.reshape(len(self.data), -1).to(z.device)
        top = torch.full((len(flat), 1), -torch.inf, dtype=torch.float64, device=z.device)
        total = torch.zeros((len(flat), 1), dtype=torch.float64, device=z.device)
        acc = torch.zeros_like(flat)
        for chunk in torch.split(data, self.batch_size):
            logits = self._logits(flat, chunk, alpha, sigma)
            new_top = torch.maximum(top, logits.max(dim=1, keepdim=True).values)
            scale, weights = torch.exp(top - new_top), torch.exp(logits - new_top)
            total = total * scale + weights.sum(1, keepdim=True)
            acc = acc * scale + weights @ chunk
            top = new_top
        x_star = acc / total
        eps_star = (flat - alpha * x_star) / sigma
        return x_star.reshape(z.shape), eps_star.reshape(z.shape)

    def forward(self, z: torch.Tensor, t, **cond) -> torch.Tensor:
        """The model contract ``model(z, t, **cond)`` (cond ignored): x*, eps* or v* (Chapter 1 §4)."""
        x, eps = self.posterior_mean(z, t)
        alpha, sigma = self._coefficients(z, t)
        shape = (len(z),) + (1,) * (z.ndim - 1)
        return prediction_from(x, eps, self.prediction, alpha=alpha.reshape(shape),
                               sigma=sigma.reshape(shape)).to(z.dtype)


def gaussian_flow_map(schedule: NoiseSchedule, z: torch.Tensor, t_from, t_to, mean: torch.Tensor,
                      std: float) -> torch.Tensor:
    """The exact probability-flow ODE map for data N(mean, std^2 I) (Salimans & Ho 2022, eq. (6)).

    The marginal at t is N(alpha_t mean, v_t I), v_t = alpha_t^2 std^2 + sigma_t^2, and the flow keeps
    the standardised coordinate xi = (z_t - alpha_t mean) / sqrt(v_t) fixed, so
    z_{t_to} = alpha_{t_to} mean + sqrt(v_{t_to}) xi (at t_to = 0 on a VP schedule: mean + std xi).
    """
    f64 = torch.float64
    mean = torch.as_tensor(mean, dtype=f64)
    a1, s1 = schedule.alpha_sigma(torch.tensor(float(t_from), dtype=f64))
    a0, s0 = schedule.alpha_sigma(torch.tensor(float(t_to), dtype=f64))
    xi = (z.to(f64) - a1 * mean) / torch.sqrt(a1**2 * std**2 + s1**2)
    return (a0 * mean + torch.sqrt(a0**2 * std**2 + s0**2) * xi).to(z.dtype)


def mixture_log_prob(x: torch.Tensor, weights: torch.Tensor, means: torch.Tensor,
                     var: torch.Tensor) -> torch.Tensor:
    """log sum_k w_k N(x; mu_k, var I) for isotropic mixtures as returned by ``reverse_step``.

    x: (N, B, D) points (N per mixture) or (B, D); weights (B, K), means (B, K, D), var (B,).
    Returns (N, B) (or (B,)), float64.
    """
    x = torch.as_tensor(x, dtype=torch.float64)
    squeeze = x.ndim == 2
    x = x[None] if squeeze else x
    d = means.shape[-1]
    sq = ((x[:, :, None, :] - means[None]) ** 2).sum(-1)                                   # (N, B, K)
    log_norm = -0.5 * d * torch.log(2 * torch.pi * var)[None, :, None]
    out = torch.logsumexp(weights.log()[None] + log_norm - sq / (2 * var[None, :, None]), dim=-1)
    return out[0] if squeeze else out


def moment_match(weights: torch.Tensor, means: torch.Tensor,
                 var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The best Gaussian fit N(mu, Sigma) of a mixture sum_k w_k N(mu_k, var I): same mean and covariance,
    mu = sum_k w_k mu_k, Sigma = var I + sum_k w_k (mu_k - mu)(mu_k - mu)^T. Among all Gaussians it
    minimises KL(mixture || Gaussian), the divergence that maximum-likelihood training of a Gaussian
    reverse step minimises. Shapes as in ``mixture_log_prob``; returns mu (B, D), Sigma (B, D, D)."""
    mu = (weights[:, :, None] * means).sum(1)
    dev = means - mu[:, None, :]
    cov = torch.einsum("bk,bki,bkj->bij", weights, dev, dev)
    return mu, cov + var[:, None, None] * torch.eye(means.shape[-1], dtype=means.dtype)


class ExactMixtureStep:
    """A step rule that samples the exact denoising distribution q(z_s | z_t) of Gaussian-mixture data
    (:meth:`GaussianMixtureDenoiser.reverse_step`; Chapter 4 §1): what a perfect DDGAN generator produces
    (exercise 3). With ``moment_matched=True`` it samples the mixture's best Gaussian fit N(mu, Sigma)
    instead (:func:`moment_match`): the best that any Gaussian reverse step, so any DDPM on the same grid, can
    do (exercise 2). It ignores the model's x-hat and asks `denoiser` directly; run it with that denoiser as
    the model, so the loop's NFE stays one call per step. Draws from `generator` (CPU), float64 inside."""

    def __init__(self, denoiser: GaussianMixtureDenoiser, moment_matched: bool = False):
        if not isinstance(denoiser, GaussianMixtureDenoiser):
            raise ValueError("ExactMixtureStep needs the data's GaussianMixtureDenoiser (its exact "
                             "q(z_s | z_t)); build one with "
                             "analytic.GaussianMixtureDenoiser(centers, std, schedule).")
        self.denoiser, self.moment_matched = denoiser, moment_matched

    def __call__(self, z_t, t, s, x_hat, eps_hat, schedule, generator=None):
        weights, means, var = self.denoiser.reverse_step(z_t.reshape(len(z_t), -1), t, s)
        B, K, D = means.shape
        xi = torch.randn(B, D, generator=generator, dtype=torch.float64)
        if self.moment_matched:
            mu, cov = moment_match(weights, means, var)
            z_s = mu + torch.einsum("bij,bj->bi", torch.linalg.cholesky(cov), xi)
        else:
            k = torch.multinomial(weights, 1, generator=generator).flatten()
            z_s = means[torch.arange(B), k] + var.sqrt()[:, None] * xi
        return z_s.reshape(z_t.shape).to(dtype=z_t.dtype, device=z_t.device)
