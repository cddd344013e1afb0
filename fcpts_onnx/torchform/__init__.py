"""The trainable form: an ONNX graph as an exact, differentiable torch.nn.Module."""

from .module import OnnxModule, TensorSource, refuse_unsupported, unsupported_operators
from .registry import REGISTRY, NodeContext, register, resolve

__all__ = [
    "REGISTRY", "NodeContext", "OnnxModule", "TensorSource", "refuse_unsupported", "register", "resolve",
    "unsupported_operators",
]
