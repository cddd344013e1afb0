"""Operator implementations, one family per module; importing registers them."""

from . import attention, contrib, elementwise, linalg, nn, recurrent, reduce, shape  # noqa: F401
