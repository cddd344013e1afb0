"""Small ONNX graphs covering every weight-storage form discovery must handle.

Every builder returns an ``onnx.ModelProto`` (opset 17, IR version 8 unless noted) with
seeded random float weights, explicit node names, graph input ``x`` and output ``y``.
Names used by the tests are module constants or documented in each builder.
"""

from __future__ import annotations

import os
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
F32 = TensorProto.FLOAT


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def rand(shape, seed: int = 0, dtype=np.float32) -> np.ndarray:
    """Standard-normal values with no exact zeros (so every zero in a test is deliberate)."""
    values = rng(seed).standard_normal(shape).astype(np.float32)
    values[values == 0] = 0.5
    return values.astype(dtype)


def tensor(name: str, values: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(values, name)


def vi(name: str, elem_type: int, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, shape)


def model(nodes, inputs, outputs, initializers=(), *, opset: int = OPSET, ir_version: int = IR_VERSION,
          extra_opsets=(), name: str = "g", metadata: dict[str, str] | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), name, list(inputs), list(outputs), list(initializers))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
    m = helper.make_model(graph, opset_imports=opsets, ir_version=ir_version, producer_name="fcpts-tests")
    for key, value in (metadata or {}).items():
        m.metadata_props.add(key=key, value=value)
    return m


def save(m: onnx.ModelProto, path: str | os.PathLike, *, external: bool = False,
         location: str = "w.data") -> Path:
    """Write ``m`` to ``path``; with ``external`` every tensor goes to ``location`` next to it."""
    path = Path(path)
    if external:
        copy = onnx.ModelProto()
        copy.CopyFrom(m)
        onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=location, size_threshold=0)
    else:
        onnx.save_model(m, str(path))
    return path


# ---------------------------------------------------------------------------------------------
# Conv family


def conv(c_in: int = 4, c_out: int = 6, k: int = 3, group: int = 1, hw: int = 8, batch: int = 1,
         bias: bool = True, seed: int = 0) -> onnx.ModelProto:
    """x[batch, c_in, hw, hw] -> Conv 'conv' (weight 'W' [c_out, c_in/group, k, k], bias 'B') -> y.

    No padding, stride 1: y is [batch, c_out, hw-k+1, hw-k+1].
    """
    w = rand((c_out, c_in // group, k, k), seed)
    inits = [tensor("W", w)]
    inputs = ["x", "W"]
    if bias:
        inits.append(tensor("B", rand((c_out,), seed + 1)))
        inputs.append("B")
    out = hw - k + 1
    node = helper.make_node("Conv", inputs, ["y"], name="conv", group=group, kernel_shape=[k, k])
    return model([node], [vi("x", F32, [batch, c_in, hw, hw])], [vi("y", F32, [batch, c_out, out, out])], inits)


def grouped_conv() -> onnx.ModelProto:
    return conv(c_in=4, c_out=6, group=2)


def depthwise_conv() -> onnx.ModelProto:
    return conv(c_in=4, c_out=4, group=4)


def conv_transpose(c_in: int = 4, c_out: int = 6, k: int = 3, group: int = 1, hw: int = 5,
                   seed: int = 0) -> onnx.ModelProto:
    """x[1, c_in, hw, hw] -> ConvTranspose 'deconv' (weight 'W' [c_in, c_out/group, k, k], bias 'B') -> y.

    y is [1, c_out, hw+k-1, hw+k-1].
    """
    w = rand((c_in, c_out // group, k, k), seed)
    inits = [tensor("W", w), tensor("B", rand((c_out,), seed + 1))]
    node = helper.make_node("ConvTranspose", ["x", "W", "B"], ["y"], name="deconv", group=group,
                            kernel_shape=[k, k])
    out = hw + k - 1
    return model([node], [vi("x", F32, [1, c_in, hw, hw])], [vi("y", F32, [1, c_out, out, out])], inits)


def grouped_conv_transpose() -> onnx.ModelProto:
    return conv_transpose(c_in=4, c_out=6, group=2)


# ---------------------------------------------------------------------------------------------
# Gemm / MatMul


def gemm(trans_b: int = 1, m: int = 3, k: int = 8, n: int = 5, seed: int = 0) -> onnx.ModelProto:
    """x[m, k] -> Gemm 'gemm' (weight 'W' [n, k] if trans_b else [k, n], bias 'C' [n]) -> y[m, n]."""
    w = rand((n, k) if trans_b else (k, n), seed)
    inits = [tensor("W", w), tensor("C", rand((n,), seed + 1))]
    node = helper.make_node("Gemm", ["x", "W", "C"], ["y"], name="gemm", transB=trans_b, alpha=1.0, beta=1.0)
    return model([node], [vi("x", F32, [m, k])], [vi("y", F32, [m, n])], inits)


def gemm_weight_a(m: int = 5, k: int = 8, n: int = 3, seed: int = 0) -> onnx.ModelProto:
    """Constant A: Gemm 'gemm'(A='W' [k, m], B=x [k, n], transA=1) -> y[m, n] = W^T @ x."""
    inits = [tensor("W", rand((k, m), seed))]
    node = helper.make_node("Gemm", ["W", "x"], ["y"], name="gemm", transA=1)
    return model([node], [vi("x", F32, [k, n])], [vi("y", F32, [m, n])], inits)


def matmul(m: int = 3, k: int = 8, n: int = 5, seed: int = 0, dynamic_batch: bool = False) -> onnx.ModelProto:
    """x[m, k] @ 'W'[k, n] -> y (node 'mm')."""
    inits = [tensor("W", rand((k, n), seed))]
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    rows = "batch" if dynamic_batch else m
    return model([node], [vi("x", F32, [rows, k])], [vi("y", F32, [rows, n])], inits)


def matmul_via_transpose(m: int = 3, k: int = 8, n: int = 5, seed: int = 0, perm: bool = True,
                          constant: bool = False, depth: int = 1) -> onnx.ModelProto:
    """x[m, k] @ Transpose('W'[n, k]) -> y (node 'mm'): how the dynamo exporter writes Linear
    with its optimizer off. ``perm=False`` leaves the attribute out (reverse the axes);
    ``depth`` 2 adds a second Transpose (back and forth, then once more)."""
    w = rand((n, k), seed) if depth % 2 else rand((k, n), seed)
    nodes, inits, name = [], [], "W"
    if constant:
        nodes.append(helper.make_node("Constant", [], ["W"], name="w_const", value=tensor("W", w)))
    else:
        inits.append(tensor("W", w))
    for i in range(depth):
        attrs = {"perm": [1, 0]} if perm else {}
        nodes.append(helper.make_node("Transpose", [name], [f"W_t{i}"], name=f"t{i}", **attrs))
        name = f"W_t{i}"
    nodes.append(helper.make_node("MatMul", ["x", name], ["y"], name="mm"))
    return model(nodes, [vi("x", F32, [m, k])], [vi("y", F32, [m, n])], inits)


def conv_via_transpose(c_in: int = 4, c_out: int = 6, k: int = 3, hw: int = 8, seed: int = 0) -> onnx.ModelProto:
    """A TensorFlow-layout weight 'W' [k, k, c_in, c_out] (HWIO) -> Transpose [3, 2, 0, 1] -> Conv 'conv'."""
    w = rand((k, k, c_in, c_out), seed)
    nodes = [helper.make_node("Transpose", ["W"], ["W_oihw"], name="to_oihw", perm=[3, 2, 0, 1]),
             helper.make_node("Conv", ["x", "W_oihw"], ["y"], name="conv", kernel_shape=[k, k])]
    out = hw - k + 1
    return model(nodes, [vi("x", F32, [1, c_in, hw, hw])], [vi("y", F32, [1, c_out, out, out])], [tensor("W", w)])


def matmul_left(m: int = 5, k: int = 8, n: int = 3, seed: int = 0) -> onnx.ModelProto:
    """'W'[m, k] @ x[k, n] -> y[m, n] (node 'mm'): the weight is the LEFT operand."""
    inits = [tensor("W", rand((m, k), seed))]
    node = helper.make_node("MatMul", ["W", "x"], ["y"], name="mm")
    return model([node], [vi("x", F32, [k, n])], [vi("y", F32, [m, n])], inits)


def matmul_batched(b: int = 2, m: int = 3, k: int = 4, n: int = 5, seed: int = 0) -> onnx.ModelProto:
    """x[b, m, k] @ 'W'[b, k, n] -> y[b, m, n] (node 'mm'): a batched 3-D constant weight."""
    inits = [tensor("W", rand((b, k, n), seed))]
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    return model([node], [vi("x", F32, [b, m, k])], [vi("y", F32, [b, m, n])], inits)


# ---------------------------------------------------------------------------------------------
# Storage forms


def matmul_constant(m: int = 3, k: int = 8, n: int = 5, seed: int = 0) -> onnx.ModelProto:
    """The weight is the output 'W' of Constant node 'w_const' (value attribute); MatMul 'mm'."""
    const = helper.make_node("Constant", [], ["W"], name="w_const", value=tensor("W", rand((k, n), seed)))
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    return model([const, node], [vi("x", F32, [m, k])], [vi("y", F32, [m, n])])


def conv_constant(seed: int = 0) -> onnx.ModelProto:
    """Conv 'conv' whose weight 'W' [6, 4, 3, 3] is the output of Constant node 'w_const'."""
    const = helper.make_node("Constant", [], ["W"], name="w_const", value=tensor("W", rand((6, 4, 3, 3), seed)))
    node = helper.make_node("Conv", ["x", "W"], ["y"], name="conv", kernel_shape=[3, 3])
    return model([const, node], [vi("x", F32, [1, 4, 8, 8])], [vi("y", F32, [1, 6, 6, 6])])


def matmul_identity(depth: int = 1, constant: bool = False, m: int = 3, k: int = 8, n: int = 5,
                    seed: int = 0) -> onnx.ModelProto:
    """MatMul 'mm' reads 'W' through ``depth`` Identity nodes ('id0', 'id1', ...).

    The source is initializer 'W', or Constant node 'w_const' with output 'W' if ``constant``.
    """
    nodes, inits = [], []
    w = rand((k, n), seed)
    if constant:
        nodes.append(helper.make_node("Constant", [], ["W"], name="w_const", value=tensor("W", w)))
    else:
        inits.append(tensor("W", w))
    prev = "W"
    for i in range(depth):
        nodes.append(helper.make_node("Identity", [prev], [f"W_id{i}"], name=f"id{i}"))
        prev = f"W_id{i}"
    nodes.append(helper.make_node("MatMul", ["x", prev], ["y"], name="mm"))
    return model(nodes, [vi("x", F32, [m, k])], [vi("y", F32, [m, n])], inits)


def shared_matmul(m: int = 3, k: int = 6, seed: int = 0, via_identity: bool = False) -> onnx.ModelProto:
    """One weight 'W'[k, k] read by MatMul 'mm1' (x @ W) and MatMul 'mm2' (h @ W).

    With ``via_identity`` the second reader goes through Identity 'id0'.
    """
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm1")]
    second = "W"
    if via_identity:
        nodes.append(helper.make_node("Identity", ["W"], ["W_id"], name="id0"))
        second = "W_id"
    nodes.append(helper.make_node("MatMul", ["h", second], ["y"], name="mm2"))
    return model(nodes, [vi("x", F32, [m, k])], [vi("y", F32, [m, k])], [tensor("W", rand((k, k), seed))])


def shared_conv(c: int = 4, hw: int = 8, seed: int = 0) -> onnx.ModelProto:
    """One weight 'W'[c, c, 3, 3] read by Conv 'conv1' and Conv 'conv2' (padding 1 keeps hw)."""
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["h"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["h", "W"], ["y"], name="conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    ]
    return model(nodes, [vi("x", F32, [1, c, hw, hw])], [vi("y", F32, [1, c, hw, hw])],
                 [tensor("W", rand((c, c, 3, 3), seed))])


def mixed(seed: int = 0, zeros_in_w2: float = 0.4) -> onnx.ModelProto:
    """A small CNN with every storage form and pre-existing zeros.

    x[2, 3, 6, 6] -> Conv 'conv' ('Wc' [4, 3, 3, 3] initializer, bias 'Bc') -> Relu -> Flatten
    -> Gemm 'fc1' ('W1' [64, 16] transB=1, behind Identity 'id_w1'; bias 'B1') -> Relu
    -> MatMul 'fc2' ('W2' [16, 10], Constant node 'w2_const', ``zeros_in_w2`` exact zeros)
    -> Add 'add' (non-prunable 'B2') -> y[2, 10].
    Also carries a non-fcpts metadata prop {"author": "tests"}.
    """
    r = rng(seed + 100)
    w2 = rand((16, 10), seed + 2)
    w2.reshape(-1)[r.permutation(w2.size)[: int(round(zeros_in_w2 * w2.size))]] = 0.0
    nodes = [
        helper.make_node("Conv", ["x", "Wc", "Bc"], ["c"], name="conv", kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c"], ["c_relu"], name="relu1"),
        helper.make_node("Flatten", ["c_relu"], ["flat"], name="flatten", axis=1),
        helper.make_node("Identity", ["W1"], ["W1_id"], name="id_w1"),
        helper.make_node("Gemm", ["flat", "W1_id", "B1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["h_relu"], name="relu2"),
        helper.make_node("Constant", [], ["W2"], name="w2_const", value=tensor("W2", w2)),
        helper.make_node("MatMul", ["h_relu", "W2"], ["z"], name="fc2"),
        helper.make_node("Add", ["z", "B2"], ["y"], name="add"),
    ]
    inits = [
        tensor("Wc", rand((4, 3, 3, 3), seed)), tensor("Bc", rand((4,), seed + 3)),
        tensor("W1", rand((16, 64), seed + 1)), tensor("B1", rand((16,), seed + 4)),
        tensor("B2", rand((10,), seed + 5)),
    ]
    return model(nodes, [vi("x", F32, [2, 3, 6, 6])], [vi("y", F32, [2, 10])], inits,
                 metadata={"author": "tests"})


def mlp_big(seed: int = 0) -> onnx.ModelProto:
    """x[4, 32] @ 'W1'[32, 32] -> Relu -> Gemm 'fc2' ('W2' [16, 32] transB=1, 'B2') -> y[4, 16].

    Weights are 4 KiB and 2 KiB: above the 1 KiB external-data threshold of the writer.
    """
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["h_relu"], name="relu"),
        helper.make_node("Gemm", ["h_relu", "W2", "B2"], ["y"], name="fc2", transB=1),
    ]
    inits = [tensor("W1", rand((32, 32), seed)), tensor("W2", rand((16, 32), seed + 1)),
             tensor("B2", rand((16,), seed + 2))]
    return model(nodes, [vi("x", F32, [4, 32])], [vi("y", F32, [4, 16])], inits)


# ---------------------------------------------------------------------------------------------
# Low-precision weights


def fp16_model(seed: int = 0) -> onnx.ModelProto:
    """Whole-graph fp16: Conv 'conv' ('Wc' [4,3,3,3]) -> Flatten -> Gemm 'fc1' ('W1' [8, 64] transB=1)
    -> MatMul 'fc2' ('W2' [8, 5], Constant node 'w2_const') -> y[2, 5]."""
    h16 = TensorProto.FLOAT16
    nodes = [
        helper.make_node("Conv", ["x", "Wc", "Bc"], ["c"], name="conv", kernel_shape=[3, 3]),
        helper.make_node("Flatten", ["c"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "W1"], ["h"], name="fc1", transB=1),
        helper.make_node("Constant", [], ["W2"], name="w2_const",
                         value=tensor("W2", rand((8, 5), seed + 2, np.float16))),
        helper.make_node("MatMul", ["h", "W2"], ["y"], name="fc2"),
    ]
    inits = [tensor("Wc", rand((4, 3, 3, 3), seed, np.float16)), tensor("Bc", rand((4,), seed + 3, np.float16)),
             tensor("W1", (rand((8, 64), seed + 1) * 0.1).astype(np.float16))]
    return model(nodes, [vi("x", h16, [2, 3, 6, 6])], [vi("y", h16, [2, 5])], inits)


def bf16_matmul(m: int = 3, k: int = 8, n: int = 5, seed: int = 0, constant: bool = False) -> onnx.ModelProto:
    """Whole-graph bf16 MatMul 'mm' with weight 'W' [k, n] (onnxruntime CPU cannot run bf16 MatMul)."""
    w = tensor("W", rand((k, n), seed, ml_dtypes.bfloat16))
    nodes, inits = [], []
    if constant:
        nodes.append(helper.make_node("Constant", [], ["W"], name="w_const", value=w))
    else:
        inits.append(w)
    nodes.append(helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"))
    bf = TensorProto.BFLOAT16
    return model(nodes, [vi("x", bf, [m, k])], [vi("y", bf, [m, n])], inits)


def bf16_cast_matmul(m: int = 3, k: int = 8, n: int = 5, seed: int = 0, op: str = "MatMul") -> onnx.ModelProto:
    """bf16 initializer 'W' -> Cast 'cast' (to float) -> 'W_f32' -> MatMul 'mm' (float32 graph).

    With ``op="Conv"`` the weight is [6, 4, 3, 3] and feeds Conv 'conv' instead.
    """
    if op == "Conv":
        w = rand((6, 4, 3, 3), seed, ml_dtypes.bfloat16)
        main = helper.make_node("Conv", ["x", "W_f32"], ["y"], name="conv", kernel_shape=[3, 3])
        x, y = vi("x", F32, [1, 4, 8, 8]), vi("y", F32, [1, 6, 6, 6])
    else:
        w = rand((k, n), seed, ml_dtypes.bfloat16)
        main = helper.make_node("MatMul", ["x", "W_f32"], ["y"], name="mm")
        x, y = vi("x", F32, [m, k]), vi("y", F32, [m, n])
    cast = helper.make_node("Cast", ["W"], ["W_f32"], name="cast", to=F32)
    return model([cast, main], [x], [y], [tensor("W", w)])


# ---------------------------------------------------------------------------------------------
# Control flow


def if_model(seed: int = 0, share_outer: bool = False) -> onnx.ModelProto:
    """Main graph: MatMul 'mm' (x @ 'W'[8, 5]) -> 'h'; If 'branch' on sum(x) > 0.

    then-branch: MatMul 'then_mm' (h @ 'W_then' [5, 4], an initializer of the branch);
    else-branch: MatMul 'else_mm' (h @ 'W_else' [5, 4], a Constant node 'else_const' in the branch).
    With ``share_outer`` the then-branch reads a main-graph weight 'W_shared' [5, 4] instead of
    'W_then', and main-graph MatMul 'mm_side' (h @ 'W_shared') also reads it.
    """
    then_w = "W_shared" if share_outer else "W_then"
    then_inits = [] if share_outer else [tensor("W_then", rand((5, 4), seed + 1))]
    then_g = helper.make_graph([helper.make_node("MatMul", ["h", then_w], ["t_out"], name="then_mm")],
                               "then", [], [vi("t_out", F32, [3, 4])], then_inits)
    else_g = helper.make_graph(
        [helper.make_node("Constant", [], ["W_else"], name="else_const", value=tensor("W_else", rand((5, 4), seed + 2))),
         helper.make_node("MatMul", ["h", "W_else"], ["e_out"], name="else_mm")],
        "else", [], [vi("e_out", F32, [3, 4])])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("ReduceSum", ["x"], ["x_sum"], name="sum", keepdims=0),
             helper.make_node("Greater", ["x_sum", "zero"], ["cond"], name="positive"),
             helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)]
    inits = [tensor("W", rand((8, 5), seed)), tensor("zero", np.array(0.0, np.float32))]
    outputs = [vi("y", F32, [3, 4])]
    if share_outer:
        inits.append(tensor("W_shared", rand((5, 4), seed + 3)))
        nodes.append(helper.make_node("MatMul", ["h", "W_shared"], ["side"], name="mm_side"))
        outputs.append(vi("side", F32, [3, 4]))
    return model(nodes, [vi("x", F32, [3, 8])], outputs, inits)


def loop_model(seed: int = 0) -> onnx.ModelProto:
    """Main graph: MatMul 'mm' (x @ 'W'[8, 5]) -> 'h'; Loop 'repeat' (2 trips) whose body
    carries h through MatMul 'body_mm' by main-graph 'W_loop' [5, 5] and Add 'body_add' of a
    body initializer; then MatMul 'out_mm' (by 'W_loop' again, from the main graph)."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("MatMul", ["h_in", "W_loop"], ["h_mm"], name="body_mm"),
         helper.make_node("Add", ["h_mm", "b_body"], ["h_out"], name="body_add")],
        "body", [vi("i", TensorProto.INT64, []), vi("cond_in", TensorProto.BOOL, []), vi("h_in", F32, [3, 5])],
        [vi("cond_out", TensorProto.BOOL, []), vi("h_out", F32, [3, 5])], [tensor("b_body", rand((5,), seed + 2))])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("Loop", ["trips", "", "h"], ["h_loop"], name="repeat", body=body),
             helper.make_node("MatMul", ["h_loop", "W_loop"], ["y"], name="out_mm")]
    inits = [tensor("W", rand((8, 5), seed)), tensor("W_loop", rand((5, 5), seed + 1) * 0.5),
             tensor("trips", np.array(2, np.int64))]
    return model(nodes, [vi("x", F32, [3, 8])], [vi("y", F32, [3, 5])], inits)


def scan_model(seed: int = 0) -> onnx.ModelProto:
    """Main graph: MatMul 'mm' (x [3, 8] @ 'W' [8, 5]) -> 'h'; Scan 'steps' over h's 3 rows, carrying
    a [5] sum: body MatMul 'body_mm' (row @ main-graph 'W_scan' [5, 5]) + the carry; then MatMul
    'out_mm' of the final carry by 'W_scan' again, from the main graph."""
    body = helper.make_graph(
        [helper.make_node("Unsqueeze", ["row", "zero_axis"], ["row2"]),
         helper.make_node("MatMul", ["row2", "W_scan"], ["prod2"], name="body_mm"),
         helper.make_node("Squeeze", ["prod2", "zero_axis"], ["prod"]),
         helper.make_node("Add", ["carry_in", "prod"], ["carry_out"]),
         helper.make_node("Identity", ["carry_out"], ["each"])],
        "body", [vi("carry_in", F32, [5]), vi("row", F32, [5])], [vi("carry_out", F32, [5]), vi("each", F32, [5])],
        [tensor("zero_axis", np.array([0], np.int64))])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("Scan", ["carry0", "h"], ["carry", "all"], name="steps", body=body, num_scan_inputs=1),
             helper.make_node("Unsqueeze", ["carry", "zero_axis_main"], ["carry2"]),
             helper.make_node("MatMul", ["carry2", "W_scan"], ["y"], name="out_mm")]
    inits = [tensor("W", rand((8, 5), seed)), tensor("W_scan", rand((5, 5), seed + 1) * 0.5),
             tensor("carry0", np.zeros(5, np.float32)), tensor("zero_axis_main", np.array([0], np.int64))]
    return model(nodes, [vi("x", F32, [3, 8])], [vi("y", F32, [1, 5])], inits)


# ---------------------------------------------------------------------------------------------
# Quantized graphs (all refused)


def _q(name: str, values, dtype) -> onnx.TensorProto:
    return tensor(name, np.asarray(values, dtype=dtype))


def qlinear_conv() -> onnx.ModelProto:
    u8 = TensorProto.UINT8
    w = rng(0).integers(-100, 100, (4, 3, 3, 3)).astype(np.int8)
    inits = [_q("x_s", 0.1, np.float32), _q("x_z", 128, np.uint8), _q("W", w, np.int8),
             _q("w_s", 0.05, np.float32), _q("w_z", 0, np.int8), _q("y_s", 0.2, np.float32),
             _q("y_z", 128, np.uint8)]
    node = helper.make_node("QLinearConv", ["x", "x_s", "x_z", "W", "w_s", "w_z", "y_s", "y_z"], ["y"],
                            name="qconv", kernel_shape=[3, 3])
    return model([node], [vi("x", u8, [1, 3, 6, 6])], [vi("y", u8, [1, 4, 4, 4])], inits)


def conv_integer() -> onnx.ModelProto:
    u8 = TensorProto.UINT8
    w = rng(0).integers(0, 255, (4, 3, 3, 3)).astype(np.uint8)
    node = helper.make_node("ConvInteger", ["x", "W"], ["y"], name="convint", kernel_shape=[3, 3])
    return model([node], [vi("x", u8, [1, 3, 6, 6])], [vi("y", TensorProto.INT32, [1, 4, 4, 4])],
                 [_q("W", w, np.uint8)])


def matmul_integer() -> onnx.ModelProto:
    u8 = TensorProto.UINT8
    w = rng(0).integers(0, 255, (8, 5)).astype(np.uint8)
    node = helper.make_node("MatMulInteger", ["x", "W"], ["y"], name="mmint")
    return model([node], [vi("x", u8, [3, 8])], [vi("y", TensorProto.INT32, [3, 5])], [_q("W", w, np.uint8)])


def qdq_conv() -> onnx.ModelProto:
    """int8 'W_q' -> DequantizeLinear 'dq_w' -> 'W' -> Conv 'conv' (the float input is not quantized)."""
    w = rng(0).integers(-100, 100, (4, 3, 3, 3)).astype(np.int8)
    nodes = [
        helper.make_node("DequantizeLinear", ["W_q", "w_s", "w_z"], ["W"], name="dq_w"),
        helper.make_node("Conv", ["x", "W"], ["y"], name="conv", kernel_shape=[3, 3]),
    ]
    inits = [_q("W_q", w, np.int8), _q("w_s", 0.05, np.float32), _q("w_z", 0, np.int8)]
    return model(nodes, [vi("x", F32, [1, 3, 6, 6])], [vi("y", F32, [1, 4, 4, 4])], inits)


QUANTIZED = {
    "QLinearConv": qlinear_conv,
    "ConvInteger": conv_integer,
    "MatMulInteger": matmul_integer,
    "QDQ": qdq_conv,
}
