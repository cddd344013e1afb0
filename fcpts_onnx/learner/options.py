"""Options of the learner, declared once with their meaning and checked in one place."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import OptionError

LOSS_KINDS = ("auto", "kl", "nmse", "nmse-channel")
CONSTRAINTS = ("projected", "penalty")
INITS = ("best", "erk", "global", "lamp", "uniform")
DEFAULT_ITERS = 300
# Without --iters or --time-budget a run takes DEFAULT_ITERS steps or as many as fit in this
# many seconds of learning, whichever is fewer: small models get the full schedule, a
# ResNet-18 at 224x224 on 2 CPU cores (about 7 s a step at batch 64) stays within minutes.
DEFAULT_TIME_BUDGET = 420.0
# The learning batch without --batch-size: DEFAULT_BATCH, but a run sized by time halves it,
# down to MIN_AUTO_BATCH, while the larger batch would fit fewer steps than the default
# schedule. On PP-OCRv4 rec (2 cores) a step at batch 64 took 20-24 s against 2.8-4.3 s at
# 16, so a default run at 64 fitted 7 steps and collapsed (held-out KL 1.28, 64% step
# agreement at 50%); at 16 it fits about 100 (60 steps: 0.10, 94%).
DEFAULT_BATCH = 64
MIN_AUTO_BATCH = 16
# fcpts without reconstruction ends with pair exchanges on the exact loss (Learner._refine): a
# budget-sized run gives the gradient steps this much less of its budget, and with --iters the
# exchanges may take this share of DEFAULT_TIME_BUDGET on top.
REFINE_SHARE = 0.3


# Default step sizes of the log-thresholds. Projected (the default constraint): 0.01, with
# steps scaled by the median layer (Learner._projected_threshold_step); on MNIST with
# reconstruction it lowered the test KL at 70% and 80% (0.00038 -> 0.00029, 0.00103 ->
# 0.00078) and left 90% level, where 0.05 with that scaling raised it everywhere. Penalty:
# Adam at the reference's 0.05.
PROJECTED_THRESHOLD_LR = 0.01
PENALTY_THRESHOLD_LR = 0.05


@dataclass(frozen=True)
class LearnOptions:
    """Knobs of the learner (CLI flags of the same names).

    Attributes:
        iters: optimisation steps; None sizes the run from ``time_budget``, or takes
            DEFAULT_ITERS capped to what fits in DEFAULT_TIME_BUDGET seconds.
        batch_size: calibration samples per step; None (default): DEFAULT_BATCH, or down to
            MIN_AUTO_BATCH in a run sized by time where DEFAULT_BATCH would fit fewer steps than
            the default schedule (Learner.fit chooses it from timed steps).
        lr: learning rate of weights, biases and normalisation parameters (Adam).
        threshold_lr: step size of the log-thresholds. With the projected constraint, the
            most one allocation step moves a layer's log-threshold before the common shift
            back to the target (Learner._projected_threshold_step); None: 0.01. With the
            penalty, Adam's learning rate; None: 0.05, the reference's setting.
        lambda_: weight of the global constraint |sum N_l s_l / N - S| (penalty form).
        init: starting allocation of fcpts: "erk" (METHOD.md), "global", "lamp", "uniform",
            or "best" (default): whichever of those is best on the held-out split.
        constraint: "projected" (default: allocation steps on the constraint surface, the
            target held at every step) or "penalty" (the reference: L_rec + lambda * |s - S|,
            Adam on the thresholds).
        temperature: T of the distillation KL on logits.
        seed: seeds batch order and KDE subsamples; CPU runs repeat exactly.
        time_budget: seconds for the whole learning stage (teacher outputs and the choice of
            start included); sizes ``iters`` from a measured step time.
        weight_decay: on weights only (not thresholds, biases or norms).
        learn_thresholds: learn the allocation (fcpts); False keeps the initial masks fixed.
        reconstruct: tune surviving weights, biases and normalisation parameters.
        loss: "auto" (KL for logits, NMSE otherwise), "kl", "nmse", or "nmse-channel": squared
            error normalised per channel (axis 1) by that channel's dense energy over the
            calibration set, channels averaged, so a channel of small values (class scores
            beside a detection head's box coordinates in pixels) counts as much as a large one.
        class_axis: the output axis that holds class scores (1 for a segmentation output
            [N, classes, H, W]); outputs with it are compared as distributions along it, per
            position, in the loss and in the fidelity report. None: the last axis of softmax
            outputs and axis 1 of 2-D logits.
        eval_every: steps between held-out evaluations (None: at most 25 per run, and one at the end).
        final_tune_fraction: share of iters at the end in which the allocation is frozen (projected
            once) and only the weights keep learning (fcpts with reconstruction).
        start_trial_fraction: share of iters spent choosing the start (fcpts with reconstruction
            and ``init="best"``): from each candidate allocation the run's own first steps are
            taken, an equal part of it each (at least MIN_TRIAL_STEPS, never more steps in all
            than iters), the start is chosen on the samples no trial learned from (see
            choose_start_by_evidence), and the run continues the chosen candidate's trial; the
            others come on top of iters. 0 ranks the candidates untuned.
        max_sparsity_step: the most one allocation step (projected constraint) may move a
            layer's own sparsity, estimated through the bridge's slope; None (default):
            unbounded. 0.01 kept PP-LCNet's held-out loss from jumping at the end of the
            warm-up (0.0086 -> 0.035 instead of 0.21) and ended lower on it (2.0e-4 against
            3.9e-4), yet on 512 test pages its KL was 1.7e-2 against 4.9e-3 unbounded, and
            MNIST at 90% got worse (KL 0.00743 against 0.00691): not the default.
        refine: fcpts without reconstruction: after the gradient steps, exchange zeros between
            pairs of layers while the exact (hard-mask) loss on the learning split falls; kept
            only if the held-out loss agrees. Reconstruction runs ignore it.
    """

    iters: int | None = None
    batch_size: int | None = None
    lr: float = 1e-3
    threshold_lr: float | None = None
    lambda_: float = 1.0
    constraint: str = "projected"
    init: str = "best"
    temperature: float = 4.0
    seed: int = 0
    time_budget: float | None = None
    weight_decay: float = 3e-4
    learn_thresholds: bool = True
    reconstruct: bool = True
    loss: str = "auto"
    class_axis: int | None = None
    eval_every: int | None = None
    final_tune_fraction: float = 0.2
    start_trial_fraction: float = 0.2
    refine: bool = True
    max_sparsity_step: float | None = None

    def __post_init__(self) -> None:
        def positive(name, value, integer=False):
            ok = isinstance(value, int) if integer else isinstance(value, (int, float))
            if not ok or isinstance(value, bool) or (not integer and math.isnan(value)) or value <= 0:
                flag = "--" + name.rstrip("_").replace("_", "-")
                raise OptionError(f"{flag} must be a positive {'integer' if integer else 'number'} (got {value!r})")

        if self.iters is not None:
            positive("iters", self.iters, integer=True)
        if self.batch_size is not None:
            positive("batch_size", self.batch_size, integer=True)
        positive("lr", self.lr)
        if self.threshold_lr is None:  # resolved here, so the report's options repeat the run
            default = PROJECTED_THRESHOLD_LR if self.constraint == "projected" else PENALTY_THRESHOLD_LR
            object.__setattr__(self, "threshold_lr", default)
        positive("threshold_lr", self.threshold_lr)
        positive("temperature", self.temperature)
        if self.time_budget is not None:
            positive("time_budget", self.time_budget)
        if self.max_sparsity_step is not None:
            positive("max_sparsity_step", self.max_sparsity_step)
        if not isinstance(self.lambda_, (int, float)) or math.isnan(self.lambda_) or self.lambda_ < 0:
            raise OptionError(f"--lambda must be >= 0 (got {self.lambda_!r})")
        if self.constraint not in CONSTRAINTS:
            raise OptionError(f"--constraint must be one of {', '.join(CONSTRAINTS)} (got {self.constraint!r})")
        if self.init not in INITS:
            raise OptionError(f"--init must be one of {', '.join(INITS)} (got {self.init!r})")
        if self.class_axis is not None and (not isinstance(self.class_axis, int) or isinstance(self.class_axis, bool)):
            raise OptionError(f"--class-axis must be an integer axis (got {self.class_axis!r})")
        if self.loss not in LOSS_KINDS:
            raise OptionError(f"--loss must be one of {', '.join(LOSS_KINDS)} (got {self.loss!r})")
        if not 0 <= self.final_tune_fraction < 1:
            raise OptionError(f"final_tune_fraction must be in [0, 1) (got {self.final_tune_fraction!r})")
        if not 0 <= self.start_trial_fraction < 1 or self.start_trial_fraction + self.final_tune_fraction >= 1:
            raise OptionError(f"start_trial_fraction must be in [0, 1) and leave steps to learn "
                              f"(got {self.start_trial_fraction!r})")
