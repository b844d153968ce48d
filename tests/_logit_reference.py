"""Naive reference formulations of DKD and MLKD for the tests, written for kdlab.

They compute in probability space, in the same order of operations as the authors' released implementations
(softmax → mask → log, summed KL, scalar × mask), so that kdlab's log-space versions are checked against the
arithmetic that produced the published numbers. Not used by the library.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def release_normalize(logit: torch.Tensor) -> torch.Tensor:
    mean = logit.mean(dim=-1, keepdims=True)
    stdv = logit.std(dim=-1, keepdims=True)
    return (logit - mean) / (1e-7 + stdv)


def release_dkd(ls, lt, target, alpha, beta, temperature, logit_stand=False):
    ls = release_normalize(ls) if logit_stand else ls
    lt = release_normalize(lt) if logit_stand else lt
    gt_mask = torch.zeros_like(ls).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(ls).scatter_(1, target.unsqueeze(1), 0).bool()

    def cat_mask(t):
        return torch.cat([(t * gt_mask).sum(1, keepdims=True), (t * other_mask).sum(1, keepdims=True)], dim=1)

    ps = cat_mask(F.softmax(ls / temperature, dim=1))
    pt = cat_mask(F.softmax(lt / temperature, dim=1))
    tckd = F.kl_div(torch.log(ps), pt, reduction="sum") * temperature**2 / target.shape[0]
    pt2 = F.softmax(lt / temperature - 1000.0 * gt_mask, dim=1)
    lps2 = F.log_softmax(ls / temperature - 1000.0 * gt_mask, dim=1)
    nckd = F.kl_div(lps2, pt2, reduction="sum") * temperature**2 / target.shape[0]
    return alpha * tckd + beta * nckd


def release_kd_loss(ls, lt, temperature, reduce=True, logit_stand=False):
    ls = release_normalize(ls) if logit_stand else ls
    lt = release_normalize(lt) if logit_stand else lt
    loss = F.kl_div(F.log_softmax(ls / temperature, dim=1), F.softmax(lt / temperature, dim=1), reduction="none").sum(1)
    return (loss.mean() if reduce else loss) * temperature**2


def release_cc_loss(ls, lt, temperature, reduce=True):
    _, k = lt.shape
    ps, pt = F.softmax(ls / temperature, dim=1), F.softmax(lt / temperature, dim=1)
    d = (torch.mm(pt.transpose(1, 0), pt) - torch.mm(ps.transpose(1, 0), ps)) ** 2
    return d.sum() / k if reduce else d / k


def release_bc_loss(ls, lt, temperature, reduce=True):
    b, _ = lt.shape
    ps, pt = F.softmax(ls / temperature, dim=1), F.softmax(lt / temperature, dim=1)
    d = (torch.mm(pt, pt.transpose(1, 0)) - torch.mm(ps, ps.transpose(1, 0))) ** 2
    return d.sum() / b if reduce else d / b


def release_mlkd(sw, ss, tw, ts, target, T=4.0, ce_w=0.1, kd_w=0.9, logit_stand=False, reduce=True):
    """``MLKD.forward_train`` of the release after the forward passes (``reduce=False`` = its commented-out path)."""
    pw = F.softmax(tw.detach(), dim=1)
    conf, _ = pw.max(dim=1)
    mask = conf.le(float(np.percentile(conf.cpu().numpy().flatten(), 50))).bool()
    cconf = torch.sum(pw, dim=0)
    cmask = cconf.le(float(np.percentile(cconf.cpu().numpy().flatten(), 50))).bool()
    temps = [T, 3.0, 5.0, 2.0, 6.0]
    ce = ce_w * (F.cross_entropy(sw, target) + F.cross_entropy(ss, target))
    kd_weak = sum(kd_w * (release_kd_loss(sw, tw, t, reduce, logit_stand) * mask).mean() for t in temps)
    kd_strong = sum(kd_w * release_kd_loss(ss, ts, t, logit_stand=logit_stand) for t in temps[:3]) + sum(
        kd_w * release_kd_loss(sw, tw, t, logit_stand=logit_stand) for t in temps[3:]
    )
    cc = sum(kd_w * (release_cc_loss(sw, tw, t, reduce) * cmask).mean() for t in temps)
    bc = sum(kd_w * (release_bc_loss(sw, tw, t, reduce) * mask).mean() for t in temps)
    return {"ce": ce, "kd": kd_weak + kd_strong, "cc": cc, "bc": bc}
