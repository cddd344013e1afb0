"""Operator implementations, one family per module; importing registers them."""

from . import elementwise, linalg, nn, reduce, shape  # noqa: F401
