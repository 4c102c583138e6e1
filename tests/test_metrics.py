"""Metrics (minidiff.metrics): exact values on constructed cases and the cached digit classifier."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from minidiff import data, metrics


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------ toy metrics


def test_mode_stats_perfect_samples():
    c, std = data.toy_modes("25gaussians")
    x = data.twenty_five_gaussians(5000, generator=gen())
    s = metrics.mode_stats(x, c, std)
    assert s["modes_covered"] == 25
    # within 3 std in 2-D: P(chi2_2 <= 9) = 1 - exp(-4.5) = 0.989
    assert abs(s["high_quality_rate"] - (1 - math.exp(-4.5))) < 0.01
    assert sum(s["counts"]) == round(s["high_quality_rate"] * 5000)
    assert s["min_count"] == 20


def test_mode_stats_collapse_and_strays():
    c, std = data.toy_modes("25gaussians")
    x = c[12] + std * torch.randn(2500, 2, generator=gen())
    s = metrics.mode_stats(x, c, std)
    assert s["modes_covered"] == 1 and s["high_quality_rate"] > 0.98
    # three stray samples on other modes are too few to count as covering them (min_count = 10)
    x[:3] = c[:3]
    assert metrics.mode_stats(x, c, std)["modes_covered"] == 1
    assert metrics.mode_stats(x, c, std, min_count=1)["modes_covered"] == 4
    # samples far from every mode are not high quality
    far = torch.full((100, 2), 5.0)
    assert metrics.mode_stats(far, c, std) == {
        "modes_covered": 0,
        "high_quality_rate": 0.0,
        "counts": [0] * 25,
        "min_count": 1,
    }


def test_mode_stats_errors():
    c, std = data.toy_modes("25gaussians")
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        metrics.mode_stats(torch.zeros(10, 3), c, std)
    with pytest.raises(ValueError, match="std"):
        metrics.mode_stats(torch.zeros(10, 2), c, 0.0)


@pytest.mark.parametrize("p", [1, 2])
def test_wasserstein_self_and_shift(p):
    a = data.twenty_five_gaussians(500, generator=gen())
    assert metrics.wasserstein_2d(a, a, p=p) == pytest.approx(0.0, abs=1e-12)
    d = torch.tensor([0.3, -0.4])  # |d| = 0.5
    assert metrics.wasserstein_2d(a, a + d, p=p) == pytest.approx(0.5, rel=1e-6)


def test_wasserstein_subsamples_and_is_deterministic():
    a = data.twenty_five_gaussians(3000, generator=gen(1))
    b = data.twenty_five_gaussians(2500, generator=gen(2))
    w1 = metrics.wasserstein_2d(a, b, max_points=400, generator=gen(3))
    w2 = metrics.wasserstein_2d(a, b, max_points=400, generator=gen(3))
    assert w1 == w2 and 0 < w1 < 0.2
    far = metrics.wasserstein_2d(a, b + 1.0, max_points=400, generator=gen(3))
    assert far > 1.0  # W2 >= |difference of means| = sqrt(2)
    with pytest.raises(ValueError, match="p must be"):
        metrics.wasserstein_2d(a, b, p=3)


def test_sliced_wasserstein():
    a = data.swiss_roll(2000, generator=gen())
    assert metrics.sliced_wasserstein(a, a, generator=gen()) == pytest.approx(0.0, abs=1e-12)
    d = torch.tensor([0.6, 0.8])
    sw = metrics.sliced_wasserstein(a, a + d, num_projections=512, generator=gen())
    assert sw == pytest.approx(1 / math.sqrt(2), rel=0.05)  # E[(theta . d)^2] = |d|^2 / 2


# ------------------------------------------------------------------------------------------ Frechet distance


def test_frechet_identical_and_shift():
    x = torch.randn(500, 8, generator=gen()) @ torch.randn(8, 8, generator=gen(1))
    assert metrics.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8 * float((x**2).mean()) * 8)
    d = torch.arange(8.0)
    # same covariance, means differ by d: the distance is |d|^2 exactly
    assert metrics.frechet_distance(x, x + d) == pytest.approx(float((d**2).sum()), rel=1e-8)


def test_frechet_matches_sqrtm_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6)) + 1.0
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(sa @ sb).real
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa + sb - 2 * covmean)
    assert metrics.frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)
    # 1-D Gaussians: (mu1 - mu2)^2 + (s1 - s2)^2
    u, v = rng.normal(size=(2000, 1)), 3 * rng.normal(size=(3000, 1)) + 2
    su, sv = u.std(ddof=1), v.std(ddof=1)
    expected = (u.mean() - v.mean()) ** 2 + (su - sv) ** 2
    assert metrics.frechet_distance(u, v) == pytest.approx(expected, rel=1e-8)


def test_frechet_errors():
    with pytest.raises(ValueError, match="same D"):
        metrics.frechet_distance(torch.zeros(5, 3), torch.zeros(5, 4))
    with pytest.raises(ValueError, match="at least 2"):
        metrics.frechet_distance(torch.zeros(1, 3), torch.zeros(5, 3))


# ------------------------------------------------------------------------------------------ classifier


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("minidiff_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINIDIFF_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def classifier(cache):
    return metrics.digit_classifier(8)


def test_classifier_accuracy(classifier):
    x, y = data.digits(8, "test")
    assert metrics.classifier_accuracy(classifier, x, y) > 0.9
    f = metrics.features(classifier, x)
    assert f.shape == (297, classifier.config["feature_dim"])


def test_classifier_cache_reproduces_weights(classifier, cache):
    files = list(cache.glob("classifier-*.safetensors"))
    assert len(files) == 1
    again = metrics.digit_classifier(8)
    assert again.train_seconds == 0.0  # loaded, not trained
    assert same_weights(classifier, again)


def same_weights(m1, m2):
    s1, s2 = m1.state_dict(), m2.state_dict()
    return s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)


def test_training_is_deterministic(tmp_path):
    x, y = data.digits(8, "train")
    a = metrics.train_classifier(x[:300], y[:300], steps=20, cache=False)
    b = metrics.train_classifier(x[:300], y[:300], steps=20, cache=tmp_path)
    c = metrics.train_classifier(x[:300], y[:300], steps=20, seed=1, cache=False)
    assert same_weights(a, b) and not same_weights(a, c)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1


def test_feature_distance_floor(classifier):
    xtr, _ = data.digits(8, "train")
    floor = metrics.feature_distance_floor(classifier)
    noise = torch.rand(297, 1, 8, 8, generator=gen()) * 2 - 1
    assert metrics.feature_distance(classifier, xtr, xtr) == pytest.approx(0.0, abs=1e-6)
    assert 0 < floor < 0.05 * metrics.feature_distance(classifier, xtr, noise)
    assert metrics.feature_distance_floor(classifier, n=100) > 0
    with pytest.raises(ValueError, match="n must be"):
        metrics.feature_distance_floor(classifier, n=1000)


def test_classifier_errors(classifier):
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        classifier(torch.zeros(2, 3, 8, 8))
    x, y = data.digits(8, "test")
    with pytest.raises(ValueError, match="labels"):
        metrics.train_classifier(x, y[:10], steps=5, cache=False)
