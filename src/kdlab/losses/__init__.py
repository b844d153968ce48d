"""Distillation losses as pure functions (student logits first, batch mean unless stated otherwise)."""

from kdlab.losses.logit import cross_entropy, kd, mse

__all__ = ["cross_entropy", "kd", "mse"]
