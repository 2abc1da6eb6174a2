"""Prediction intervals from backtest residuals (split-conformal quantiles).

A model's own Gaussian intervals assume its errors are normal and its parameters right;
on bursty request rates they are not. Instead, the upper bound of a forecast is the point
forecast plus the empirical ``q`` quantile of the same model's out-of-sample one-step
residuals (log scale) from the rolling backtest, with the finite-sample correction of split
conformal prediction: the ``ceil((n + 1) q)``-th smallest of ``n`` residuals.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np


def conformal_quantile(residuals: Sequence[float], q: float) -> float | None:
    """The ``q`` split-conformal quantile of residuals, or None when too few for that level.

    For ``q >= 0.5`` this is the ``ceil((n + 1) q)``-th smallest residual; for ``q < 0.5``
    the mirror image (the ``floor((n + 1) q)``-th smallest). None when that rank falls
    outside ``1..n``.
    """
    values = np.sort(np.asarray([r for r in residuals if math.isfinite(r)], dtype=float))
    n = len(values)
    if n == 0:
        return None
    rank = math.ceil((n + 1) * q) if q >= 0.5 else math.floor((n + 1) * q)
    if not 1 <= rank <= n:
        return None
    return float(values[rank - 1])


def gaussian_quantile(sd: float, q: float) -> float | None:
    """``sd`` times the standard normal ``q`` quantile, or None when ``sd`` is unknown."""
    if not math.isfinite(sd) or sd < 0:
        return None
    return float(sd * NormalDist().inv_cdf(q))
