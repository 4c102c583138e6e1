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


# ------------------------------------------------------------------------------------------ the toy yardstick

TOY_CASES = ("fresh", "blur 0.04", "blur 0.08", "uniform smear", "one mode", "20 of 25 modes")
FAILURES = TOY_CASES[1:]


def toy_case(case, seed, n=1000):
    """The issue's reference rows, with common random numbers: one seed gives one fresh set and one noise
    draw, which every case of that seed reuses."""
    centers, std = data.toy_modes("25gaussians")
    g = gen(seed)
    fresh = data.twenty_five_gaussians(n, generator=g)
    noise = torch.randn(n, 2, generator=g)
    if case == "fresh":
        return fresh
    if case.startswith("blur"):
        return fresh + float(case.split()[1]) * noise
    if case == "uniform smear":  # over the data's bounding square
        lo, hi = float(fresh.min()), float(fresh.max())
        return lo + (hi - lo) * torch.rand(n, 2, generator=g)
    if case == "one mode":
        return centers[12] + std * noise
    if case == "20 of 25 modes":
        return centers[torch.randint(20, (n,), generator=g)] + std * noise
    raise AssertionError(case)


@pytest.fixture(scope="module")
def toy_table():
    """{case: {metric: per-seed values}} at 1000 samples over 5 seeds, one fresh reference set per seed."""
    table = {case: {key: [] for key in metrics.TOY_METRICS} for case in TOY_CASES}
    for seed in range(5):
        reference = data.twenty_five_gaussians(1000, generator=gen(10_000 + seed))
        for case in TOY_CASES:
            row = metrics.toy_metrics(toy_case(case, seed), reference)
            for key in metrics.TOY_METRICS:
                table[case][key].append(row[key])
    return table


def _score(table, case, key):
    """Mean over seeds with the sign flipped where lower is better, so that larger is always better."""
    sign = 1.0 if metrics.TOY_METRICS[key] == "higher" else -1.0
    return sign * float(np.mean(table[case][key]))


def _spread(table, key):
    return float(np.std(table["fresh"][key], ddof=1))


def test_toy_yardstick_fresh_data_is_best_on_every_metric(toy_table):
    """No case beats fresh data on any reported metric by more than the fresh-data seed spread."""
    for key in metrics.TOY_METRICS:
        best = _score(toy_table, "fresh", key)
        for case in FAILURES:
            assert _score(toy_table, case, key) <= best + _spread(toy_table, key) + 1e-12, (case, key)


def test_toy_yardstick_each_failure_is_clearly_worse(toy_table):
    """Every failure loses to fresh data by more than 3 fresh-data seed sds on at least one metric."""
    for case in FAILURES:
        loss = {key: _score(toy_table, "fresh", key) - _score(toy_table, case, key)
                for key in metrics.TOY_METRICS}
        worse = [key for key in metrics.TOY_METRICS if loss[key] > 3 * _spread(toy_table, key)]
        assert worse, case
    # and the metric that was built for each failure is among them
    fresh = {key: np.mean(v) for key, v in toy_table["fresh"].items()}
    assert np.mean(toy_table["blur 0.04"]["log_density_gap"]) > fresh["log_density_gap"] + 0.4
    assert np.mean(toy_table["uniform smear"]["high_quality_rate"]) < 0.7
    assert np.mean(toy_table["uniform smear"]["mmd2"]) > fresh["mmd2"] + 0.3
    assert toy_table["one mode"]["modes_covered"] == [1] * 5
    assert np.mean(toy_table["one mode"]["mode_kl"]) == pytest.approx(math.log(25))
    assert toy_table["20 of 25 modes"]["modes_covered"] == [20] * 5
    assert np.mean(toy_table["20 of 25 modes"]["mode_kl"]) == pytest.approx(math.log(25 / 20), abs=0.02)


def test_toy_yardstick_never_rewards_blur(toy_table):
    for blur in ("blur 0.04", "blur 0.08"):
        for key in metrics.TOY_METRICS:
            # modes_covered and mode_kl do not see blur: they may only tie, within the seed spread
            fresh = _score(toy_table, "fresh", key)
            assert _score(toy_table, blur, key) <= fresh + _spread(toy_table, key), key
        for key in ("high_quality_rate", "log_density_gap", "mmd2"):  # these see it, at every seed
            sign = 1 if metrics.TOY_METRICS[key] == "higher" else -1
            diff = sign * (np.array(toy_table["fresh"][key]) - np.array(toy_table[blur][key]))
            assert (diff > 0).all(), (blur, key)
    gap = {blur: np.mean(toy_table[blur]["log_density_gap"]) for blur in ("blur 0.04", "blur 0.08")}
    assert gap["blur 0.08"] > gap["blur 0.04"]


def test_toy_metrics_keys_determinism_and_reference():
    x = data.twenty_five_gaussians(300, generator=gen(1))
    a = metrics.toy_metrics(x, generator=gen(2))
    b = metrics.toy_metrics(x, generator=gen(2))
    assert a == b and set(metrics.TOY_METRICS) <= set(a) and "log_density" in a
    ref = data.twenty_five_gaussians(300, generator=gen(2))
    assert metrics.toy_metrics(x, ref) == a  # reference=None draws len(samples) points with the generator
    ring_samples = data.eight_gaussians(400, generator=gen(3))
    ring = metrics.toy_metrics(ring_samples, name="8gaussians", generator=gen(4))
    assert ring["modes_covered"] == 8 and abs(ring["log_density_gap"]) < 0.2 and abs(ring["mmd2"]) < 0.1


def test_toy_metrics_clip_limits_strays():
    x = data.twenty_five_gaussians(1000, generator=gen(1))
    ref = data.twenty_five_gaussians(1000, generator=gen(2))
    strays = x.clone()
    strays[:10] = 5.0  # 1% of samples far outside the data
    gap = metrics.toy_metrics(x, ref)["log_density_gap"]
    clipped = metrics.toy_metrics(strays, ref)["log_density_gap"] - gap
    raw = metrics.toy_metrics(strays, ref, clip_std=None)["log_density_gap"]
    assert clipped < 0.01 * 18 + 1e-6  # each stray costs at most 6^2 / 2 nats
    assert raw > 50  # unclipped, ten strays at distance 6 cost 7364 nats each


def test_mixture_log_density_and_its_closed_form_mean():
    centers, std = data.toy_modes("25gaussians")
    lp = metrics.mixture_log_density(centers, centers, std)
    assert lp.dtype == torch.float64 and lp.shape == (25,)
    # at a centre the own component dominates: log(1/25) - log(2 pi s^2)
    assert lp.numpy() == pytest.approx(-math.log(25) - math.log(2 * math.pi * std**2), abs=1e-9)
    # direct sum for one point between modes
    p = torch.tensor([[0.1, -0.05]])
    direct = np.log(sum(np.exp(-((p[0] - c) ** 2).sum().item() / (2 * std**2)) for c in centers.double())
                    / (25 * 2 * math.pi * std**2))
    assert metrics.mixture_log_density(p, centers, std).item() == pytest.approx(direct, rel=1e-9)
    # the closed-form E_data[log p] used for log_density_gap agrees with Monte Carlo (sd 1 / sqrt(N))
    x = data.twenty_five_gaussians(40000, generator=gen(5))
    mc = float(metrics.mixture_log_density(x, centers, std).mean())
    assert mc == pytest.approx(metrics._data_log_density(25, std, None), abs=0.02)
    clip_effect = metrics._data_log_density(25, std, 6.0) - metrics._data_log_density(25, std, None)
    assert clip_effect == pytest.approx(math.exp(-18))


def test_mmd2_exact_small_case_and_population_value():
    a = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [2.0, 2.0], [0.5, 0.5]])
    h = 0.7

    def k(x, y):
        return math.exp(-float(((x - y) ** 2).sum()) / (2 * h * h)) / (2 * math.pi * h * h)

    kaa = sum(k(a[i], a[j]) for i in range(2) for j in range(2) if i != j) / 2
    kbb = sum(k(b[i], b[j]) for i in range(3) for j in range(3) if i != j) / 6
    kab = sum(k(x, y) for x in a for y in b) / 6
    assert metrics.mmd2(a, b, h) == pytest.approx(kaa + kbb - 2 * kab, rel=1e-12)
    assert metrics.mmd2(a, b, h, block=1) == pytest.approx(metrics.mmd2(a, b, h), rel=1e-12)
    assert metrics.mmd2(a, b, h) == pytest.approx(metrics.mmd2(b, a, h), rel=1e-12)
    # N(0, s^2 I) against N(0, (s^2 + c^2) I): (1/2pi) [1/(h^2+2s^2) + 1/(h^2+2s^2+2c^2) - 2/(h^2+2s^2+c^2)]
    s, c, h = 1.0, 1.5, 1.0
    x = s * torch.randn(2000, 2, generator=gen(1))
    y = math.sqrt(s**2 + c**2) * torch.randn(2000, 2, generator=gen(2))
    v = h**2 + 2 * s**2
    exact = (1 / v + 1 / (v + 2 * c**2) - 2 / (v + c**2)) / (2 * math.pi)
    assert metrics.mmd2(x, y, h) == pytest.approx(exact, rel=0.15)
    assert abs(metrics.mmd2(x, s * torch.randn(2000, 2, generator=gen(3)), h)) < 0.1 * exact


def test_toy_metric_errors():
    x = data.twenty_five_gaussians(50, generator=gen())
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        metrics.toy_metrics(torch.zeros(10, 3))
    with pytest.raises(ValueError, match="NaN"):
        metrics.toy_metrics(torch.full((10, 2), float("nan")))
    with pytest.raises(ValueError, match="no discrete modes"):
        metrics.toy_metrics(x, name="swiss_roll")
    with pytest.raises(ValueError, match="Unknown toy"):
        metrics.toy_metrics(x, name="spiral")
    with pytest.raises(ValueError, match="clip_std"):
        metrics.toy_metrics(x, x, clip_std=0)
    with pytest.raises(ValueError, match="bandwidth"):
        metrics.mmd2(x, x, 0.0)
    with pytest.raises(ValueError, match="at least 2"):
        metrics.mmd2(x[:1], x, 0.05)
    with pytest.raises(ValueError, match="std"):
        metrics.mixture_log_density(x, x, -1.0)


# ---------------------------------------------------------------------------------------- the image yardstick


def test_knn_precision_recall_exact_case():
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])  # 1-NN radius of every real point: 1
    fake = torch.tensor([[0.5], [10.0]])  # 1-NN radius of both fake points: 9.5
    pr = metrics.knn_precision_recall(real, fake, k=1)
    assert pr == {"precision": 0.5, "recall": 1.0}
    assert metrics.knn_precision_recall(real, real, k=2) == {"precision": 1.0, "recall": 1.0}
    assert metrics.knn_precision_recall(real, fake, k=1, block=1) == pr
    far = metrics.knn_precision_recall(real, torch.tensor([[50.0], [51.0]]), k=1)
    assert far == {"precision": 0.0, "recall": 0.0}


def test_knn_precision_recall_errors():
    x = torch.randn(10, 4, generator=gen())
    with pytest.raises(ValueError, match="same D"):
        metrics.knn_precision_recall(x, torch.zeros(10, 3))
    with pytest.raises(ValueError, match="more than k"):
        metrics.knn_precision_recall(x, x[:3], k=3)
    with pytest.raises(ValueError, match="positive integer"):
        metrics.knn_precision_recall(x, x, k=0)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        metrics.knn_precision_recall(torch.zeros(10), x)


def test_class_kl_exact():
    assert metrics.class_kl(torch.arange(10).repeat(3), 10) == pytest.approx(0.0, abs=1e-12)
    assert metrics.class_kl(torch.full((7,), 4), 10) == pytest.approx(math.log(10))
    assert metrics.class_kl(torch.tensor([0, 1, 0, 1]), 10) == pytest.approx(math.log(5))
    with pytest.raises(ValueError, match="0..9"):
        metrics.class_kl(torch.tensor([0, 10]), 10)
    with pytest.raises(ValueError, match=r"\(N,\)"):
        metrics.class_kl(torch.zeros(2, 2, dtype=torch.long), 10)


def test_frechet_distance_sd():
    a = torch.randn(400, 5, generator=gen(1))
    b = torch.randn(300, 5, generator=gen(2)) + 0.2
    sd = metrics.frechet_distance_sd(a, b, generator=gen(3))
    assert sd == metrics.frechet_distance_sd(a, b, generator=gen(3)) and 0 < sd < 0.5
    assert metrics.frechet_distance_sd(a, b.repeat(10, 1), generator=gen(3)) < sd  # more samples, less noise
    with pytest.raises(ValueError, match="num_bootstrap"):
        metrics.frechet_distance_sd(a, b, num_bootstrap=1)


def test_image_metrics_floors_and_failures(classifier):
    xtr, ytr = data.digits(8, "train")
    real = metrics.image_metrics(classifier, xtr[:500], labels=ytr[:500], generator=gen())
    assert real["n"] == real["floor_n"] == 500
    # the first 500 train images are the floor's stand-in for a perfect sampler
    for key in ("fd", "precision", "recall", "class_kl"):
        assert real[key] == real[key + "_floor"]
    assert real["accuracy"] > 0.9 and real["fd_sd"] > 0
    assert 0.5 < real["precision_floor"] <= 1 and 0.5 < real["recall_floor"] <= 1
    assert real["class_kl_floor"] < 0.05
    noise = torch.rand(500, 1, 8, 8, generator=gen()) * 2 - 1
    bad = metrics.image_metrics(classifier, noise, generator=gen())
    assert bad["fd"] > 10 * bad["fd_floor"] and bad["precision"] < 0.5 * bad["precision_floor"]
    zeros = xtr[ytr == 0][:100].repeat(5, 1, 1, 1)  # collapse onto one class
    collapsed = metrics.image_metrics(classifier, zeros, generator=gen())
    assert collapsed["class_kl"] > 1.5 and collapsed["recall"] < 0.5 * collapsed["recall_floor"]
    big = metrics.image_metrics(classifier, xtr.repeat(2, 1, 1, 1)[:2000], generator=gen())
    assert big["n"] == 2000 and big["floor_n"] == 1500
    with pytest.raises(ValueError, match="must match"):
        metrics.image_metrics(classifier, torch.zeros(10, 1, 16, 16), real_train=xtr, held_out=xtr)
    with pytest.raises(ValueError, match="NaN"):
        metrics.image_metrics(classifier, torch.full((10, 1, 8, 8), float("nan")))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        metrics.image_metrics(classifier, torch.zeros(10, 8, 8))
