"""Operator implementations, one family per module; importing registers them."""

from . import attention, contrib, contrib_transformer, elementwise, linalg, nn, recurrent, reduce, shape  # noqa: F401
