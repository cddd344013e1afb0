"""Options of a sparsify run, declared once with their meaning and validated in one place."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from .errors import OptionError
from .learner.options import LearnOptions

LEARNED_METHODS = ("fcpts",)
STORE_FORMS = ("dense", "sparse")


@dataclass(frozen=True)
class SparsifyOptions:
    """What to prune and how.

    Attributes:
        sparsity: global target S in (0, 1): the fraction of zeros over all prunable
            weights, counting zeros already present. Hit exactly: round(S * N) zeros.
        method: allocation method: a data-free one from the allocation registry, or "fcpts"
            (learned; needs calibration data). None: fcpts with calibration data, else global.
        nodes_to_exclude: regular expressions; weights whose tensor name or any reading
            node's name matches one (re.search) are left dense.
        op_types: prune only weights of these op types (default: Conv, ConvTranspose, Gemm, MatMul,
            LSTM, GRU, RNN).
        max_layer_sparsity: no layer is pruned beyond this fraction, so no layer is
            disconnected; layers whose existing zeros exceed it keep them.
        batch_size: samples per onnxruntime run during verification.
        external_data: write tensors to a separate data file; None keeps the input's form
            (and switches to external data past protobuf's 2 GiB limit).
        reconstruct: tune surviving weights, biases and norm parameters on the calibration
            data after (or, for fcpts, while) choosing the masks. None: on for fcpts only.
        holdout: fraction of calibration samples held out from learning, used for early
            stopping and the fidelity report (at least HOLDOUT_MIN samples).
        device: where learning runs: "cpu" or "cuda".
        learn: the learner's options (iterations, learning rates, lambda, ...).
        store: "dense" writes pruned weights as ordinary tensors; "sparse" stores each pruned
            weight whose non-zeros take fewer bytes that way as an ONNX sparse tensor
            (graph.sparse_initializer, or a Constant's sparse_value).
        max_memory: bytes (or text such as "8G") the run may use for one onnxruntime batch's
            largest tensor and for a learning step (activations, gradients, optimizer state);
            the learner's batch shrinks to fit. None: 80% of the memory available at start.
        batch_axes: input name -> the axis that holds its samples, for inputs whose batch is not
            on their first axis and where the graph does not say (calibration.infer_layout).
    """

    sparsity: float = 0.8
    method: str | None = None
    nodes_to_exclude: tuple[str, ...] = ()
    op_types: tuple[str, ...] | None = None
    max_layer_sparsity: float = 0.98
    batch_size: int = 64
    external_data: bool | None = None
    reconstruct: bool | None = None
    holdout: float = 0.1
    device: str = "cpu"
    learn: LearnOptions = field(default_factory=LearnOptions)
    store: str = "dense"
    max_memory: int | str | None = None
    batch_axes: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        s = self.sparsity
        if not isinstance(s, (int, float)) or isinstance(s, bool) or math.isnan(s) or not 0 < s < 1:
            raise OptionError(f"--sparsity must be a number strictly between 0 and 1 (got {s!r}); e.g. 0.8 for 80%")
        m = self.max_layer_sparsity
        if not isinstance(m, (int, float)) or math.isnan(m) or not 0 < m <= 1:
            raise OptionError(f"--max-layer-sparsity must be in (0, 1] (got {m!r})")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise OptionError(f"--batch-size must be a positive integer (got {self.batch_size!r})")
        if isinstance(self.nodes_to_exclude, str):
            object.__setattr__(self, "nodes_to_exclude", (self.nodes_to_exclude,))
        object.__setattr__(self, "nodes_to_exclude", tuple(self.nodes_to_exclude))
        if self.op_types is not None:
            ops = (self.op_types,) if isinstance(self.op_types, str) else tuple(self.op_types)
            object.__setattr__(self, "op_types", ops)

        if self.max_memory is not None:
            from .resources import parse_memory

            object.__setattr__(self, "max_memory", parse_memory(self.max_memory))
        if self.store not in STORE_FORMS:
            raise OptionError(f"--store must be one of {', '.join(STORE_FORMS)} (got {self.store!r})")
        if not isinstance(self.device, str) or not re.fullmatch(r"cpu|cuda(:[0-9]+)?", self.device):
            raise OptionError(f"--device must be cpu, cuda or cuda:N (got {self.device!r})")
        object.__setattr__(self, "batch_axes", dict(self.batch_axes or {}))
        if not isinstance(self.holdout, (int, float)) or not 0 < self.holdout < 1:
            raise OptionError(f"--holdout must be a fraction in (0, 1) (got {self.holdout!r}); default 0.1")

    def resolved_method(self, has_calibration: bool) -> str:
        if self.method is not None:
            return self.method
        return "fcpts" if has_calibration else "global"

    def resolved_reconstruct(self, method: str) -> bool:
        if self.reconstruct is not None:
            return self.reconstruct
        return method in LEARNED_METHODS

    def to_dict(self) -> dict:
        return asdict(self)
