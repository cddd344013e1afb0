"""Recurrent operators: RNN, GRU, LSTM (ONNX layouts, gate orders and activations).

One Python loop over time steps per direction, in plain torch ops, so the result is
differentiable w.r.t. W, R and B (the learner prunes W and R and tunes B). Gates keep
ONNX's order (LSTM i, o, f, c; GRU z, r, h), not torch.nn's. Semantics follow
onnxruntime's CPU kernels where they and the spec part:

- ``sequence_lens``: steps past a sequence's length leave the state unchanged and write
  zeros to Y, so Y_h (Y_c) hold the last valid step; the reverse direction starts at each
  sequence's own last step.
- ``activation_alpha``/``activation_beta`` are consumed in the order of the activations
  that take them; missing ones fall back to onnxruntime's defaults (see ``_ACTIVATIONS``).
- ``clip`` bounds the gates' pre-activations only: LSTM's cell state and the input of its
  output activation h are not clipped.
- A sequence of length 0 gives zeros in Y and in Y_h (Y_c), whatever the initial state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..registry import register
from .nn import _refuse

Activation = Callable[[torch.Tensor], torch.Tensor]


def _elu(x, alpha, beta):
    return torch.where(x >= 0, x, alpha * torch.expm1(x))


# lower-case name -> (fn(x, alpha, beta), takes alpha, takes beta, default alpha, default beta).
# The defaults are onnxruntime's: an alpha or beta the list runs out of is 0 unless named here,
# so ThresholdedRelu's is 0 (not the ThresholdedRelu operator's 1.0) and Affine and
# ScaledTanh without values give 0.
_ACTIVATIONS = {
    "sigmoid": (lambda x, a, b: torch.sigmoid(x), False, False, 0.0, 0.0),
    "tanh": (lambda x, a, b: torch.tanh(x), False, False, 0.0, 0.0),
    "relu": (lambda x, a, b: torch.relu(x), False, False, 0.0, 0.0),
    "affine": (lambda x, a, b: a * x + b, True, True, 0.0, 0.0),
    "leakyrelu": (lambda x, a, b: torch.where(x >= 0, x, a * x), True, False, 0.01, 0.0),
    "thresholdedrelu": (lambda x, a, b: torch.where(x > a, x, torch.zeros_like(x)), True, False, 0.0, 0.0),
    "scaledtanh": (lambda x, a, b: a * torch.tanh(b * x), True, True, 0.0, 0.0),
    "hardsigmoid": (lambda x, a, b: torch.clamp(a * x + b, 0.0, 1.0), True, True, 0.2, 0.5),
    "elu": (_elu, True, False, 1.0, 0.0),
    "softsign": (lambda x, a, b: x / (1 + torch.abs(x)), False, False, 0.0, 0.0),
    "softplus": (lambda x, a, b: F.softplus(x), False, False, 0.0, 0.0),
}


@dataclass
class _Recurrence:
    """What every recurrent op reads the same way: directions, activations, clip, layout."""

    directions: list[bool]  # per direction: runs backwards in time
    activations: list[list[Activation]]  # per direction, in the op's (f, g, h) order
    clip: float | None
    layout: int


def _activation_list(ctx, defaults: Sequence[str], num_directions: int) -> list[list[Activation]]:
    # The defaults serve every direction; a given list must name each direction's own (as
    # onnxruntime requires: it refuses one direction's list for a bidirectional node).
    names = list(ctx.attr("activations") or list(defaults) * num_directions)
    per_direction = len(defaults)
    if len(names) != per_direction * num_directions:
        raise _refuse(ctx, f"{len(names)} activations for {num_directions} direction(s) "
                           f"(expected {per_direction * num_directions})")
    alphas = list(ctx.attr("activation_alpha") or [])
    betas = list(ctx.attr("activation_beta") or [])
    chosen: list[Activation] = []
    for name in names:
        entry = _ACTIVATIONS.get(name.lower())
        if entry is None:
            raise _refuse(ctx, f"activation {name!r}")
        fn, takes_alpha, takes_beta, alpha, beta = entry
        if takes_alpha and alphas:
            alpha = float(alphas.pop(0))
        if takes_beta and betas:
            beta = float(betas.pop(0))
        chosen.append(lambda x, fn=fn, a=alpha, b=beta: fn(x, a, b))
    return [chosen[d * per_direction:(d + 1) * per_direction] for d in range(num_directions)]


def _recurrence(ctx, default_activations: Sequence[str], layout: int) -> _Recurrence:
    direction = ctx.attr("direction", "forward")
    backwards = {"forward": [False], "reverse": [True], "bidirectional": [False, True]}.get(direction)
    if backwards is None:
        raise _refuse(ctx, f"direction {direction!r}")
    if layout not in (0, 1):
        raise _refuse(ctx, f"layout {layout}")
    clip = ctx.attr("clip")
    return _Recurrence(backwards, _activation_list(ctx, default_activations, len(backwards)),
                       None if clip is None else float(clip), layout)


def _clipped(x: torch.Tensor, clip: float | None) -> torch.Tensor:
    return x if clip is None else torch.clamp(x, -clip, clip)


def _scan(n_steps: int, lens: torch.Tensor | None, states: tuple[torch.Tensor, ...],
          step: Callable[[int, tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]],
          backwards: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Run ``step`` over time; returns Y [seq, batch, hidden] (the first state) and the last states.

    ``lens`` ([batch, 1]): a step at or past a sequence's length keeps its state and writes
    zeros, so the backwards direction starts at each sequence's own last step; a sequence
    of length 0 ends with zero states, as onnxruntime's do."""
    outputs: list[torch.Tensor | None] = [None] * n_steps
    for t in (range(n_steps - 1, -1, -1) if backwards else range(n_steps)):
        new = step(t, states)
        if lens is not None:
            live = t < lens
            new = tuple(torch.where(live, n, s) for n, s in zip(new, states))
            outputs[t] = torch.where(live, new[0], torch.zeros_like(new[0]))
        else:
            outputs[t] = new[0]
        states = new
    if lens is not None:
        states = tuple(torch.where(lens > 0, s, torch.zeros_like(s)) for s in states)
    return torch.stack(outputs), states


def _time_major(rec: _Recurrence, x: torch.Tensor, *states: torch.Tensor | None):
    """X as [seq, batch, input] and initial states as [directions, batch, hidden]."""
    if rec.layout == 0:
        return (x, *states)
    return (x.transpose(0, 1), *(None if s is None else s.transpose(0, 1) for s in states))


def _outputs(rec: _Recurrence, ys: list[torch.Tensor], finals: list[tuple[torch.Tensor, ...]]):
    """(Y, Y_h[, Y_c]) in the node's layout from per-direction results."""
    y = torch.stack(ys, dim=1)  # [seq, directions, batch, hidden]
    last = [torch.stack([f[i] for f in finals]) for i in range(len(finals[0]))]  # [directions, batch, hidden]
    if rec.layout == 1:
        return (y.permute(2, 0, 1, 3), *(s.transpose(0, 1) for s in last))
    return (y, *last)


def _lengths(sequence_lens: torch.Tensor | None, n_steps: int, device) -> torch.Tensor | None:
    """[batch, 1] lengths, or None when every sequence spans all steps (no masking needed)."""
    if sequence_lens is None:
        return None
    lens = sequence_lens.to(device=device, dtype=torch.int64).reshape(-1, 1)
    return None if bool((lens >= n_steps).all()) else lens


def _initial(state: torch.Tensor | None, d: int, batch: int, hidden: int, like: torch.Tensor) -> torch.Tensor:
    return state[d] if state is not None else like.new_zeros(batch, hidden)


def _run(rec: _Recurrence, n_gates: int, cell, x, w, r, b, sequence_lens, initial_h, initial_c=None,
         peepholes=None, *, with_cell: bool = False):
    """The shared driver: per direction, X @ W^T for all steps at once, then ``cell`` per step."""
    x, initial_h, initial_c = _time_major(rec, x, initial_h, initial_c)
    n_steps, batch = x.shape[0], x.shape[1]
    hidden = r.shape[-1]
    lens = _lengths(sequence_lens, n_steps, x.device)
    ys, finals = [], []
    for d, backwards in enumerate(rec.directions):
        wb, rb = (None, None) if b is None else (b[d, :n_gates * hidden], b[d, n_gates * hidden:])
        xw = torch.matmul(x, w[d].transpose(0, 1))
        if wb is not None:
            xw = xw + wb
        states = (_initial(initial_h, d, batch, hidden, x),)
        if with_cell:
            states += (_initial(initial_c, d, batch, hidden, x),)
        p = None if peepholes is None else peepholes[d]
        step = cell(xw, r[d], rb, p, rec.activations[d], rec.clip, hidden)
        y, last = _scan(n_steps, lens, states, step, backwards)
        ys.append(y)
        finals.append(last)
    return _outputs(rec, ys, finals)


# -- cells: (xw, R_d, Rb_d, P_d, activations, clip, hidden) -> step(t, states) -> states --


def _rnn_cell(xw, r, rb, p, acts, clip, hidden):
    (f,) = acts

    def step(t, states):
        (h,) = states
        a = xw[t] + torch.matmul(h, r.transpose(0, 1))
        if rb is not None:
            a = a + rb
        return (f(_clipped(a, clip)),)

    return step


def _gru_cell(linear_before_reset: bool):
    def make(xw, r, rb, p, acts, clip, hidden):
        f, g = acts
        r_zr, r_h = r[:2 * hidden], r[2 * hidden:]
        rb_zr, rb_h = (None, None) if rb is None else (rb[:2 * hidden], rb[2 * hidden:])

        def step(t, states):
            (h,) = states
            x_zr, x_h = xw[t][..., :2 * hidden], xw[t][..., 2 * hidden:]
            zr = x_zr + torch.matmul(h, r_zr.transpose(0, 1))
            if rb_zr is not None:
                zr = zr + rb_zr
            zr = f(_clipped(zr, clip))
            z, reset = zr[..., :hidden], zr[..., hidden:]
            if linear_before_reset:
                rh = torch.matmul(h, r_h.transpose(0, 1))
                if rb_h is not None:
                    rh = rh + rb_h
                pre = x_h + reset * rh
            else:
                pre = x_h + torch.matmul(reset * h, r_h.transpose(0, 1))
                if rb_h is not None:
                    pre = pre + rb_h
            candidate = g(_clipped(pre, clip))
            return ((1 - z) * candidate + z * h,)

        return step

    return make


def _lstm_cell(input_forget: bool):
    def make(xw, r, rb, p, acts, clip, hidden):
        f, g, h_act = acts
        p_i, p_o, p_f = (None, None, None) if p is None else (p[:hidden], p[hidden:2 * hidden], p[2 * hidden:])

        def step(t, states):
            h, c = states
            a = xw[t] + torch.matmul(h, r.transpose(0, 1))
            if rb is not None:
                a = a + rb
            a_i, a_o, a_f, a_c = (a[..., k * hidden:(k + 1) * hidden] for k in range(4))
            if p_i is not None:
                a_i = a_i + p_i * c
                a_f = a_f + p_f * c
            i = f(_clipped(a_i, clip))
            # input_forget couples the gates: the forget gate is 1 - the input gate.
            forget = 1 - i if input_forget else f(_clipped(a_f, clip))
            c_new = forget * c + i * g(_clipped(a_c, clip))
            if p_o is not None:
                a_o = a_o + p_o * c_new
            o = f(_clipped(a_o, clip))
            return o * h_act(c_new), c_new  # onnxruntime clips neither the cell nor h's input

        return step

    return make


# -- the operators ----------------------------------------------------------------------


def _rnn(ctx, layout, x, w, r, b=None, sequence_lens=None, initial_h=None):
    rec = _recurrence(ctx, ["Tanh"], layout)
    return _run(rec, 1, _rnn_cell, x, w, r, b, sequence_lens, initial_h)


def _gru(ctx, layout, x, w, r, b=None, sequence_lens=None, initial_h=None):
    rec = _recurrence(ctx, ["Sigmoid", "Tanh"], layout)
    cell = _gru_cell(bool(ctx.attr("linear_before_reset", 0)))
    return _run(rec, 3, cell, x, w, r, b, sequence_lens, initial_h)


def _lstm(ctx, layout, x, w, r, b=None, sequence_lens=None, initial_h=None, initial_c=None, p=None):
    rec = _recurrence(ctx, ["Sigmoid", "Tanh", "Tanh"], layout)
    cell = _lstm_cell(bool(ctx.attr("input_forget", 0)))
    return _run(rec, 4, cell, x, w, r, b, sequence_lens, initial_h, initial_c, p, with_cell=True)


def _register_versions(op_type: str, run) -> None:
    """Opset 7 has no ``layout`` (always 0: sequence first); opset 14 reads it."""
    register(op_type, since=7)(lambda ctx, *inputs: run(ctx, 0, *inputs))
    register(op_type, since=14)(lambda ctx, *inputs: run(ctx, int(ctx.attr("layout", 0)), *inputs))


for _op_type, _run_op in (("RNN", _rnn), ("GRU", _gru), ("LSTM", _lstm)):
    _register_versions(_op_type, _run_op)
