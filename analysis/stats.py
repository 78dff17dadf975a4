"""Mean and 95 % confidence interval over seeds: mean ± t(0.975, n−1) · s / √n, Student's t with n−1
degrees of freedom (seeds are few, so the normal 1.96 would understate the interval: t = 12.71 at n = 2,
4.30 at n = 3). Used by every table and figure, so they agree.

The t quantile is computed here, exactly for integer degrees of freedom (Abramowitz & Stegun 26.7.3/4, the
closed form of P(|T| < t), inverted by bisection): scipy is not a dependency of the project.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

CONFIDENCE = 0.95
CI_TEXT = "95 % CI (Student's t, n−1 d.o.f.)"


def _central_probability(t: float, dof: int) -> float:
    """P(|T| < t) for Student's t with `dof` (integer ≥ 1) degrees of freedom."""
    theta = math.atan(t / math.sqrt(dof))
    cos2 = math.cos(theta) ** 2
    if dof % 2:  # odd: 2/π [θ + sin θ cos θ (1 + 2/3 cos²θ + 2·4/(3·5) cos⁴θ + ...)]
        term, total = 1.0, 1.0 if dof > 1 else 0.0
        for k in range(1, (dof - 1) // 2):
            term *= cos2 * (2 * k) / (2 * k + 1)
            total += term
        return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)
    term = total = 1.0  # even: sin θ (1 + 1/2 cos²θ + 1·3/(2·4) cos⁴θ + ...)
    for k in range(1, dof // 2):
        term *= cos2 * (2 * k - 1) / (2 * k)
        total += term
    return math.sin(theta) * total


def t_quantile(dof: int, confidence: float = CONFIDENCE) -> float:
    """The two-sided `confidence` quantile of Student's t: P(|T| < t) = confidence."""
    low, high = 0.0, 1.0
    while _central_probability(high, dof) < confidence:
        high *= 2
    for _ in range(100):  # bisection to machine precision
        mid = (low + high) / 2
        low, high = (mid, high) if _central_probability(mid, dof) < confidence else (low, mid)
    return (low + high) / 2


def mean_ci(values: Iterable[float]) -> tuple[float, float, int]:
    """(mean, half-width of the 95 % CI, n) of the finite values; the half-width is NaN for n < 2 and the
    mean NaN for n = 0."""
    finite = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype="float64")
    n = len(finite)
    if n == 0:
        return math.nan, math.nan, 0
    if n == 1:
        return float(finite[0]), math.nan, 1
    return float(finite.mean()), t_quantile(n - 1) * float(finite.std(ddof=1)) / math.sqrt(n), n
