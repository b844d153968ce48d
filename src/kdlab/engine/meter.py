"""Per-step bookkeeping of a training epoch in one preallocated device tensor.

Every step adds the batch-weighted loss terms, the total loss, the number of correct top-1 predictions and a
"steps before the first non-finite loss" counter into one buffer, with a constant number of kernels whatever the number
of loss terms and no fresh per-term device scalars. The host reads the buffer only when asked (every N steps for a
progress display, once at the end of the epoch), so a GPU never waits on a per-step synchronisation.
"""

from __future__ import annotations

import torch


class StepMeter:
    """Running sums of one epoch. Layout of :attr:`buf`: ``[term_0 … term_{K-1}, loss, correct, finite_steps]``.

    ``finite_steps`` counts the steps whose running loss sum is still finite: once a loss is NaN/inf the sum stays
    non-finite, so the counter stops at the index of the first bad step.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.keys: tuple[str, ...] = ()
        self.sums: dict[str, torch.Tensor] = {}
        self.seen = 0  # images so far (a host integer: no device work)
        self.steps = 0
        self._allocate(())

    def reset(self) -> None:
        self.buf.zero_()
        self.seen = self.steps = 0

    def _allocate(self, keys: tuple[str, ...]) -> None:
        """(Re)allocate for ``keys``; sums already accumulated under the old layout are carried over by name."""
        old, old_keys = getattr(self, "buf", None), self.keys
        self.keys = keys
        self.buf = torch.zeros(len(keys) + 3, device=self.device)
        if self.steps and old is not None:
            names = (*keys, "loss")
            for i, key in enumerate((*old_keys, "loss")):
                self.buf[names.index(key)] = old[i]
            self.buf[-2:] = old[-2:]
        self._stage = torch.zeros(len(keys) + 1, device=self.device)
        # views into the buffer, made once: the running sums for a progress display (kdlab.engine.progress)
        self.sums = {key: self.buf[i] for i, key in enumerate((*keys, "loss"))}

    @torch.no_grad()
    def update(
        self, terms: dict[str, torch.Tensor], loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor
    ) -> None:
        """Add one step (batch size ``len(target)``); all tensor work is in place on preallocated memory."""
        keys, bs = tuple(terms), len(target)
        if keys != self.keys:  # first step, or a method whose terms vary (rare): the union of the names
            self._allocate(keys if not self.steps else (*self.keys, *(n for n in keys if n not in self.keys)))
        k = len(self.keys)
        if keys == self.keys:
            torch.stack([*terms.values(), loss], out=self._stage)  # one kernel for all terms
            self.buf[: k + 1].add_(self._stage, alpha=bs)
        else:  # a step with a subset of the epoch's terms
            for name, v in (*terms.items(), ("loss", loss)):
                self.sums[name].add_(v.detach(), alpha=bs)
        self.buf[k + 1].add_((logits.argmax(1) == target).sum())
        self.buf[k + 2].add_(torch.isfinite(self.buf[k]))
        self.seen += bs
        self.steps += 1

    def first_bad_step(self) -> int:
        """Index of the first step with a non-finite loss, or −1 (reads one device scalar)."""
        if not self.steps:
            return -1
        k = len(self.keys)
        counts = self.buf[k : k + 3 : 2].tolist()  # [loss sum, finite steps]
        return -1 if counts[0] == counts[0] and abs(counts[0]) != float("inf") else int(counts[1])

    def packed(self) -> torch.Tensor:
        """``[term sums…, loss sum, correct, seen]`` as one device tensor (for an all-reduce across processes)."""
        out = self.buf.clone()
        out[-1] = float(self.seen)
        return out

    def means(self, packed: torch.Tensor | None = None) -> dict[str, float]:
        """``train_<term>``, ``train_loss`` (means per image) and ``train_acc`` (%) from ``packed`` (default: this
        process's sums). One device→host copy: call it every N steps for a display, never every step on a GPU."""
        vals = (self.packed() if packed is None else packed).tolist()
        seen = max(vals[-1], 1.0)
        out = {f"train_{key}": v / seen for key, v in zip((*self.keys, "loss"), vals)}
        out["train_acc"] = 100.0 * vals[len(self.keys) + 1] / seen
        return out
