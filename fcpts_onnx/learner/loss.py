"""The reconstruction loss: how far the sparse network's outputs are from the dense teacher's.

Classification logits: KL(softmax(z_dense / T) || softmax(z_sparse / T)) * T^2 (T = 4 in the
reference). Outputs that are already distributions (a softmax ends the graph): KL of the
distributions. Any other float output: squared error normalised by the teacher's energy.
Several outputs: the sum. Integer/bool outputs carry no gradient and are left out. The class
axis is the last (2-D logits: axis 1) unless ``class_axis`` names another. "nmse-channel"
(user's choice, never automatic): squared error normalised per channel (axis 1) by the
channel's dense energy, channels averaged.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..errors import OptionError
from .options import LOSS_KINDS  # noqa: F401  (re-exported)


def is_logits(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.dim() == 2 and t.shape[1] >= 2


def is_probabilities(t: torch.Tensor) -> bool:
    """The last axis is a distribution (a softmax ends the graph): compare as distributions."""
    if not t.is_floating_point() or t.dim() < 2 or t.shape[-1] < 2 or t.numel() == 0:
        return False
    if float(t.min()) < 0 or float(t.max()) > 1 + 1e-4:
        return False
    return bool(torch.allclose(t.sum(dim=-1), torch.ones((), dtype=t.dtype, device=t.device), atol=1e-3))


def _classes_last(t: torch.Tensor, class_axis: int | None) -> torch.Tensor:
    """``t`` with its class axis moved last (unchanged when the axis is None or out of range)."""
    if class_axis is None or not -t.dim() <= class_axis < t.dim() or t.dim() < 2:
        return t
    return t.movedim(class_axis, -1)


def output_loss_kinds(teacher: Mapping[str, torch.Tensor], kind: str = "auto",
                      class_axis: int | None = None) -> dict[str, str]:
    """The loss of each float output under "auto": "kl" for logits, "kl_prob" for
    probabilities (softmax outputs), "nmse" otherwise.

    ``class_axis`` (``--class-axis``): the axis that holds class scores, e.g. 1 for a
    segmentation output [N, classes, H, W]. Every float output with that axis is compared as a
    distribution along it, per position on the others (unless ``kind`` is "nmse").
    """
    kinds = {}
    for name, t in teacher.items():
        if not t.is_floating_point():
            continue
        moved = _classes_last(t, class_axis)
        if class_axis is not None and moved is not t and kind not in ("nmse", "nmse-channel"):
            kinds[name] = "kl_prob" if is_probabilities(moved) else "kl"
        elif kind == "nmse-channel":
            kinds[name] = "nmse_channel" if t.dim() >= 2 else "nmse"
        elif kind != "auto":
            kinds[name] = "kl_prob" if kind == "kl" and is_probabilities(t) else kind
        elif is_probabilities(t):
            kinds[name] = "kl_prob"
        else:
            kinds[name] = "kl" if is_logits(t) else "nmse"
    if class_axis is not None and not any(_classes_last(t, class_axis) is not t for t in teacher.values()
                                          if t.is_floating_point()):
        ranks = ", ".join(f"{name}: {t.dim()}-D" for name, t in teacher.items() if t.is_floating_point())
        raise OptionError(f"--class-axis {class_axis}: no float output has that axis ({ranks}); "
                          "name an axis of the output that holds class scores")
    return kinds


# A channel whose dense energy is below this share of the mean channel's (one that is all but
# constant zero on the calibration set) is normalised as if it had this much, so that
# rounding-level errors in it do not outweigh every other channel.
CHANNEL_ENERGY_FLOOR = 1e-4


def channel_energies(teacher: Mapping[str, torch.Tensor], kinds: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """Per "nmse_channel" output: the dense mean square of each channel (axis 1) over all the
    samples given, floored at CHANNEL_ENERGY_FLOOR of the mean channel's. Computed once on the
    whole learning split, so a batch that happens to hold little of a channel does not swing it."""
    energies = {}
    for name, kind in kinds.items():
        if kind == "nmse_channel":
            t = teacher[name]
            energy = t.movedim(1, 0).reshape(t.shape[1], -1).double().pow(2).mean(dim=1)
            energies[name] = energy.clamp_min(CHANNEL_ENERGY_FLOOR * float(energy.mean()) + 1e-30).to(t.dtype)
    return energies


def distillation_loss(student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor],
                      kinds: Mapping[str, str], temperature: float, class_axis: int | None = None,
                      energies: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """``energies``: channel_energies() of the learning split; without them an "nmse_channel"
    output is normalised by this batch's own channel energies."""
    total = None
    for name, kind in kinds.items():
        s, t = student[name], teacher[name]
        if kind in ("kl", "kl_prob"):
            s, t = _classes_last(s, class_axis), _classes_last(t, class_axis)
        if kind == "kl":
            s2, t2 = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
            loss = F.kl_div(F.log_softmax(s2 / temperature, dim=-1), F.log_softmax(t2 / temperature, dim=-1),
                            reduction="batchmean", log_target=True) * temperature**2
        elif kind == "kl_prob":
            # The graph already applied the softmax: KL of the distributions, mean over positions.
            p = t.clamp_min(1e-12)
            loss = (p * (p.log() - s.clamp_min(1e-12).log())).sum(dim=-1).mean()
        elif kind == "nmse_channel":
            energy = (energies or {}).get(name)
            if energy is None:
                energy = channel_energies({name: t}, {name: kind})[name]
            err = (s - t).movedim(1, 0).reshape(t.shape[1], -1).pow(2).mean(dim=1)
            loss = (err / energy).mean()
        else:
            loss = (s - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-12)
        total = loss if total is None else total + loss
    return total


def per_sample_losses(student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor],
                      kinds: Mapping[str, str], temperature: float, class_axis: int | None = None,
                      energies: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Each sample's share of distillation_loss(): a vector over the batch whose mean is the
    batch's loss (same normalisers: "nmse" divides by the batch's mean teacher energy per
    sample, not by each sample's own). For paired comparisons of two networks on a split."""
    total = None
    for name, kind in kinds.items():
        s, t = student[name], teacher[name]
        n = t.shape[0]
        if kind in ("kl", "kl_prob"):
            s, t = _classes_last(s, class_axis), _classes_last(t, class_axis)
        if kind == "kl":
            c = t.shape[-1]
            kl = F.kl_div(F.log_softmax(s.reshape(n, -1, c) / temperature, dim=-1),
                          F.log_softmax(t.reshape(n, -1, c) / temperature, dim=-1),
                          reduction="none", log_target=True).sum(dim=-1)
            loss = kl.mean(dim=1) * temperature**2
        elif kind == "kl_prob":
            p = t.clamp_min(1e-12)
            kl = (p * (p.log() - s.clamp_min(1e-12).log())).sum(dim=-1)
            loss = kl.reshape(n, -1).mean(dim=1)
        elif kind == "nmse_channel":
            energy = (energies or {}).get(name)
            if energy is None:
                energy = channel_energies({name: t}, {name: kind})[name]
            err = (s - t).pow(2).reshape(n, t.shape[1], -1).mean(dim=2)  # [n, channels]
            loss = (err / energy).mean(dim=1)
        else:
            loss = (s - t).pow(2).reshape(n, -1).sum(dim=1) * n / t.pow(2).sum().clamp_min(1e-12)
        total = loss if total is None else total + loss
    return total
