"""Operator implementations, one family per module; importing registers them."""

from . import attention, elementwise, linalg, nn, reduce, shape  # noqa: F401
