"""Errors of the bench: one-line messages, exit status 2 like every FcptsError."""

from __future__ import annotations

from ..errors import FcptsError


class BenchError(FcptsError):
    """A benchmark cannot run as asked (bad option, no input shapes, nothing to run)."""


class WorkerError(BenchError):
    """An out-of-process runtime worker crashed, timed out or replied with something unreadable."""
