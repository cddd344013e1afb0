"""The learning stage of the pipeline: trainable form -> Learner -> values to write back."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..allocation import AllocationProblem, allocate
from ..calibration import CalibrationSet, static_batch
from ..discovery import Consumer, Discovery, consumer_node
from ..onnx_io import LoadedModel
from ..trainable import build_trainable, deterministic_cudnn, full_float32, parameter_table
from ..writeback import cast_keeping_nonzeros
from .fcpts import Learner
from .memory import plan_batch
from .options import DEFAULT_BATCH, LearnOptions


@dataclass
class StageResult:
    counts: np.ndarray
    updates: list  # (locator, values) for writeback.apply_updates
    report: dict


def _progress_bar(quiet: bool):
    if quiet:
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=1, file=sys.stderr, dynamic_ncols=True, leave=False, desc="learning")

    def update(step: int, total: int, info: dict) -> None:
        # A new run of steps (timing, then learning) restarts the clock so the rate and ETA are its own.
        # It may start part-way (learning continues the chosen start's trial at step 40 of 96):
        # counting from there keeps the rate to this run's steps (it read 95162 it/s, then
        # 1.8 s/it for 3 s steps, on ResNet-18).
        if info.get("restart"):
            bar.reset(total=total)
            bar.initial = step
        elif bar.total != total:
            bar.total = total
        bar.n = step
        loss, holdout = info["loss"], info["holdout"]
        bar.set_postfix_str(
            info["phase"] + ("" if not math.isfinite(loss) else f" loss={loss:.4g}")
            + f" sparsity={info['sparsity']:.2%}"
            + ("" if not math.isfinite(holdout) else f" held-out={holdout:.4g}"),
            refresh=True,
        )

    return update, bar.close


def learn(loaded: LoadedModel, found: Discovery, calibration: CalibrationSet, train_idx: np.ndarray,
          holdout_idx: np.ndarray, problem: AllocationProblem, method: str, reconstruct: bool,
          options: LearnOptions, device: str, quiet: bool, memory_limit: int) -> StageResult:
    """Masks (exact counts) and tuned values for ``method``, learned on the training split."""
    # learn on the arithmetic the parity check cleared (no TF32 on a GPU), repeatably for a seed
    with full_float32(), deterministic_cudnn():
        return _learn(loaded, found, calibration, train_idx, holdout_idx, problem, method, reconstruct,
                      options, device, quiet, memory_limit)


def _learn(loaded: LoadedModel, found: Discovery, calibration: CalibrationSet, train_idx: np.ndarray,
           holdout_idx: np.ndarray, problem: AllocationProblem, method: str, reconstruct: bool,
           options: LearnOptions, device: str, quiet: bool, memory_limit: int) -> StageResult:
    clock_start = time.perf_counter()  # the time budget covers the whole stage
    train = calibration.take(train_idx)
    trainable = build_trainable(loaded, found, train, device=device)
    module = trainable.module
    learned = method == "fcpts"
    if learned:
        starts = [options.init] if options.init != "best" else ["erk", "global", "lamp", "uniform"]
        candidates = {name: allocate(name, problem) for name in starts}
    else:
        candidates = {method: allocate(method, problem)}
    initial = next(iter(candidates.values()))

    def to_device(cal: CalibrationSet) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in cal.arrays.items()}

    def attrs_of(c: Consumer) -> dict:  # the ints (Gemm's transB) and strings (Einsum's equation) that say the layout
        node = consumer_node(loaded.model.graph, c)
        return {a.name: a.i if a.type == a.INT else a.s.decode() for a in node.attribute if a.type in (a.INT, a.STRING)}

    # A graph exported with a fixed batch may bake it into Reshape constants: learn at that batch.
    fixed_batch = static_batch(loaded.model, calibration.layout)
    run_options = asdict(options) | {"learn_thresholds": learned, "reconstruct": reconstruct}
    train_tensors = to_device(train)
    requested = options.batch_size if options.batch_size is not None else DEFAULT_BATCH
    memory = plan_batch(module, train_tensors, requested, memory_limit, fixed_batch=fixed_batch)
    run_options["batch_size"] = memory.batch_size
    # without --batch-size a run sized by time may learn on a smaller batch (Learner._choose_batch)
    auto_batch = options.batch_size is None and not memory.graph_fixed
    update, close = _progress_bar(quiet)
    try:
        learner = Learner(module, found.weights, problem, initial, train_tensors,
                          to_device(calibration.take(holdout_idx)), LearnOptions(**run_options),
                          attrs_of=attrs_of, progress=update, auto_batch=auto_batch,
                          clock_start=clock_start)
        start_losses = learner.choose_start(candidates) if len(candidates) > 1 else {}
        result = learner.fit()
    finally:
        close()

    updates = []
    with torch.no_grad():
        for w, key in zip(found.weights, module.prunable_keys):
            keep = result.masks[key].cpu().numpy()
            values = (module.parameter(key).detach() * result.masks[key]).cpu().numpy()
            updates.append((w, cast_keeping_nonzeros(values, np.dtype(w.values(loaded.model).dtype), keep)))
        if reconstruct:
            for key, source in module.sources.items():
                if source.role == "weight":
                    continue
                stored = source.tensor(loaded.model)
                dtype = onnx_np_dtype(stored.data_type)
                updates.append((source, module.parameter(key).detach().cpu().numpy().astype(dtype)))
    sizes = [w.size for w in found.weights]
    # weights whose every reader sits in an If body that no learning batch took: nothing reached them
    untaken = [w.name for w in found.weights if all(c.body and c.body not in module.body_runs for c in w.consumers)]
    report = {
        "method": method,
        "reconstruct": reconstruct,
        "device": device,
        "parity": trainable.parity.to_dict(),
        "trainable_parameters": {
            role: sum(p["params"] for p in parameter_table(module) if p["role"] == role)
            for role in ("weight", "bias", "norm")
        },
        "train_samples": int(len(train_idx)),
        "holdout_samples": int(len(holdout_idx)),
        "steps": result.steps,
        # --iters that repeats this run (the steps after the start trials; CPU, same seed)
        "repeat_iters": learner.learning_iters,
        "memory": memory.to_dict(),
        # the batch the steps learned on: the memory plan's, or smaller in a run sized by time
        # without --batch-size (batch_choice: the step times that chose it)
        "batch_size": learner.options.batch_size,
        "batch_choice": learner.batch_choice,
        # seconds the run was sized to (None with --iters); True when the default budget cut
        # the default number of steps short
        "time_budget_s": learner.budget_s,
        "limited_by_default_budget": learner.limited_by_budget,
        # seconds of the budget spent before the run was sized (None with --iters)
        "budget_spent_at_plan_s": None if learner.budget_spent_at_plan is None
        else round(learner.budget_spent_at_plan, 3),
        # a run sized by time: the steps timed at learning rate 0 before planning (seconds each)
        "timing_probe_s": learner.probe_step_times,
        "best_step": result.best_step,
        "seconds": round(result.seconds, 3),
        "step_time_s": round(result.step_time_s, 5),
        # the median learning step after the start trials, held-out evaluations left out
        "step_median_s": None if result.step_median_s is None else round(result.step_median_s, 5),
        "initial_allocation": learner.start_name if len(candidates) > 1 else next(iter(candidates)),
        "start_candidates_holdout_loss": start_losses,
        # with reconstruction: each candidate's held-out loss after start_trial_steps of tuning
        "start_trials_holdout_loss": learner.start_trials,
        # which start the trials chose and how sure: untuned_best, trial_best, t (paired t statistic)
        "start_choice": learner.start_evidence,
        "start_trial_steps": learner.start_trial_steps,
        # the run went on from its chosen start's trial (its first start_trial_steps steps)
        "start_trial_continued": learner.start_trial_continued,
        # True when the target was too high to keep one weight in every output channel
        "channel_protection_relaxed": bool(learner.protection_relaxed),
        "initial_sparsity": result.initial_sparsity,
        "learned_sparsity": result.learned_sparsity if learned else None,
        "final_sparsity": [int(k) / n for k, n in zip(result.counts, sizes)],
        "train_loss": result.train_loss,
        # fcpts without reconstruction: the pair exchanges after the gradient steps (None otherwise)
        "refinement": learner.refinement,
        "holdout_loss": {"dense": result.dense_holdout_loss, "initial": result.holdout_curve[0][1]
                         if result.holdout_curve else None, "best": result.final_holdout_loss,
                         "curve": result.holdout_curve},
        "options": asdict(options),
        "weights_in_untaken_branches": untaken,
    }
    return StageResult(result.counts, updates, report)


def onnx_np_dtype(data_type: int) -> np.dtype:
    import onnx

    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type))
