"""Welch's t-test, with the Student-t tail from the regularized incomplete beta function.

Written out (about 40 lines) rather than taken from scipy, which the project does not otherwise
need. The tests check it against closed forms (df = 1, 2), published t-table values and, where
scipy is installed, scipy.stats.
"""
from __future__ import annotations

import math
from typing import Sequence


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """1 + d1/(1 + d2/(1 + ...)) of DLMF 8.17.22, by the modified Lentz method."""
    tiny, f, c, d = 1e-300, 1.0, 1.0, 0.0
    for n in range(1, 1000):
        m = n // 2
        if n % 2:  # d_{2m+1}
            coef = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:  # d_{2m}
            coef = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + coef * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + coef / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            return f
    raise ArithmeticError(f"incomplete beta did not converge for a={a}, b={b}, x={x}")


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0):
        raise ValueError(f"betainc needs a, b > 0 and 0 <= x <= 1, got a={a}, b={b}, x={x}")
    if x in (0.0, 1.0):
        return x
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below this point
        return 1.0 - betainc(b, a, 1.0 - x)
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    return math.exp(log_front) / (a * _beta_continued_fraction(a, b, x))


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` (not necessarily integer) degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if math.isinf(t):
        return 0.0
    return betainc(df / 2, 0.5, df / (df + t * t))


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Welch's unequal-variance t-test of mean(a) = mean(b): (t, Welch–Satterthwaite df, two-sided p).

    Raises ValueError when a sample has fewer than 2 values or both have zero variance: the
    test is then undefined, and no number should stand in for it."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"needs at least 2 values per sample, got {len(a)} and {len(b)}")
    (ma, va), (mb, vb) = (_mean_var(s) for s in (a, b))
    sa, sb = va / len(a), vb / len(b)
    if sa + sb == 0:
        raise ValueError("both samples have zero variance")
    t = (ma - mb) / math.sqrt(sa + sb)
    df = (sa + sb) ** 2 / (sa**2 / (len(a) - 1) + sb**2 / (len(b) - 1))
    return t, df, t_two_sided_p(t, df)


def _mean_var(values: Sequence[float]) -> tuple[float, float]:
    mean = math.fsum(values) / len(values)
    return mean, math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)
