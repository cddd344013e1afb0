"""Calibration readers: every accepted source, and a one-line actionable error for every bad one."""

from __future__ import annotations

import zipfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from fcpts_onnx.calibration import (
    DEFAULT_DYNAMIC_DIM,
    CalibrationSet,
    generate,
    graph_inputs,
    infer_layout,
    load_calibration,
)
from fcpts_onnx.errors import CalibrationError, FcptsError


def model_with_inputs(*inputs: tuple[str, int, list]) -> onnx.ModelProto:
    """A valid model whose graph inputs are ``inputs`` (name, elem type, dims), each fed to Identity."""
    nodes = [helper.make_node("Identity", [name], [f"{name}_out"]) for name, _, _ in inputs]
    graph = helper.make_graph(
        nodes, "calib",
        [helper.make_tensor_value_info(name, t, dims) for name, t, dims in inputs],
        [helper.make_tensor_value_info(f"{name}_out", t, dims) for name, t, dims in inputs],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


ONE = model_with_inputs(("x", TensorProto.FLOAT, ["N", 4]))
TWO = model_with_inputs(("a", TensorProto.FLOAT, ["N", 3]), ("b", TensorProto.FLOAT, ["N", 2, 2]))
STATIC_BATCH = model_with_inputs(("x", TensorProto.FLOAT, [4, 3]))


def data(n: int, *shape: int, seed: int = 0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(dtype)


def refused(source, model, *needles: str) -> str:
    """Assert load_calibration raises a one-line CalibrationError containing every needle."""
    with pytest.raises(CalibrationError) as info:
        load_calibration(source, model)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)
    assert isinstance(info.value, FcptsError) and info.value.exit_code == 2
    return message


# ------------------------------------------------------------------------------------------
# Accepted sources
# ------------------------------------------------------------------------------------------


def test_npz_with_the_right_key(tmp_path):
    x = data(5, 4)
    path = tmp_path / "calib.npz"
    np.savez(path, x=x)
    calib = load_calibration(path, ONE)
    assert isinstance(calib, CalibrationSet)
    assert calib.n_samples == 5 and not calib.generated
    assert set(calib.arrays) == {"x"}
    np.testing.assert_array_equal(calib.arrays["x"], x)
    assert str(path) in calib.source
    assert load_calibration(str(path), ONE).n_samples == 5  # str path too


def test_npz_two_inputs(tmp_path):
    a, b = data(6, 3), data(6, 2, 2, seed=1)
    np.savez_compressed(tmp_path / "c.npz", a=a, b=b)
    calib = load_calibration(tmp_path / "c.npz", TWO)
    assert calib.n_samples == 6
    np.testing.assert_array_equal(calib.arrays["a"], a)
    np.testing.assert_array_equal(calib.arrays["b"], b)


def test_npy_for_a_single_input_model(tmp_path):
    x = data(7, 4)
    np.save(tmp_path / "c.npy", x)
    calib = load_calibration(tmp_path / "c.npy", ONE)
    assert calib.n_samples == 7
    np.testing.assert_array_equal(calib.arrays["x"], x)


def test_dict():
    a, b = data(3, 3), data(3, 2, 2, seed=1)
    calib = load_calibration({"a": a, "b": b}, TWO)
    assert calib.n_samples == 3
    np.testing.assert_array_equal(calib.arrays["a"], a)
    np.testing.assert_array_equal(calib.arrays["b"], b)


def test_list_of_feed_dicts_is_concatenated():
    feeds = [{"a": data(2, 3, seed=i), "b": data(2, 2, 2, seed=10 + i)} for i in range(3)]
    feeds.append({"a": data(5, 3, seed=3), "b": data(5, 2, 2, seed=13)})
    calib = load_calibration(feeds, TWO)
    assert calib.n_samples == 11
    np.testing.assert_array_equal(calib.arrays["a"], np.concatenate([f["a"] for f in feeds]))
    np.testing.assert_array_equal(calib.arrays["b"], np.concatenate([f["b"] for f in feeds]))


def test_generator_of_feed_dicts():
    parts = [data(3, 4, seed=i) for i in range(4)]
    calib = load_calibration(({"x": p} for p in parts), ONE)
    assert calib.n_samples == 12
    np.testing.assert_array_equal(calib.arrays["x"], np.concatenate(parts))


class Reader:
    """The onnxruntime CalibrationDataReader protocol: get_next() -> feed dict, then None."""

    def __init__(self, parts):
        self.parts = parts
        self.i = 0

    def get_next(self):
        if self.i >= len(self.parts):
            return None
        self.i += 1
        return {"x": self.parts[self.i - 1]}


class RewindableReader(Reader):
    def rewind(self):
        self.i = 0


def test_calibration_data_reader():
    parts = [data(2, 4, seed=i) for i in range(5)]
    reader = Reader(parts)
    calib = load_calibration(reader, ONE)
    assert calib.n_samples == 10
    np.testing.assert_array_equal(calib.arrays["x"], np.concatenate(parts))
    assert reader.get_next() is None  # drained


def test_calibration_data_reader_is_rewound():
    parts = [data(2, 4, seed=i) for i in range(3)]
    reader = RewindableReader(parts)
    reader.get_next()  # partly consumed by the caller
    calib = load_calibration(reader, ONE)
    assert calib.n_samples == 6
    np.testing.assert_array_equal(calib.arrays["x"], np.concatenate(parts))


def test_none_generates_and_calibration_set_is_revalidated():
    calib = load_calibration(None, ONE)
    assert calib.generated and calib.arrays["x"].shape == (8, 4)
    good = CalibrationSet({"x": data(3, 4)}, "mine")
    assert load_calibration(good, ONE) is good
    with pytest.raises(CalibrationError, match="'x'"):
        load_calibration(CalibrationSet({"x": data(3, 5)}, "mine"), ONE)


def test_static_batch_accepts_multiples():
    calib = load_calibration({"x": data(8, 3)}, STATIC_BATCH)
    assert calib.n_samples == 8
    refused({"x": data(6, 3)}, STATIC_BATCH, "'x'", "6 samples", "fixed at 4", "multiple of 4")
    refused({"x": data(3, 3)}, STATIC_BATCH, "multiple of 4")


def test_integer_and_half_inputs_checked_by_dtype():
    model = model_with_inputs(("ids", TensorProto.INT64, ["N", 5]), ("h", TensorProto.FLOAT16, ["N", 2]))
    ids = np.arange(10, dtype=np.int64).reshape(2, 5)
    h = data(2, 2, dtype=np.float16)
    calib = load_calibration({"ids": ids, "h": h}, model)
    np.testing.assert_array_equal(calib.arrays["ids"], ids)
    refused({"ids": ids.astype(np.int32), "h": h}, model, "'ids'", "int32", "int64", ".astype('int64')")
    bad = h.copy()
    bad[0, 0] = np.inf
    refused({"ids": ids, "h": bad}, model, "'h'", "NaN or infinite")


# ------------------------------------------------------------------------------------------
# Refused sources: the message names the input and says what to do
# ------------------------------------------------------------------------------------------


def test_wrong_key_name(tmp_path):
    np.savez(tmp_path / "c.npz", input=data(4, 4))
    refused(tmp_path / "c.npz", ONE, "'input'", "x float32 [?, 4]", "rename")


def test_missing_input():
    refused({"a": data(4, 3)}, TWO, "'b'", "add it")


def test_extra_key():
    refused({"a": data(4, 3), "b": data(4, 2, 2), "c": data(4, 1)}, TWO, "'c'", "not among the model's inputs")


def test_wrong_dtype():
    refused({"x": data(4, 4, dtype=np.float64)}, ONE, "'x'", "float64", "float32", ".astype('float32')")


def test_wrong_rank():
    refused({"x": data(4, 4, 1)}, ONE, "'x'", "[4, 4, 1]", "rank 2", "sample axis")
    refused({"x": np.zeros(4, np.float32)}, ONE, "'x'", "rank 2")


def test_wrong_static_dim():
    refused({"a": data(4, 3), "b": data(4, 2, 3)}, TWO, "'b'", "[4, 2, 3]", "axis 2 must be 2")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values(bad):
    x = data(4, 4)
    x[2, 1] = bad
    refused({"x": x}, ONE, "'x'", "1 NaN or infinite", "clean")


def test_zero_samples():
    refused({"x": np.zeros((0, 4), np.float32)}, ONE, "'x'", "no samples", "at least one")
    refused([], ONE, "no arrays")


def test_different_sample_counts():
    refused({"a": data(3, 3), "b": data(4, 2, 2)}, TWO, "'a': 3", "'b': 4", "same number")


def test_feeds_with_different_inputs_or_not_dicts():
    refused([{"a": data(1, 3), "b": data(1, 2, 2)}, {"a": data(1, 3)}], TWO, "item 1", "same inputs")
    refused([data(2, 4)], ONE, "item 0", "not a dict")
    refused([{"x": data(2, 4)}, {"x": data(2, 5)}], ONE, "'x'", "different sample shapes")


def test_object_array_npy_refused(tmp_path):
    path = tmp_path / "c.npy"
    np.save(path, np.array([{"x": 1}, None], dtype=object), allow_pickle=True)
    refused(path, ONE, str(path), "object", "refused")


def test_object_array_npz_refused(tmp_path):
    path = tmp_path / "c.npz"
    np.savez(path, x=np.array([[1.0, "a"]], dtype=object))
    refused(path, ONE, str(path), "object", "refused")


def test_object_dict_refused():
    refused({"x": np.array([[1.0, None, 2.0, 3.0]], dtype=object)}, ONE, "'x'", "object array")


def test_npy_for_a_two_input_model(tmp_path):
    np.save(tmp_path / "c.npy", data(4, 3))
    refused(tmp_path / "c.npy", TWO, "2 inputs", "a, b", ".npz")


@pytest.mark.parametrize("name", ["c.csv", "c.pkl", "calib"])
def test_unknown_file_extension(tmp_path, name):
    (tmp_path / name).write_bytes(b"1,2,3\n")
    refused(tmp_path / name, ONE, "unsupported calibration file type", ".npz or .npy")


def test_missing_file(tmp_path):
    refused(tmp_path / "nope.npz", ONE, "nope.npz", "no such calibration file")


def test_corrupted_npz(tmp_path):
    path = tmp_path / "random.npz"
    path.write_bytes(np.random.default_rng(0).bytes(500))
    message = refused(path, ONE, str(path), "not a readable .npz")
    assert "object" not in message and "pickle" not in message  # it is corrupt, not pickled

    good = tmp_path / "good.npz"
    np.savez(good, x=data(100, 4))
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:300])
    refused(truncated, ONE, str(truncated), "not a readable .npz")

    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    refused(empty, ONE, str(empty), "not a readable .npz")

    with zipfile.ZipFile(tmp_path / "notnpy.npz", "w") as z:
        z.writestr("x.npy", b"garbage, not an npy header")
    refused(tmp_path / "notnpy.npz", ONE, "notnpy.npz", "'x'", "not a numpy array", "numpy.savez")


def test_corrupted_npy(tmp_path):
    path = tmp_path / "random.npy"
    path.write_bytes(np.random.default_rng(1).bytes(500))
    message = refused(path, ONE, str(path), "not a readable .npy")
    assert "object" not in message and "pickle" not in message

    good = tmp_path / "good.npy"
    np.save(good, data(100, 4))
    truncated = tmp_path / "truncated.npy"
    truncated.write_bytes(good.read_bytes()[:300])
    refused(truncated, ONE, str(truncated), "not a readable .npy")


def test_unsupported_source_type():
    refused(42, ONE, "int", ".npz")


# ------------------------------------------------------------------------------------------
# generate()
# ------------------------------------------------------------------------------------------


def test_generate_respects_declared_shapes():
    model = model_with_inputs(
        ("x", TensorProto.FLOAT, ["N", 3, "H", 5]),
        ("fixed", TensorProto.FLOAT16, [4, 2]),
        ("ids", TensorProto.INT64, ["N", 7]),
    )
    specs = graph_inputs(model)
    calib = generate(specs, n_samples=5, seed=1)
    assert calib.generated
    # One input fixes the batch at 4, so every input gets the same multiple of 4 samples
    # (before, x had 5 and "fixed" 4, and splitting them indexed past the end of "fixed").
    assert calib.arrays["x"].shape == (8, 3, DEFAULT_DYNAMIC_DIM, 5) and calib.arrays["x"].dtype == np.float32
    assert calib.arrays["fixed"].shape == (8, 2) and calib.arrays["fixed"].dtype == np.float16
    assert calib.arrays["ids"].shape == (8, 7) and calib.arrays["ids"].dtype == np.int64
    assert calib.take(np.arange(4, 8)).arrays["fixed"].shape == (4, 2)
    assert not calib.arrays["ids"].any()
    assert np.all(np.isfinite(calib.arrays["x"])) and calib.arrays["x"].std() > 0.5
    again = generate(specs, n_samples=5, seed=1)
    np.testing.assert_array_equal(calib.arrays["x"], again.arrays["x"])  # seeded


def test_generate_follows_a_fixed_batch_of_one():
    """A streaming export: the signal's first axis is dynamic, the state's is fixed at 1 (silero-vad's
    sequence model). Every input gets the same sample count, so a split takes the same rows of each."""
    model = model_with_inputs(("signal", TensorProto.FLOAT, ["T", 576]), ("h", TensorProto.FLOAT, [1, 1, 128]))
    calib = generate(graph_inputs(model), n_samples=6)
    assert calib.arrays["signal"].shape == (6, 576) and calib.arrays["h"].shape == (6, 1, 128)
    assert calib.take(np.array([1, 5])).arrays["h"].shape == (2, 1, 128)


@pytest.mark.parametrize("inputs, layout", [
    # were refused before the layouts: now the state keeps its samples on axis 1, the rate is a setting
    ((("x", TensorProto.FLOAT, [1, 576]), ("state", TensorProto.FLOAT, [2, 1, 128])), {"state": 1}),
    ((("x", TensorProto.FLOAT, ["N", 576]), ("sr", TensorProto.INT64, [])), {"sr": None}),
])
def test_layouts_of_streaming_inputs(inputs, layout):
    assert dict(infer_layout(graph_inputs(model_with_inputs(*inputs))).inputs) == layout
    assert infer_layout(graph_inputs(TWO)).trivial
    assert infer_layout(graph_inputs(STATIC_BATCH)).trivial
    assert infer_layout(graph_inputs(model_with_inputs(
        ("x", TensorProto.FLOAT, ["N", 3]), ("h", TensorProto.FLOAT, [1, 1, 4])))).trivial


def test_generate_shape_overrides():
    model = model_with_inputs(("x", TensorProto.FLOAT, ["N", 3, "H", "W"]), ("y", TensorProto.FLOAT, ["N", 2]))
    calib = generate(graph_inputs(model), shapes={"x": (2, 3, 9, 11)})
    assert calib.arrays["x"].shape == (2, 3, 9, 11)
    assert calib.arrays["y"].shape == (8, 2)  # default n_samples, not overridden


def test_generate_refuses_unknown_rank():
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    specs = graph_inputs(helper.make_model(graph))
    assert specs[0].dims is None
    with pytest.raises(CalibrationError, match="'x'.*--calib"):
        generate(specs)
    assert generate(specs, shapes={"x": (3, 4)}).arrays["x"].shape == (3, 4)


def test_initializer_inputs_are_not_calibration_inputs():
    model = model_with_inputs(("x", TensorProto.FLOAT, ["N", 4]), ("w", TensorProto.FLOAT, [4]))
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(4, np.float32), "w"))
    assert [s.name for s in graph_inputs(model)] == ["x"]
    assert set(load_calibration({"x": data(2, 4)}, model).arrays) == {"x"}
