"""RNN, GRU and LSTM of the trainable form against onnxruntime, property-based over
directions, sizes, sequence lengths, optional inputs and outputs, activations and clip;
plus real torch exports (nn.LSTM/nn.GRU/nn.RNN through the legacy exporter).

onnxruntime has no kernel for ``layout=1`` (it refuses it), so that layout is checked
against onnxruntime's layout 0 on the same tensors transposed.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from onnx import helper
from torch import nn

from fcpts_onnx.discovery import discover
from fcpts_onnx.errors import UnsupportedModelError
from fcpts_onnx.torchform import OnnxModule

from .harness import assert_close, run_both, single_node_model
from .test_models import _check_gradients, _check_outputs
from .test_ops_nn import SETTINGS, TOL, assert_refused, rand, seeds

GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
ACTIVATIONS_PER_DIRECTION = {"RNN": 1, "GRU": 2, "LSTM": 3}
# An example costs milliseconds: five times the nn ops' count (FCPTS_NN_EXAMPLES scales both).
MORE = settings(SETTINGS, max_examples=5 * SETTINGS.max_examples)
ACTIVATIONS = ["Sigmoid", "Tanh", "Relu", "HardSigmoid", "LeakyRelu", "ThresholdedRelu", "ScaledTanh", "Affine",
               "Elu", "Softsign", "Softplus"]


def recurrent_case(data, seed: int, op: str, *, layout: int = 0, opset: int = 17):
    """A random ``op`` node with its feeds (X, sequence_lens, initial states) and initializers
    (W, R, B, P); each optional input, each output and each attribute drawn present or not."""
    direction = data.draw(st.sampled_from(["forward", "reverse", "bidirectional"]), label="direction")
    dirs = 2 if direction == "bidirectional" else 1
    steps, batch = data.draw(st.integers(1, 5), label="steps"), data.draw(st.integers(1, 3), label="batch")
    hidden, features = data.draw(st.integers(1, 4), label="hidden"), data.draw(st.integers(1, 3), label="input")
    gates = GATES[op]
    feeds = {"X": rand(seed, *((steps, batch, features) if layout == 0 else (batch, steps, features)))}
    inits = {"W": rand(seed + 1, dirs, gates * hidden, features), "R": rand(seed + 2, dirs, gates * hidden, hidden)}
    names = ["X", "W", "R", "", "", "", "", ""]
    if data.draw(st.booleans(), label="B"):
        inits["B"], names[3] = rand(seed + 3, dirs, 2 * gates * hidden), "B"
    if data.draw(st.booleans(), label="sequence_lens"):
        lens = data.draw(st.lists(st.integers(0, steps), min_size=batch, max_size=batch), label="lens")
        feeds["L"], names[4] = np.array(lens, dtype=np.int32), "L"
    state = (dirs, batch, hidden) if layout == 0 else (batch, dirs, hidden)
    if data.draw(st.booleans(), label="initial_h"):
        feeds["H0"], names[5] = rand(seed + 4, *state), "H0"
    if op == "LSTM" and data.draw(st.booleans(), label="initial_c"):
        feeds["C0"], names[6] = rand(seed + 5, *state), "C0"
    if op == "LSTM" and data.draw(st.booleans(), label="P"):
        inits["P"], names[7] = rand(seed + 6, dirs, 3 * hidden), "P"
    while not names[-1]:
        names.pop()

    attrs = {"hidden_size": hidden, "direction": direction}
    if layout:
        attrs["layout"] = layout
    if data.draw(st.booleans(), label="custom activations"):
        n = ACTIVATIONS_PER_DIRECTION[op] * dirs
        attrs["activations"] = data.draw(st.lists(st.sampled_from(ACTIVATIONS), min_size=n, max_size=n))
        # fewer values than activations that take them: the rest get onnxruntime's defaults
        alphas = data.draw(st.lists(st.floats(0.1, 1.5), max_size=n), label="alphas")
        betas = data.draw(st.lists(st.floats(-0.5, 1.5), max_size=n), label="betas")
        attrs.update({k: v for k, v in (("activation_alpha", alphas), ("activation_beta", betas)) if v})
    if data.draw(st.booleans(), label="clip"):
        attrs["clip"] = data.draw(st.floats(0.1, 3.0))
    if op == "GRU" and data.draw(st.booleans()):
        attrs["linear_before_reset"] = 1
    if op == "LSTM" and data.draw(st.booleans()):
        attrs["input_forget"] = 1

    n_outputs = 3 if op == "LSTM" else 2
    wanted = data.draw(st.integers(1, 2**n_outputs - 1), label="outputs")  # a non-empty subset, as bits
    outputs = [name if wanted >> i & 1 else "" for i, name in enumerate(["Y", "Y_h", "Y_c"][:n_outputs])]
    while not outputs[-1]:
        outputs.pop()
    return helper.make_node(op, names, outputs, **attrs), feeds, inits


@MORE
@given(data=st.data(), seed=seeds, op=st.sampled_from(["RNN", "GRU", "LSTM"]), opset=st.sampled_from([7, 14, 22]))
def test_recurrent_matches_onnxruntime(data, seed, op, opset):
    node, feeds, inits = recurrent_case(data, seed, op, opset=opset)
    model = single_node_model(node, feeds, opset=opset, initializers=inits)
    reference, ours = run_both(model, feeds)
    assume(all(np.isfinite(v).all() for v in reference.values()))  # unbounded activations can overflow
    assert set(ours) == set(reference)
    assert_close(reference, ours, **TOL)


@MORE
@given(data=st.data(), seed=seeds, op=st.sampled_from(["RNN", "GRU", "LSTM"]))
def test_layout_1_is_layout_0_transposed(data, seed, op):
    """Batch-first tensors give onnxruntime's layout-0 results, transposed the same way."""
    node, feeds, inits = recurrent_case(data, seed, op, layout=1, opset=14)
    ours = OnnxModule(single_node_model(node, feeds, opset=14, initializers=inits))
    with torch.no_grad():
        got = {k: v.numpy() for k, v in ours.run({k: torch.from_numpy(v) for k, v in feeds.items()}).items()}
    time_major = {k: v if k == "L" else np.swapaxes(v, 0, 1) for k, v in feeds.items()}
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "layout"}
    as_layout_0 = helper.make_node(op, list(node.input), list(node.output), **attrs)
    reference, _ = run_both(single_node_model(as_layout_0, time_major, opset=14, initializers=inits), time_major)
    assume(all(np.isfinite(v).all() for v in reference.values()))
    # Y [seq, dirs, batch, hidden] -> [batch, seq, dirs, hidden]; states swap dirs and batch.
    batch_first = {k: v.transpose(2, 0, 1, 3) if k == "Y" else np.swapaxes(v, 0, 1) for k, v in reference.items()}
    assert_close(batch_first, got, **TOL)


@pytest.mark.parametrize("op", ["RNN", "GRU", "LSTM"])
def test_sequence_lens_zero_fill_and_last_valid_state(op):
    """Past its length a sequence writes zeros to Y, Y_h holds its last valid step, and a
    sequence of length 0 ends with zero states, not its initial ones (onnxruntime's rule)."""
    hidden, dirs = 2, 2
    names = ["X", "W", "R", "", "L", "H0"]
    feeds = {"X": rand(0, 4, 3, 2), "L": np.array([4, 2, 0], dtype=np.int32), "H0": rand(1, dirs, 3, hidden)}
    inits = {"W": rand(2, dirs, GATES[op] * hidden, 2), "R": rand(3, dirs, GATES[op] * hidden, hidden)}
    outputs = ["Y", "Y_h"]
    node = helper.make_node(op, names, outputs, hidden_size=hidden, direction="bidirectional")
    reference, ours = run_both(single_node_model(node, feeds, initializers=inits), feeds)
    assert_close(reference, ours, **TOL)
    y, y_h = ours["Y"], ours["Y_h"]
    assert np.all(y[2:, :, 1] == 0) and np.all(y[:, :, 2] == 0) and np.all(y_h[:, 2] == 0)
    np.testing.assert_array_equal(y_h[0, 1], y[1, 0, 1])  # forward: the last valid step
    np.testing.assert_array_equal(y_h[1, 1], y[0, 1, 1])  # reverse: ends at step 0


def test_refuses_unknown_activation_and_short_activation_list():
    feeds = {"X": rand(0, 2, 1, 2)}
    inits = {"W": rand(1, 2, 4, 2), "R": rand(2, 2, 4, 1)}
    unknown = helper.make_node("LSTM", ["X", "W", "R"], ["Y"], hidden_size=1, direction="bidirectional",
                               activations=["Sigmoid", "Tanh", "Gelu"] * 2)
    module = OnnxModule(single_node_model(unknown, feeds, initializers=inits))
    assert_refused(module, {"X": torch.from_numpy(feeds["X"])}, "activation 'Gelu'")
    # onnxruntime refuses one direction's list for a bidirectional node; so do we
    short = helper.make_node("LSTM", ["X", "W", "R"], ["Y"], hidden_size=1, direction="bidirectional",
                             activations=["Sigmoid", "Tanh", "Tanh"])
    module = OnnxModule(single_node_model(short, feeds, initializers=inits))
    assert_refused(module, {"X": torch.from_numpy(feeds["X"])}, "3 activations for 2 direction")


def test_opset_before_7_is_unsupported():
    feeds = {"X": rand(0, 2, 1, 2)}
    node = helper.make_node("GRU", ["X", "W", "R"], ["Y"], hidden_size=1)
    model = single_node_model(node, feeds, opset=6, initializers={"W": rand(1, 1, 3, 2), "R": rand(2, 1, 3, 1)})
    with pytest.raises(UnsupportedModelError, match="GRU"):
        OnnxModule(model)


# -- real exports ----------------------------------------------------------------------------


class _Recurrent(nn.Module):
    def __init__(self, kind: str, bidirectional: bool, layers: int):
        super().__init__()
        self.rnn = getattr(nn, kind)(4, 5, num_layers=layers, bidirectional=bidirectional, batch_first=True)
        self.head = nn.Linear(5 * (2 if bidirectional else 1), 3)

    def forward(self, x):
        y, state = self.rnn(x)
        h = state[0] if isinstance(state, tuple) else state
        return self.head(y), h


def export_recurrent(kind: str, path, *, bidirectional: bool = True, layers: int = 2, seed: int = 0):
    """A torch nn.LSTM/GRU/RNN + Linear exported by the legacy exporter at opset 17, dynamic batch and time."""
    torch.manual_seed(seed)
    model = _Recurrent(kind, bidirectional, layers).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 6, 4),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y", "h"],
                          dynamic_axes={"x": {0: "batch", 1: "time"}, "y": {0: "batch", 1: "time"}})
    return onnx.load(str(path))


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_torch_export_matches_onnxruntime_and_trains(kind, tmp_path):
    model = export_recurrent(kind, tmp_path / f"{kind}.onnx")
    assert sum(n.op_type == kind for n in model.graph.node) == 2  # one node per layer, both directions
    found = discover(model)
    # each layer's W and R, and the head
    assert sorted(w.op_type for w in found.weights) == sorted([kind] * 4 + ["MatMul"])
    module = OnnxModule(model, prunable=found.weights)
    assert len(module.parameters_by_role("bias")) == 3  # two recurrent B, the head's bias
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch, steps in ((2, 6), (3, 1), (1, 9)):
        _check_outputs(model, session, module, {"x": rand(batch, batch, steps, 4)})
    _check_gradients(module, {"x": rand(7, 2, 5, 4)})
