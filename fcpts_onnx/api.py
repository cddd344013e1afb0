"""sparsify(): load -> discover -> calibrate -> allocate -> write back -> verify -> report.

Shaped after onnxruntime.quantization.quantize_static: model in, model out, calibration
data, keyword options. The CLI builds the same options and calls the same function.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .allocation import AllocationProblem, allocate, get_allocator
from .allocation.problem import check_feasible
from .calibration import (
    GENERATED_INPUTS_HINT,
    BatchLayout,
    CalibrationSet,
    generate,
    graph_inputs,
    infer_layout,
    load_calibration,
    split_holdout,
    static_batch,
)
from .config import LEARNED_METHODS, SparsifyOptions
from .discovery import Discovery, assign_macs, discover
from .errors import OptionError, UnsupportedModelError, VerificationError
from .learner.options import DEFAULT_ITERS, LearnOptions
from .masks import magnitude, zero_smallest
from .onnx_io import LoadedModel, check_output_path, check_report_path, load_model, sha256_of, staged_output
from .report import LayerRow, Report
from .resources import check_declared_shapes, default_memory_limit, format_bytes
from .sparse_storage import densify, to_sparse_storage
from .verify import check_model_file, count_zeros_in_file, fidelity, output_batch_axes, run_onnxruntime
from .writeback import apply_updates


class _Timer:
    """Wall time per pipeline stage, in the order the stages ran."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 4)


def default_output_path(model_input: str | Path) -> Path:
    """model.onnx -> model.sparse.onnx, next to the input."""
    path = Path(model_input)
    return path.with_name(path.stem + ".sparse.onnx")


def default_report_path(model_output: str | Path) -> Path:
    """model.sparse.onnx -> model.sparse.report.json, next to the output."""
    path = Path(model_output)
    return path.with_name(path.stem + ".report.json")


def discover_or_refuse(loaded: LoadedModel, options: SparsifyOptions) -> Discovery:
    found = discover(loaded.model, exclude=options.nodes_to_exclude, op_types=options.op_types,
                     external=loaded.external_tensors)
    if not found.weights:
        why = (f"; {len(found.skipped)} weight(s) skipped, e.g. {found.skipped[0].name!r}: {found.skipped[0].reason}"
               if found.skipped else "")
        raise UnsupportedModelError(
            f"{loaded.path}: nothing to prune (no Conv, ConvTranspose, Gemm, MatMul, LSTM, GRU or RNN with a "
            f"constant float weight{why}); check --exclude/--op-types or the model"
        )
    return found


def _calibration(source: Any, loaded: LoadedModel, shapes: Mapping[str, Sequence[int]] | None,
                 layout: BatchLayout) -> CalibrationSet:
    if source is None:
        return generate(graph_inputs(loaded.model), shapes=shapes, layout=layout)
    return load_calibration(source, loaded.model, layout)


def batch_layout(loaded: LoadedModel, batch_axes: Mapping[str, int] | None) -> BatchLayout:
    """Where the inputs keep their samples (calibration.infer_layout), or a one-line refusal."""
    try:
        return infer_layout(graph_inputs(loaded.model), batch_axes)
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(f"{loaded.path}: {exc}") from None


def sparsify(
    model_input: str | Path,
    model_output: str | Path | None = None,
    calibration_data: Any = None,
    *,
    sparsity: float = 0.8,
    method: str | None = None,
    nodes_to_exclude: Sequence[str] = (),
    op_types: Sequence[str] | None = None,
    max_layer_sparsity: float = 0.98,
    batch_size: int = 64,
    external_data: bool | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    report_path: str | Path | bool | None = None,
    reconstruct: bool | None = None,
    holdout: float = 0.1,
    device: str = "cpu",
    learn: LearnOptions | None = None,
    show_progress: bool = False,
    store: str = "dense",
    max_memory: int | str | None = None,
    batch_axes: Mapping[str, int] | None = None,
) -> Report:
    """Sparsify an ONNX model to an exact global sparsity and write a verified copy.

    Args:
        model_input: path of the ONNX model; never modified.
        model_output: where to write; default ``<input stem>.sparse.onnx`` next to the input.
        calibration_data: a ``.npz``/``.npy`` path, a dict of arrays, an iterable of feed
            dicts, an onnxruntime ``CalibrationDataReader``, or None to verify on generated inputs.
        sparsity: global target in (0, 1); exactly round(sparsity * N) prunable weights end zero.
        method: "fcpts" (learned; the default with calibration data), or a data-free
            allocator: "uniform", "global" (the default without data), "erk", "lamp".
        nodes_to_exclude: regexes on node or weight names to keep dense.
        op_types: restrict pruning to these op types.
        max_layer_sparsity: upper bound on any layer's sparsity (default 0.98).
        batch_size: samples per onnxruntime run when verifying.
        external_data: write a separate data file (None: same form as the input).
        input_shapes: full shapes for generated inputs with dynamic dims (only without calibration data).
        report_path: JSON report path; None writes ``<output stem>.report.json``, False writes none.
        reconstruct: tune surviving weights, biases and norm parameters on the calibration data
            (None: on for fcpts, off for the data-free allocators).
        holdout: fraction of calibration samples never learned on (early stopping, fidelity).
        device: "cpu" or "cuda" for learning.
        learn: learner options (iterations, time budget, learning rates, lambda, seed, ...).
        show_progress: draw a progress bar on stderr while learning.
        store: "dense" (ordinary tensors) or "sparse": pruned weights whose non-zeros take fewer
            bytes that way are written as ONNX sparse tensors (graph.sparse_initializer).
        max_memory: bytes, or text such as "8G": models whose declared shapes need more for one
            tensor are refused, and the learner's batch shrinks to fit (None: 80% of what is free).
        batch_axes: input name -> the axis that holds its samples, where the graph does not say
            (a state [2, batch, 128] beside a signal whose batch is unnamed, say). Scalar inputs
            are settings: give their one value as a 0-d array in the calibration data.

    Returns:
        The :class:`~fcpts_onnx.report.Report`, also written as JSON unless report_path is False.

    Raises:
        FcptsError: for any problem with the inputs or options; nothing is written then.
    """
    options = SparsifyOptions(
        sparsity=sparsity, method=method, nodes_to_exclude=tuple(nodes_to_exclude),
        op_types=tuple(op_types) if op_types is not None else None,
        max_layer_sparsity=max_layer_sparsity, batch_size=batch_size, external_data=external_data,
        reconstruct=reconstruct, holdout=holdout, device=device, learn=learn or LearnOptions(), store=store,
        max_memory=max_memory, batch_axes=dict(batch_axes or {}),
    )
    return run(model_input, model_output, calibration_data, options,
               input_shapes=input_shapes, report_path=report_path, quiet=not show_progress)


def run(model_input: str | Path, model_output: str | Path | None, calibration_data: Any,
        options: SparsifyOptions, *, input_shapes: Mapping[str, Sequence[int]] | None = None,
        report_path: str | Path | bool | None = None, quiet: bool = True) -> Report:
    """The pipeline behind :func:`sparsify` and ``fcpts-onnx optimize``."""
    timer = _Timer()
    notes: list[str] = []
    random_calibration = isinstance(calibration_data, str) and calibration_data == "random"
    method = options.resolved_method(calibration_data is not None)
    if method not in LEARNED_METHODS:
        get_allocator(method)  # unknown method: fail before reading anything
    reconstruct = options.resolved_reconstruct(method)
    needs_data = method in LEARNED_METHODS or reconstruct
    if needs_data and calibration_data is None:
        what = f"--method {method}" if method in LEARNED_METHODS else "--reconstruct"
        raise OptionError(f"{what} learns from calibration data: pass --calib FILE "
                          "(or --calib random for a smoke test only)")
    if needs_data:  # --device cuda without a GPU is refused before any work
        from .trainable import resolve_device

        resolve_device(options.device)
    with timer.stage("load"):
        loaded = load_model(model_input)
        input_sha = sha256_of(loaded.path)
        # a file written with --store sparse is re-optimized as the dense tensors it stands for
        loaded = replace(loaded, model=densify(loaded.model))
    output_path = Path(model_output) if model_output is not None else default_output_path(loaded.path)
    check_output_path(output_path, loaded)
    if report_path is None:
        report_path = default_report_path(output_path)
    if report_path is not False:
        check_report_path(Path(report_path), output_path, loaded)
    # onnxruntime runs on the host; learning runs on --device (the GPU's free memory for cuda)
    host_limit = options.max_memory or default_memory_limit("cpu")
    with timer.stage("check_shapes"):  # absurd declared shapes are refused before anything is allocated
        layout = batch_layout(loaded, options.batch_axes)
        fixed = static_batch(loaded.model, layout)
        check_declared_shapes(loaded.model, fixed or options.batch_size, host_limit, loaded.path,
                              batch_fixed=bool(fixed))
    with timer.stage("discover"):
        found = discover_or_refuse(loaded, options)
    with timer.stage("calibrate"):
        if random_calibration:
            calibration = generate(graph_inputs(loaded.model), n_samples=64, seed=options.learn.seed,
                                   shapes=input_shapes, layout=layout)
            notes.append("--calib random: learned from random inputs; these results mean nothing "
                         "about real data (smoke test only)")
        else:
            calibration = _calibration(calibration_data, loaded, input_shapes, layout)
        if not layout.trivial:  # where each output keeps its samples, measured by onnxruntime
            hint = GENERATED_INPUTS_HINT if calibration.generated else ""
            calibration.layout = output_batch_axes(loaded.path, calibration, fixed, run_hint=hint)
        # Dynamic-shape exports: count MACs at the calibration data's sample shape (a graph with
        # a fixed batch is measured at that batch: onnxruntime refuses any other).
        one_sample = calibration.take(slice(0, fixed or 1)).feed()
        assign_macs(loaded.model, found.weights, {k: v.shape for k, v in one_sample.items()}, feed=one_sample)
    if needs_data:
        fixed_batch = fixed
        train_idx, holdout_idx = split_holdout(calibration, options.holdout, options.learn.seed,
                                               multiple=fixed_batch or 1)
        fidelity_idx = holdout_idx
    else:
        fidelity_idx = np.arange(calibration.n_samples)  # nothing learned: every sample is held out
    fidelity_set = calibration.take(fidelity_idx)
    with timer.stage("dense_reference"):
        hint = GENERATED_INPUTS_HINT if calibration.generated else ""
        dense = run_onnxruntime(loaded.path, fidelity_set, options.batch_size, what="input model", run_hint=hint)
    for name, value in dense.items():
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            notes.append(f"the input model's output {name!r} is not finite (NaN or inf) on some held-out "
                         "samples; its fidelity numbers are not meaningful")

    values = {w.name: w.values(loaded.model) for w in found.weights}
    magnitudes = [magnitude(values[w.name]) for w in found.weights]
    for w, mags in zip(found.weights, magnitudes):
        bad = int(mags.size - np.count_nonzero(np.isfinite(mags)))
        if bad:  # no magnitude order, and the model's outputs are not finite either
            raise UnsupportedModelError(
                f"weight {w.name!r} holds {bad} NaN or infinite value(s); fix the model (re-export it from "
                f"finite weights) or leave the layer dense with --exclude '{w.name}'")
    problem = AllocationProblem(
        magnitudes=magnitudes,
        shapes=[w.matrix_shape for w in found.weights],
        target=options.sparsity,
        max_layer_sparsity=options.max_layer_sparsity,
    )
    check_feasible(problem)
    learning = None
    if needs_data:
        with timer.stage("learn"):
            from .learner.stage import learn

            memory_limit = options.max_memory or default_memory_limit(options.device)
            stage = learn(loaded, found, calibration, train_idx, holdout_idx, problem, method, reconstruct,
                          options.learn, options.device, quiet, memory_limit)
        counts, updates, learning = stage.counts, stage.updates, stage.report
        memory = learning["memory"]
        if memory["graph_fixed_batch"] and memory["batch_size"] != memory["requested_batch_size"]:
            notes.append(f"learning batch {memory['batch_size']} instead of {memory['requested_batch_size']}: "
                         "the graph's inputs have a fixed batch size; export it with a dynamic batch axis "
                         "to learn on larger batches")
        elif memory["batch_size"] < memory["requested_batch_size"]:
            notes.append(f"learning batch {memory['batch_size']} instead of {memory['requested_batch_size']}, "
                         f"to stay within {format_bytes(memory['limit_bytes'])} (about "
                         f"{format_bytes(memory['per_sample_bytes'])} per sample); --max-memory sets the limit")
        choice = learning.get("batch_choice")
        if choice and choice["chosen"] < choice["largest"]:
            timed = ", ".join(f"{t:.2g} s at batch {b}" for b, t in choice["probe_step_s"].items())
            notes.append(f"learning batch {choice['chosen']} instead of {choice['largest']}: a step took {timed}, "
                         f"and a larger batch would fit fewer than the default schedule's {choice['wanted_steps']} "
                         f"steps{' (start trials included)' if choice['wanted_steps'] != DEFAULT_ITERS else ''} "
                         f"in the time budget; --batch-size fixes the batch "
                         f"(--iters {learning['repeat_iters']} --batch-size {choice['chosen']} repeats this run)")
        budget, spent = learning["time_budget_s"], learning["budget_spent_at_plan_s"]
        if budget is not None and spent is not None and timer.seconds["learn"] > 1.1 * budget:
            def secs(x: float) -> str:
                return f"{x:.0f} s" if x >= 10 else f"{x:.1f} s"

            notes.append(f"learning took {secs(timer.seconds['learn'])} against a time budget of {secs(budget)}: "
                         f"{secs(spent)} went before the run could be sized (building and checking the trainable "
                         "form, the dense outputs, choosing the start, timing steps), and a run takes at least "
                         "5 steps; give --time-budget more seconds, or --iters N for a fixed number of steps")
        untaken = learning["weights_in_untaken_branches"]
        if untaken:
            notes.append(f"{len(untaken)} weight(s) sit in If branches that no calibration batch took (e.g. "
                         f"{untaken[0]!r}): learning saw no data through them, so their values are untuned and "
                         "their sparsity follows the target alone; calibrate on inputs that take every branch "
                         "you deploy, or keep them dense with --exclude")
        if learning["limited_by_default_budget"]:
            notes.append(f"learning ran {learning['steps']} steps ({learning['step_time_s']:.2g} s each), "
                         f"as many as fit in the default {learning['time_budget_s']:.0f} s; "
                         "--time-budget SECONDS or --iters N for a longer run")
    else:
        with timer.stage("allocate"):
            counts = allocate(method, problem)
            updates = [(w, zero_smallest(values[w.name], int(k))) for w, k in zip(found.weights, counts)]
    del values
    achieved = problem.n_zeros / problem.total
    metadata = {
        "version": __version__, "method": method, "reconstruct": str(reconstruct).lower(),
        "target_sparsity": repr(options.sparsity),
        "achieved_sparsity": f"{achieved:.8f}", "zeros": f"{problem.n_zeros}/{problem.total}",
    }
    # always written: a re-optimized --store sparse file must not keep claiming its old storage
    metadata["store"] = options.store
    with timer.stage("write_back"):
        out_model = apply_updates(loaded.model, updates, metadata)
        if options.store == "sparse":
            stored = to_sparse_storage(out_model, found.weights)
            notes.append(f"--store sparse: {len(stored.converted)} of {len(found.weights)} pruned weights written "
                         f"as sparse tensors ({stored.dense_bytes:,} -> {stored.sparse_bytes:,} bytes of data)")
    del updates
    external = options.external_data if options.external_data is not None else loaded.has_external_data

    with staged_output(output_path) as stage_out:
        with timer.stage("save"):
            stage_out.save(out_model, external_data=external)
        del out_model
        with timer.stage("verify"):
            check_model_file(stage_out.model_path)
            written_counts = count_zeros_in_file(stage_out.model_path, found.weights)
            written_zeros = sum(z for z, _ in written_counts.values())
            if written_zeros != problem.n_zeros:
                raise VerificationError(
                    f"written model has {written_zeros} zero weights, {problem.n_zeros} required; this is a bug"
                )
            sparse = run_onnxruntime(stage_out.model_path, fidelity_set, options.batch_size, what="written model")
            agreement = fidelity(dense, sparse, options.learn.class_axis)
        written = stage_out.commit()
    output_sha = sha256_of(output_path)
    if sha256_of(loaded.path) != input_sha:  # cannot happen: we never open the input for writing
        raise VerificationError(f"{loaded.path} changed during the run; check what else writes to it")

    layers = []
    for w, before in zip(found.weights, problem.floors):
        zeros, size = written_counts[w.name]
        density = (size - zeros) / size
        layers.append(LayerRow(
            name=w.name, op_type=w.op_type, nodes=w.node_names, shape=list(w.shape), dtype=w.dtype,
            storage=w.where, params=size, zeros_before=int(before), zeros=zeros, sparsity=zeros / size,
            macs=w.macs, nonzero_macs=None if w.macs is None else int(round(w.macs * density)),
        ))
    capped = [row.name for row, cap in zip(layers, problem.caps) if row.zeros == cap and cap < row.params]
    if capped:
        notes.append(f"{len(capped)} layer(s) held at the {options.max_layer_sparsity:.0%} per-layer bound "
                     f"(--max-layer-sparsity): {', '.join(capped[:3])}{' ...' if len(capped) > 3 else ''}")
    if calibration.generated and not random_calibration:
        notes.append("fidelity measured on generated random inputs; give --calib for meaningful numbers")
    report = Report(
        tool_version=__version__,
        input_path=str(loaded.path), input_sha256=input_sha,
        output_path=str(output_path), output_sha256=output_sha, output_files=[str(p) for p in written],
        method=method, options=options.to_dict() | {"method": method, "reconstruct": reconstruct},
        target_sparsity=options.sparsity,
        total_params=problem.total, zero_params=written_zeros, required_zeros=problem.n_zeros,
        achieved_sparsity=written_zeros / problem.total,
        layers=layers, skipped=[asdict(s) for s in found.skipped],
        calibration={
            "source": calibration.source, "n_samples": calibration.n_samples, "generated": calibration.generated,
            "inputs": {k: [list(v.shape), str(v.dtype)] for k, v in calibration.feed().items()},
            # inputs and outputs that keep their samples on another axis than the first (None: a setting)
            "batch_axes": {"inputs": dict(calibration.layout.inputs), "outputs": dict(calibration.layout.outputs)},
            "learned_on": 0 if learning is None else learning["train_samples"],
            "held_out_samples": int(len(fidelity_idx)),
        },
        fidelity=[f.to_dict() for f in agreement],
        verification={
            "onnx_checker": "passed", "onnxruntime": "loaded and ran on every held-out sample",
            "zeros_counted_in_file": written_zeros, "input_unchanged": True,
        },
        timings_s=timer.seconds,
        notes=notes,
        learning=learning,
    )
    if report_path is not False:
        report.write_json(report_path)
    return report
