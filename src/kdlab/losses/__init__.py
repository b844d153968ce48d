"""Distillation losses as pure functions (student logits first, batch mean unless stated otherwise).

Each function is named after the equation it implements and its docstring cites the paper in
``/work/shared/papers`` (or the released code) it follows; see the module docstrings for where paper and release
differ and which switch selects which.
"""

from kdlab.losses.ctkd import ctkd_lambda, ctkd_temperature, gradient_reversal
from kdlab.losses.dkd import dkd, nckd, tckd
from kdlab.losses.logit import cross_entropy, kd, kd_inf, lm, lm_offset, mse
from kdlab.losses.mlkd import mlkd_batch, mlkd_class, mlkd_instance, mlkd_masks, mlkd_terms
from kdlab.losses.standardize import Standardize, center, logit_std, scale, standardize, zscore

__all__ = [
    "Standardize",
    "center",
    "cross_entropy",
    "ctkd_lambda",
    "ctkd_temperature",
    "dkd",
    "gradient_reversal",
    "kd",
    "kd_inf",
    "lm",
    "lm_offset",
    "logit_std",
    "mlkd_batch",
    "mlkd_class",
    "mlkd_instance",
    "mlkd_masks",
    "mlkd_terms",
    "mse",
    "nckd",
    "scale",
    "standardize",
    "tckd",
    "zscore",
]
