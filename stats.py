"""Statistics whose unit is the training seed, and layer-count-free measures of a gradient profile.

A trained model is one draw from the training process: two seeds of the same arm differ by several
points of accuracy (about 4.8 on the organism), far more than the test-set noise of one model. So an
arm is compared with uniform seed by seed (each seed's arm against the same seed's uniform run, which
shares its data order and sampling stream), and the sample is the list of per-seed differences:
  paired interval     mean difference ± t(0.975, n-1) · sd / √n (Student's t, two-sided 95%)
  sign-flip p         exact permutation test of "the differences are symmetric about 0": the share of
                      the 2^n sign assignments whose |mean| is at least the observed one (two-sided). Its
                      smallest possible value is 2 / 2^n: with 3 seeds it is 0.25, so 3 seeds can never
                      reach p < 0.05 on this test, whatever the effect
  detectable diff.    the smallest true mean difference a two-sided 5% paired t-test finds with 80% power
                      at the measured sd: (t(0.975, n-1) + t(0.80, n-1)) · sd / √n (the usual
                      approximation of the noncentral t). A null result says "no difference as large as
                      this", nothing about smaller ones
McNemar's test on the problems (report.py) measures the test-set noise of one pair of trained models;
it ignores the seed-to-seed noise, so no verdict here rests on it.

Flatness without the layer count: the study's max/min ratio and top-30% share depend on how many
layers there are (with 8 layers, "top 30%" is 2.4 layers). These do not:
  effective layers / L   (1 / Σ p_i²) / L over the layer shares p (the participation ratio): 1 when
                         every layer carries the same share, 1/L when one layer carries everything
  Gini                   mean absolute difference of the shares / (2 · their mean): 0 when flat,
                         (L-1)/L when one layer carries everything

Left out: corrections for multiple comparisons, and unpaired tests (every arm here has its seed's
uniform run to pair with). No SciPy: the t quantile is computed from the density (t_ppf).
"""

from __future__ import annotations

import itertools
import math

import numpy as np


def t_cdf(x: float, df: int) -> float:
    """Student's t CDF, by Simpson's rule on the density from 0 to |x| (accurate to ~1e-10 here)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    n = 4000  # even; the density is smooth, so Simpson's error is far below what a report prints
    t = np.linspace(0.0, abs(x), n + 1)
    f = c * (1 + t * t / df) ** (-(df + 1) / 2)
    area = abs(x) / n / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
    return 0.5 + math.copysign(area, x)


def t_ppf(q: float, df: int) -> float:
    """The q-quantile of Student's t with df degrees of freedom (bisection on t_cdf)."""
    if not 0 < q < 1 or df < 1:
        raise ValueError(f"t_ppf: need 0 < q < 1 and df >= 1, got q={q}, df={df}")
    lo, hi = -1e3, 1e3
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2


def sign_flip_p(diffs) -> float:
    """Exact two-sided sign-flip permutation p of mean(diffs) = 0 (all 2^n sign assignments)."""
    d = np.asarray(diffs, float)
    if len(d) > 20:
        raise ValueError(f"sign_flip_p: {len(d)} differences; the exact test enumerates 2^n, use n <= 20")
    observed = abs(d.mean())
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
    means = np.abs(signs @ d) / len(d)
    return float((means >= observed - 1e-12 * max(1.0, observed)).mean())


def detectable_difference(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true mean paired difference found with this power by a two-sided paired t-test."""
    if n < 2:
        return float("nan")
    return (t_ppf(1 - alpha / 2, n - 1) + t_ppf(power, n - 1)) * sd / math.sqrt(n)


def paired(diffs) -> dict:
    """The seed-level summary of per-seed differences: n, mean, sd, t 95% interval, sign-flip p, and
    the difference detectable at 80% power (NaN where one seed cannot give them)."""
    d = np.asarray(diffs, float)
    n = len(d)
    if n == 0:
        raise ValueError("paired: no differences (no seed has both runs)")
    mean = float(d.mean())
    if n < 2:
        nan = float("nan")
        return {"n": 1, "mean": mean, "sd": nan, "ci95": (nan, nan), "p_sign_flip": nan, "detectable": nan}
    sd = float(d.std(ddof=1))
    half = t_ppf(0.975, n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "ci95": (mean - half, mean + half), "p_sign_flip": sign_flip_p(d),
            "detectable": detectable_difference(sd, n)}


def mean_interval(xs) -> tuple[float, float, float]:
    """(mean, low, high): the t 95% interval of a mean over seeds (low = high = mean with one seed)."""
    x = np.asarray(xs, float)
    if len(x) < 2:
        return float(x.mean()), float(x.mean()), float(x.mean())
    half = t_ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean()), float(x.mean() - half), float(x.mean() + half)


def effective_layers(shares) -> float:
    """(1 / Σ p²) / L of the layer shares: 1 when flat, 1/L when one layer carries everything."""
    p = np.asarray(shares, float)
    p = p / p.sum()
    return float(1.0 / (p * p).sum() / len(p))


def gini(shares) -> float:
    """Gini coefficient of the layer shares: 0 when flat, (L-1)/L when one layer carries everything."""
    x = np.asarray(shares, float)
    return float(np.abs(x[:, None] - x[None, :]).mean() / (2 * x.mean()))
