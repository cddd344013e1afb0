"""The reconstruction loss: how far the sparse network's outputs are from the dense teacher's.

Classification logits: KL(softmax(z_dense / T) || softmax(z_sparse / T)) * T^2 (T = 4 in the
reference). Any other float output: squared error normalised by the teacher's energy.
Several outputs: the sum. Integer/bool outputs carry no gradient and are left out.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from .options import LOSS_KINDS  # noqa: F401  (re-exported)


def is_logits(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.dim() == 2 and t.shape[1] >= 2


def output_loss_kinds(teacher: Mapping[str, torch.Tensor], kind: str = "auto") -> dict[str, str]:
    """The loss used for each float output: "kl" for logits-like ones under "auto"."""
    kinds = {}
    for name, t in teacher.items():
        if not t.is_floating_point():
            continue
        kinds[name] = ("kl" if is_logits(t) else "nmse") if kind == "auto" else kind
    return kinds


def distillation_loss(student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor],
                      kinds: Mapping[str, str], temperature: float) -> torch.Tensor:
    total = None
    for name, kind in kinds.items():
        s, t = student[name], teacher[name]
        if kind == "kl":
            s2, t2 = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
            loss = F.kl_div(F.log_softmax(s2 / temperature, dim=-1), F.log_softmax(t2 / temperature, dim=-1),
                            reduction="batchmean", log_target=True) * temperature**2
        else:
            loss = (s - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-12)
        total = loss if total is None else total + loss
    return total
