"""What is in a model: prunable layers, where their weights live, sparsity, size and MACs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from .calibration import GENERATED_INPUTS_HINT, generate, graph_inputs
from .discovery import assign_macs, discover
from .errors import FcptsError, UnsupportedModelError
from .masks import count_zeros
from .onnx_io import load_model
from .report import _fmt_count, _short, format_layer_table, layer_label
from .sparse_storage import densify


def inspect_model(model_path: str | Path, *, nodes_to_exclude: tuple[str, ...] = (),
                  op_types: tuple[str, ...] | None = None,
                  input_shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, Any]:
    """A JSON-ready description of the model as fcpts-onnx sees it.

    ``input_shapes`` pins dynamic input dims (full shapes, batch first) so MACs can be counted.
    """
    loaded = load_model(model_path)
    model = densify(loaded.model)  # weights written by --store sparse are read as the dense tensors they are
    found = discover(model, exclude=nodes_to_exclude, op_types=op_types, external=loaded.external_tensors)
    if input_shapes:
        specs = graph_inputs(model)
        try:
            feed = generate(specs, shapes={s.name: (1, *input_shapes[s.name][1:]) for s in specs
                                           if s.name in input_shapes}).take(slice(0, 1)).feed()
        except FcptsError:  # a setting input, or no telling where the samples are: no measured shapes
            feed = None
        assign_macs(model, found.weights, input_shapes, feed=feed)
    elif found.weights:
        # Shape inference stops at contrib ops such as onnxruntime's FusedConv, and at a Reshape
        # fed by Shape ops (where an unknown first axis may be batch x tokens, not the batch):
        # where only the batch is dynamic, the inputs are pinned to batch 1 and one onnxruntime
        # run measures what inference leaves unknown, as --shape would.
        specs = graph_inputs(model)
        if all(s.dims is not None and all(isinstance(d, int) for d in s.dims[1:]) for s in specs):
            shapes = {s.name: (s.dims[0] if isinstance(s.dims[0], int) else 1, *s.dims[1:]) for s in specs if s.dims}
            try:
                feed = generate(specs, n_samples=1, shapes=shapes).feed()
            except FcptsError:  # a setting input, or no telling where the samples are: MACs stay unknown
                feed = None
            if feed is not None:
                assign_macs(model, found.weights, {k: v.shape for k, v in feed.items()}, feed=feed)
    layers = []
    for w in found.weights:
        values = w.values(model)
        zeros = count_zeros(values)
        layers.append({
            "name": w.name, "op_type": w.op_type, "nodes": w.node_names, "shape": list(w.shape),
            "dtype": w.dtype, "storage": w.where, "params": w.size, "zeros": zeros,
            "sparsity": zeros / w.size, "macs": w.macs,
            "nonzero_macs": None if w.macs is None else int(round(w.macs * (w.size - zeros) / w.size)),
        })
    total = sum(r["params"] for r in layers)
    zeros = sum(r["zeros"] for r in layers)
    macs = [r["macs"] for r in layers]
    all_params = sum(int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer)
    return {
        "path": str(loaded.path),
        "ir_version": model.ir_version,
        "opsets": {op.domain or "ai.onnx": op.version for op in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": [s.describe() for s in graph_inputs(model)],
        "outputs": [o.name for o in model.graph.output],
        "nodes": len(model.graph.node),
        "external_data": list(loaded.external_data_files),
        "initializer_params": all_params,
        # what the graph stores anywhere: initializers and Constant nodes' tensors, If/Loop bodies too
        "stored_params": _stored_params(model.graph),
        "prunable_params": total,
        "prunable_zeros": zeros,
        "global_sparsity": zeros / total if total else 0.0,
        "macs": sum(macs) if layers and all(m is not None for m in macs) else None,
        "nonzero_macs": (sum(r["nonzero_macs"] for r in layers)
                         if layers and all(m is not None for m in macs) else None),
        "layers": layers,
        "skipped": [asdict(s) for s in found.skipped],
        "metadata": {p.key: p.value for p in model.metadata_props},
    }


def format_inspection(info: dict[str, Any]) -> str:
    rows = [
        {
            "name": _short(layer_label(r["name"], r["nodes"])), "op": r["op_type"], "shape": "x".join(map(str, r["shape"])),
            "dtype": r["dtype"], "where": r["storage"], "params": _fmt_count(r["params"]),
            "sparsity": f"{r['sparsity']:.1%}", "macs": _fmt_count(r["macs"]),
        }
        for r in info["layers"]
    ]
    table = format_layer_table(rows, [
        ("layer", "name", "<"), ("op", "op", "<"), ("shape", "shape", "<"), ("dtype", "dtype", "<"),
        ("stored as", "where", "<"), ("params", "params", ">"), ("sparsity", "sparsity", ">"),
        ("MACs", "macs", ">"),
    ])
    opsets = ", ".join(f"{d} {v}" for d, v in info["opsets"].items())
    lines = [
        f"{info['path']}: IR {info['ir_version']}, opsets {opsets}, {info['nodes']} nodes"
        + (f", producer {info['producer']}" if info["producer"] else ""),
        f"inputs: {'; '.join(info['inputs'])}",
        f"outputs: {', '.join(info['outputs'])}",
        "",
        table if rows else "(no prunable layers)",
        "",
        f"prunable: {len(info['layers'])} weights, {info['prunable_params']} params "
        f"({info['stored_params']} params stored in the graph overall)",
        f"global sparsity: {info['global_sparsity']:.2%} ({info['prunable_zeros']} zeros)",
    ]
    if info["macs"] is not None:
        lines.append(f"MACs per inference: {_fmt_count(info['macs'])} dense, "
                     f"{_fmt_count(info['nonzero_macs'])} on non-zero weights")
    else:
        lines.append("MACs: unknown (dynamic or unresolved shapes; pin inputs with --shape NAME=DIMS)")
    if info["external_data"]:
        lines.append(f"external data: {', '.join(info['external_data'])}")
    for s in info["skipped"]:
        lines.append(f"skipped: {s['name']} ({s['op_type']} {s['node_name']}): {s['reason']}")
    fcpts_meta = {k: v for k, v in info["metadata"].items() if k.startswith("fcpts_onnx.")}
    if fcpts_meta:
        lines.append("sparsified by fcpts-onnx: " + ", ".join(f"{k[11:]}={v}" for k, v in fcpts_meta.items()))
    return "\n".join(lines)



def inspect_parity(model_path: str | Path, calibration_data: Any = None, *, device: str = "cpu",
                   input_shapes: Mapping[str, Sequence[int]] | None = None,
                   batch_axes: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Build the trainable form and compare it with onnxruntime on a calibration batch."""
    from .api import batch_layout
    from .calibration import load_calibration
    from .trainable import convert_and_check, parameter_table

    loaded = load_model(model_path)
    found = discover(loaded.model, external=loaded.external_tensors)
    # the check batches samples on each input's batch axis as optimize does: the same refusals
    layout = batch_layout(loaded, batch_axes)
    if calibration_data is None:
        calibration = generate(graph_inputs(loaded.model), shapes=input_shapes, layout=layout)
    else:
        calibration = load_calibration(calibration_data, loaded.model, layout)
    try:
        trainable = convert_and_check(loaded, found, calibration, device=device)
    except UnsupportedModelError as exc:
        if calibration.generated and str(exc).startswith("onnxruntime cannot run"):
            raise UnsupportedModelError(f"{exc}{GENERATED_INPUTS_HINT}") from None
        raise
    params = parameter_table(trainable.module)
    return {
        "path": str(loaded.path),
        "parity": trainable.parity.to_dict(),
        "calibration": {"source": calibration.source, "generated": calibration.generated},
        "trainable_parameters": params,
        "trainable_params_by_role": {
            role: sum(p["params"] for p in params if p["role"] == role) for role in ("weight", "bias", "norm")
        },
    }


def _stored_params(graph) -> int:
    total = sum(int(np.prod(t.dims, dtype=np.int64)) for t in graph.initializer)
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Constant" and attr.name == "value":
                total += int(np.prod(attr.t.dims, dtype=np.int64))
            for body in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                total += _stored_params(body)
    return total


def format_parity(info: dict[str, Any]) -> str:
    parity = info["parity"]
    lines = [f"{info['path']}: parity of the trainable form with onnxruntime on {parity['n_samples']} "
             f"{'generated' if info['calibration']['generated'] else 'calibration'} samples ({parity['device']})"]
    rows = [{"name": _short(o["name"]), "dtype": o["dtype"], "rel": f"{o['relative_diff']:.2e}",
             "tol": f"{o['tolerance']:g}", "ok": "pass" if o["passed"] else "FAIL"} for o in parity["outputs"]]
    lines.append(format_layer_table(rows, [("output", "name", "<"), ("dtype", "dtype", "<"),
                                           ("max|diff|/max|ref|", "rel", ">"), ("tolerance", "tol", ">"),
                                           ("result", "ok", "<")]))
    if parity["first_divergence"]:
        d = parity["first_divergence"]
        lines.append(f"first divergent node: {d['node']!r} ({d['op_type']}) output {d['output']!r}, "
                     f"relative diff {d['relative_diff']:.2e}")
    lines.extend(f"note: {note}" for note in parity.get("notes", []))
    by_role = info["trainable_params_by_role"]
    lines.append(f"trainable parameters: {len(info['trainable_parameters'])} tensors; "
                 f"{by_role['weight']} prunable weights, {by_role['bias']} bias, {by_role['norm']} normalisation")
    return "\n".join(lines)
