"""Models saved by onnxruntime's offline optimizer (com.microsoft fused ops) are sparsified end to end."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import fcpts_onnx
from fcpts_onnx.discovery import discover
from fcpts_onnx.learner.options import LearnOptions

ROOT = Path(__file__).resolve().parents[1]


def _load_zoo():
    # tools/zoo.py is not a package module; load it once, the way tests/torchform/test_models.py does.
    if "fcpts_zoo" in sys.modules:
        return sys.modules["fcpts_zoo"]
    spec = importlib.util.spec_from_file_location("fcpts_zoo", ROOT / "tools" / "zoo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fcpts_zoo"] = module
    spec.loader.exec_module(module)
    return module


zoo = _load_zoo()

ort.set_default_logger_severity(3)


def _ort_optimized(name: str, tmp_path: Path) -> Path:
    """``name`` from the zoo, legacy export at opset 17, then saved by onnxruntime at ORT_ENABLE_EXTENDED."""
    entry = zoo.ZOO[name]
    exported = zoo.export(entry.build(), entry.inputs(batch=2, seed=0), tmp_path / f"{name}.onnx", dynamo=False,
                          opset=17, input_names=entry.input_names, output_names=entry.output_names,
                          dynamic_axes=entry.dynamic_axes)
    optimized = tmp_path / f"{name}.ort.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(optimized)
    ort.InferenceSession(str(exported), options, providers=["CPUExecutionProvider"])
    return optimized


@pytest.mark.parametrize("name,fused", [("resnet_tiny", {"FusedConv"}), ("bert_tiny", {"FusedMatMul", "FusedGemm", "BiasGelu"})])
def test_ort_optimized_model_is_sparsified(name, fused, tmp_path):
    optimized = _ort_optimized(name, tmp_path)
    model = onnx.load(str(optimized))
    contrib = {n.op_type for n in model.graph.node if n.domain == "com.microsoft"}
    assert fused <= contrib, contrib
    weights = discover(model).weights
    fused_weights = {w.name for w in weights if w.op_type in ("FusedConv", "FusedGemm", "FusedMatMul")}
    # FusedMatMul in bert_tiny multiplies activations (Q K^T scaled): no weight; FusedGemm has one.
    assert fused_weights, [w.op_type for w in weights]

    out = tmp_path / f"{name}.sparse.onnx"
    report = fcpts_onnx.sparsify(optimized, out, "random", sparsity=0.5, learn=LearnOptions(iters=5))

    assert report.zero_params == report.required_zeros == round(0.5 * report.total_params)
    written = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    assert {n for n in fused_weights if np.any(written[n] == 0)} == fused_weights
    total = sum(written[w.name].size for w in weights)
    zeros = sum(int(np.sum(written[w.name] == 0)) for w in weights)
    assert zeros == report.zero_params and total == report.total_params

    entry = zoo.ZOO[name]
    feeds = {n: t.numpy() for n, t in zip(entry.input_names, entry.inputs(batch=2, seed=1))}
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (logits,) = session.run([entry.output_names[0]], feeds)
    assert np.all(np.isfinite(logits))


def test_op_types_name_the_plain_or_the_fused_form(tmp_path):
    """--op-types Conv keeps selecting a model's convolutions after onnxruntime fused them;
    --op-types FusedConv selects only the fused ones."""
    model = onnx.load(str(_ort_optimized("resnet_tiny", tmp_path)))
    every = discover(model).weights
    convs = {w.name for w in every if w.op_type in ("Conv", "FusedConv")}
    fused = {w.name for w in every if w.op_type == "FusedConv"}
    assert fused and convs - fused  # the model has both
    assert {w.name for w in discover(model, op_types=["Conv"]).weights} == convs
    assert {w.name for w in discover(model, op_types=["FusedConv"]).weights} == fused


def test_inspect_counts_macs_past_fused_ops_without_shape(tmp_path):
    """Shape inference stops at contrib ops; with only the batch dynamic, inspect measures the
    shapes with one onnxruntime run at batch 1 and counts every layer's MACs, as --shape does."""
    from fcpts_onnx.inspection import inspect_model

    path = _ort_optimized("resnet_tiny", tmp_path)
    auto = inspect_model(path)
    pinned = inspect_model(path, input_shapes={"input": (1, 3, 64, 64)})
    assert all(layer["macs"] for layer in auto["layers"])
    assert [layer["macs"] for layer in auto["layers"]] == [layer["macs"] for layer in pinned["layers"]]


def _transformer_optimized(tmp_path: Path, fp16: bool = False, fixed_batch: bool = False) -> Path:
    """bert_tiny through onnxruntime's transformers optimizer, as optimum's ORTOptimizer runs it:
    packed-QKV Attention fed by EmbedLayerNormalization's mask index, SkipLayerNormalization and
    BiasGelu, all in com.microsoft."""
    from onnxruntime.transformers.optimizer import optimize_model

    entry = zoo.ZOO["bert_tiny"]
    exported = zoo.export(entry.build(), entry.inputs(batch=2, seed=0), tmp_path / "bert.onnx", dynamo=False,
                          opset=17, input_names=entry.input_names, output_names=entry.output_names,
                          dynamic_axes=None if fixed_batch else entry.dynamic_axes)
    optimized = optimize_model(str(exported), model_type="bert", num_heads=4, hidden_size=64, opt_level=0)
    if fp16:  # as optimum's fp16 optimization writes it: fp16 inside, float32 inputs and outputs
        optimized.convert_float_to_float16(keep_io_types=True)
    path = tmp_path / "bert.fused.onnx"
    optimized.save_model_to_file(str(path))
    return path


def test_transformer_fused_bert_is_exact_and_sparsified(tmp_path):
    """The packed Q/K/V weight of com.microsoft Attention is pruned like the MatMuls it replaced;
    SkipLayerNormalization's and BiasGelu's folded biases and norms are tuned and written back."""
    from fcpts_onnx.inspection import inspect_model

    path = _transformer_optimized(tmp_path)
    model = onnx.load(str(path))
    ops = {n.op_type for n in model.graph.node if n.domain == "com.microsoft"}
    assert {"Attention", "SkipLayerNormalization", "EmbedLayerNormalization", "BiasGelu"} <= ops, ops
    weights = discover(model).weights
    packed = {w.name for w in weights if w.op_type == "Attention"}
    assert len(packed) == 2 and all(w.shape == (64, 192) for w in weights if w.name in packed)
    # MACs of the packed weight: every token times the [64, 192] weight (sequence 16, batch 1)
    layers = {layer["name"]: layer for layer in inspect_model(path, input_shapes={
        "input_ids": (1, 16), "attention_mask": (1, 16)})["layers"]}
    assert all(layers[name]["macs"] == 16 * 64 * 192 for name in packed)

    entry = zoo.ZOO["bert_tiny"]
    ids, mask = entry.inputs(batch=48, seed=3)
    calib = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    out = tmp_path / "bert.sparse.onnx"
    report = fcpts_onnx.sparsify(path, out, calib, sparsity=0.6, learn=LearnOptions(iters=8))
    parity = report.to_dict()["learning"]["parity"]  # refused before learning if it had failed
    assert parity["passed"] and parity["outputs"], parity
    assert report.zero_params == report.required_zeros == round(0.6 * report.total_params)
    written = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    assert all(0.2 < np.mean(written[name] == 0) < 0.98 for name in packed)
    original = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    norms = [n.input[2] for n in model.graph.node if n.op_type == "SkipLayerNormalization"]
    assert any(not np.array_equal(written[g], original[g]) for g in norms)  # the gammas were tuned

    feeds = {n: t.numpy() for n, t in zip(entry.input_names, entry.inputs(batch=2, seed=1))}
    dense = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    sparse = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert np.all(np.isfinite(sparse)) and not np.array_equal(sparse, dense)


def test_transformer_fused_fp16_bert_passes_parity_and_is_sparsified(tmp_path):
    """fp16 between float32 boundaries: onnxruntime's own rounding (about 1e-3 relative here)
    is above the float32 tolerance, so parity is judged at fp16's."""
    path = _transformer_optimized(tmp_path, fp16=True)
    model = onnx.load(str(path))
    packed = [t for t in model.graph.initializer if t.name in {w.name for w in discover(model).weights}
              and t.data_type == onnx.TensorProto.FLOAT16]
    assert packed
    entry = zoo.ZOO["bert_tiny"]
    ids, mask = entry.inputs(batch=32, seed=3)
    out = tmp_path / "bert16.sparse.onnx"
    report = fcpts_onnx.sparsify(path, out, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()},
                                 sparsity=0.5, learn=LearnOptions(iters=3))
    parity = report.to_dict()["learning"]["parity"]
    assert parity["passed"] and all(o["dtype"] == "float32" and o["tolerance"] == 1e-2 for o in parity["outputs"])
    assert report.zero_params == report.required_zeros == round(0.5 * report.total_params)
    written = {t.name: t for t in onnx.load(str(out)).graph.initializer}
    assert all(written[t.name].data_type == onnx.TensorProto.FLOAT16 for t in packed)


def test_fixed_batch_fused_graph_gets_macs_in_the_report_and_per_item_in_bench(tmp_path):
    """Shape inference stops at the fused ops and onnxruntime runs a fixed-batch graph at that
    batch only: the MACs are measured at it (they were unknown for 6 of 9 layers)."""
    from fcpts_onnx.bench import Budget, benchmark
    from fcpts_onnx.inspection import inspect_model

    path = _transformer_optimized(tmp_path, fixed_batch=True)
    entry = zoo.ZOO["bert_tiny"]
    ids, mask = entry.inputs(batch=16, seed=3)
    out = tmp_path / "fixed.sparse.onnx"
    report = fcpts_onnx.sparsify(path, out, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()},
                                 sparsity=0.5, learn=LearnOptions(iters=2))
    per_inference = {layer["name"]: layer["macs"] for layer in inspect_model(path)["layers"]}
    assert all(per_inference.values())  # inspect: one run at the graph's batch of 2
    assert {row.name: row.macs for row in report.layers} == per_inference
    result = benchmark([path, out], batch_sizes=[2], runtimes=["onnxruntime"],
                       budget=Budget(warmup=1, iterations=2, seconds=None))
    per_item = {layer["name"]: layer["macs"] for layer in result.models[0]["macs"]["layers"]}
    assert per_item == {name: macs // 2 for name, macs in per_inference.items()}
