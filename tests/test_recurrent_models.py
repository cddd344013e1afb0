"""Recurrent models end to end: torch nn.LSTM / nn.GRU + Linear exported by the legacy
exporter (opset 17), their W and R found prunable, learned with fcpts, written back and run
by onnxruntime."""

from __future__ import annotations

import math
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import fcpts_onnx
from fcpts_onnx.discovery import assign_macs, discover
from fcpts_onnx.learner.fcpts import output_axis
from fcpts_onnx.learner.options import LearnOptions

STEPS, FEATURES, HIDDEN = 6, 4, 8


class Tagger(nn.Module):
    """A recurrent layer over the sequence, then a Linear on every step."""

    def __init__(self, kind: str, layers: int):
        super().__init__()
        self.rnn = getattr(nn, kind)(FEATURES, HIDDEN, num_layers=layers, bidirectional=True, batch_first=True)
        self.head = nn.Linear(2 * HIDDEN, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


def export(kind: str, path, layers: int = 1):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Tagger(kind, layers).eval(), (torch.randn(2, STEPS, FEATURES),), str(path), dynamo=False,
                          opset_version=17, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    return path


@pytest.mark.parametrize(("kind", "gates"), [("LSTM", 4), ("GRU", 3), ("RNN", 1)])
def test_recurrent_weights_are_found_with_axes_and_macs(kind, gates, tmp_path):
    model = onnx.load(str(export(kind, tmp_path / "m.onnx", layers=2)))
    found = discover(model)
    recurrent = [w for w in found.weights if w.op_type == kind]
    assert [c.input_index for w in recurrent for c in w.consumers] == [1, 2, 1, 2]  # W, R of each layer
    assert [w.shape for w in recurrent] == [(2, gates * HIDDEN, FEATURES), (2, gates * HIDDEN, HIDDEN),
                                           (2, gates * HIDDEN, 2 * HIDDEN), (2, gates * HIDDEN, HIDDEN)]
    nodes = model.graph.node
    attrs_of = lambda c: {a.name: a.i for a in nodes[c.node_index].attribute}  # noqa: E731
    assert {output_axis(w, attrs_of) for w in recurrent} == {1}  # the gates * hidden rows
    # every step multiplies by all of W and R, per batch item
    assign_macs(model, found.weights, {"x": (1, STEPS, FEATURES)})
    assert [w.macs for w in recurrent] == [STEPS * w.size for w in recurrent]
    assert {w.op_type for w in discover(model, op_types=[kind]).weights} == {kind}


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_fcpts_prunes_recurrent_weights_to_the_exact_target(kind, tmp_path):
    path = export(kind, tmp_path / f"{kind}.onnx")
    calib = tmp_path / "calib.npz"
    rng = np.random.default_rng(0)
    np.savez(calib, x=rng.standard_normal((40, STEPS, FEATURES)).astype(np.float32))
    out = tmp_path / f"{kind}.sparse.onnx"
    report = fcpts_onnx.sparsify(path, out, calib, sparsity=0.5, method="fcpts", learn=LearnOptions(iters=5),
                                 report_path=False)

    written = onnx.load(str(out))
    weights = discover(written).weights
    zeros = {w.name: int(np.count_nonzero(w.values(written) == 0)) for w in weights}
    total = sum(w.size for w in weights)
    assert sum(zeros.values()) == math.floor(0.5 * total + 0.5) == report.zero_params
    recurrent = [w for w in weights if w.op_type == kind]
    assert len(recurrent) == 2 and all(zeros[w.name] > 0 for w in recurrent)
    # the learner keeps the largest weight of every gate row (axis 1) in each tensor
    for w in recurrent:
        assert np.all(np.abs(w.values(written)).max(axis=(0, 2)) > 0)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": rng.standard_normal((3, STEPS, FEATURES)).astype(np.float32)})
    assert y.shape == (3, STEPS, 3) and np.isfinite(y).all()


def test_erk_counts_each_direction_as_its_own_matrix(tmp_path):
    """ERK's density follows fan-in + fan-out of one [gates * hidden, input] matrix: the
    direction axis of a bidirectional layer is not a kernel axis."""
    from fcpts_onnx.allocation.erk import erk_ratios

    model = onnx.load(str(export("LSTM", tmp_path / "m.onnx")))
    found = discover(model)
    w, r = [w for w in found.weights if w.op_type == "LSTM"]
    assert w.matrix_shape == (4 * HIDDEN, FEATURES) and r.matrix_shape == (4 * HIDDEN, HIDDEN)
    head = next(x for x in found.weights if x.op_type != "LSTM")
    assert head.matrix_shape == head.shape
    ratio = erk_ratios([w.matrix_shape])[0]
    assert ratio == pytest.approx((4 * HIDDEN + FEATURES) / (4 * HIDDEN * FEATURES))
