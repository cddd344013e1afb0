"""The exception hierarchy.

Every error a user can cause is an :class:`FcptsError`. Its message is one line that says
what went wrong and what to do; the CLI prints it without a traceback and exits with
status 2. Anything else escaping the tool is a bug in the tool.
"""

from __future__ import annotations


class FcptsError(Exception):
    """Base of every user-facing error (exit status 2 in the CLI)."""

    exit_code = 2


class ModelLoadError(FcptsError):
    """The model file is missing, unreadable, or not a valid ONNX model."""


class UnsupportedModelError(FcptsError):
    """The graph cannot be sparsified (quantized, nothing prunable, ...)."""


class CalibrationError(FcptsError):
    """Calibration data does not match the graph or contains bad values."""


class OptionError(FcptsError):
    """An option is out of range or inconsistent with the model."""


class OutputError(FcptsError):
    """The output cannot be written where asked."""


class VerificationError(FcptsError):
    """The written model failed a check (checker, onnxruntime, sparsity count)."""
