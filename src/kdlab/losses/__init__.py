"""Distillation losses as pure functions (student logits first, batch mean unless stated otherwise).

Each function is named after the equation it implements and its docstring cites the paper in
``/work/shared/papers`` (or the released code) it follows; see the module docstrings for where paper and release
differ and which switch selects which.
"""

from kdlab.losses.ctkd import ctkd_lambda, ctkd_temperature, gradient_reversal
from kdlab.losses.dkd import dkd, nckd, tckd
from kdlab.losses.logit import cross_entropy, kd, kd_inf, lm, lm_offset, mse
from kdlab.losses.mlkd import mlkd_batch, mlkd_class, mlkd_instance, mlkd_masks, mlkd_terms
from kdlab.losses.stage import ab, at, ft, hcl, nst, ofd, ofd_margin, sp
from kdlab.losses.standardize import Standardize, center, logit_std, scale, standardize, zscore
from kdlab.losses.catkd import catkd, class_activation_maps
from kdlab.losses.feature import fitnet, ijckd, simkd, srrl
from kdlab.losses.relational import crd_nce, pkt, rkd
from kdlab.losses.vid import vid, vid_variance
from kdlab.losses.wsld import wsld

__all__ = [
    "ab",
    "at",
    "ft",
    "hcl",
    "nst",
    "ofd",
    "ofd_margin",
    "sp",
    "catkd",
    "class_activation_maps",
    "crd_nce",
    "fitnet",
    "ijckd",
    "pkt",
    "rkd",
    "simkd",
    "srrl",
    "vid",
    "vid_variance",
    "wsld",
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
