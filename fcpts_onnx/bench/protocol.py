"""The parent side of the DeepSparse worker protocol: run a worker, send JSON, read JSON back.

The worker (``deepsparse_worker.py``) runs in another interpreter. It reads one JSON request
on stdin (or gets ``--probe`` on argv) and writes one JSON object on stdout: ``{"ok": true,
...}`` or ``{"ok": false, "error": "..."}``. Everything else (a crash, a timeout, a reply
that is not that JSON) becomes a :class:`WorkerError` with a one-line message.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from .errors import WorkerError

PROTOCOL = 1
WORKER = Path(__file__).with_name("deepsparse_worker.py")


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return _one_line(lines[-1]) if lines else ""


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["NM_DISABLE_ANALYTICS"] = "1"  # no usage reporting from DeepSparse
    env.pop("PYTHONPATH", None)  # the worker's interpreter must not see the main environment's packages
    return env


def call_worker(command: Sequence[str], request: dict | None, *, timeout: float, what: str = "deepsparse worker",
                probe: bool = False) -> dict:
    """Run ``command`` (+ ``--probe``), send ``request``, return the worker's ok reply as a dict."""
    argv = [*map(str, command)] + (["--probe"] if probe else [])
    stdin = "" if request is None else json.dumps({"protocol": PROTOCOL, **request})
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout, env=worker_env())
    except FileNotFoundError:
        raise WorkerError(f"{what}: {argv[0]} does not exist") from None
    except PermissionError:
        raise WorkerError(f"{what}: {argv[0]} is not executable") from None
    except subprocess.TimeoutExpired:
        raise WorkerError(f"{what} gave no reply within {timeout:g} s and was stopped") from None
    except OSError as exc:
        raise WorkerError(f"{what}: cannot start {argv[0]} ({exc.strerror or exc})") from None
    out = done.stdout.strip()
    if not out:
        why = _last_line(done.stderr) or "no output"
        status = (f"was killed by signal {-done.returncode}" if done.returncode < 0
                  else f"exited with status {done.returncode}")
        raise WorkerError(f"{what} {status} without a reply: {why}")
    try:
        reply = json.loads(out)
    except json.JSONDecodeError:
        raise WorkerError(f"{what} replied with something that is not JSON: {_one_line(out, 80)!r}") from None
    if not isinstance(reply, dict) or "ok" not in reply:
        raise WorkerError(f"{what} replied with JSON that is not a worker reply: {_one_line(out, 80)!r}")
    if reply.get("protocol") != PROTOCOL:
        raise WorkerError(f"{what} speaks protocol {reply.get('protocol')!r}, expected {PROTOCOL}; "
                          "use the worker that ships with this fcpts-onnx")
    if not reply["ok"]:
        raise WorkerError(f"{what}: {_one_line(str(reply.get('error') or 'failed without saying why'), 400)}")
    if not probe:
        lat = reply.get("latencies_ms")
        if not isinstance(lat, list) or not lat or not all(isinstance(x, (int, float)) for x in lat):
            raise WorkerError(f"{what} replied without latencies")
    return reply
