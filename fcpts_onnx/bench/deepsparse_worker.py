"""Times one model on DeepSparse, in DeepSparse's own interpreter (a separate venv).

DeepSparse 1.8.0 needs onnx<1.15 and numpy<2, so it cannot be imported next to fcpts_onnx.
``fcpts-onnx bench`` runs this file with that interpreter; it imports nothing from
fcpts_onnx and speaks JSON:

    python deepsparse_worker.py --probe
        -> {"protocol": 1, "ok": true, "deepsparse_version": ..., "onnx_version": ..., ...}

    python deepsparse_worker.py < request.json
        request: {"protocol": 1, "model": PATH, "batch_size": B, "num_cores": N or null,
                  "inputs": {"npz": PATH} | {"generate": [{"name", "dtype", "shape"}, ...]},
                  "override_input_shapes": bool, "warmup": W,
                  "iterations": N or null, "seconds": S or null, "min_iterations": M,
                  "outputs_npz": PATH or null}
        -> {"protocol": 1, "ok": true, "engine": ..., "latencies_ms": [...], "compile_seconds": ...,
            "num_cores": ..., "num_streams": ..., ...}
        or {"protocol": 1, "ok": false, "error": "one line"}

The reply is the only thing written to stdout (anything DeepSparse prints goes to stderr),
one JSON object on one line. Exit status 0 with ok true, 1 with ok false.
"""

import json
import os
import sys
import time

PROTOCOL = 1


def _first_line(exc):
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line}"[:400] if line else type(exc).__name__


def _probe():
    import deepsparse
    import numpy
    import onnx

    info = {"deepsparse_version": deepsparse.__version__, "onnx_version": onnx.__version__,
            "numpy_version": numpy.__version__, "python": sys.version.split()[0]}
    try:
        from deepsparse.cpu import cpu_architecture

        arch = cpu_architecture()
        info["cpu"] = {"isa": getattr(arch, "isa", None), "vnni": getattr(arch, "vnni", None),
                       "num_available_physical_cores": getattr(arch, "num_available_physical_cores", None)}
    except Exception:
        pass
    return info


def _inputs(request):
    import numpy as np

    spec = request["inputs"]
    if "npz" in spec:
        with np.load(spec["npz"], allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    rng = np.random.default_rng(0)
    arrays = {}
    for item in spec["generate"]:
        dtype = np.dtype(item["dtype"])
        shape = tuple(item["shape"])
        if dtype.kind == "f":
            arrays[item["name"]] = rng.standard_normal(shape).astype(dtype)
        else:
            arrays[item["name"]] = np.zeros(shape, dtype=dtype)
    return arrays


def _measure(run_once, warmup, iterations, seconds, min_iterations):
    for _ in range(warmup):
        run_once()
    latencies = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        run_once()
        latencies.append((time.perf_counter() - t0) * 1e3)
        if iterations is not None:
            if len(latencies) >= iterations:
                break
        elif time.perf_counter() - start >= seconds and len(latencies) >= min_iterations:
            break
    return latencies


def _run(request):
    import deepsparse
    import numpy as np

    arrays = _inputs(request)
    kwargs = {"model": request["model"], "batch_size": int(request["batch_size"])}
    if request.get("num_cores"):
        kwargs["num_cores"] = int(request["num_cores"])
    if request.get("override_input_shapes"):
        kwargs["input_shapes"] = [list(a.shape) for a in arrays.values()]
    t0 = time.perf_counter()
    engine = deepsparse.Engine(**kwargs)
    compile_seconds = time.perf_counter() - t0
    names = list(getattr(engine, "input_names", None) or [])
    if sorted(names) == sorted(arrays):
        feed = [np.ascontiguousarray(arrays[n]) for n in names]
    else:  # names unknown or renamed: the order of the inputs file is the graph's input order
        feed = [np.ascontiguousarray(a) for a in arrays.values()]
    outputs = engine.run(feed)
    if request.get("outputs_npz"):
        np.savez(request["outputs_npz"], *outputs)
    latencies = _measure(lambda: engine.run(feed), int(request.get("warmup", 0)), request.get("iterations"),
                         request.get("seconds"), int(request.get("min_iterations", 1)))
    return {
        "engine": f"deepsparse {deepsparse.__version__}",
        "deepsparse_version": deepsparse.__version__,
        "num_cores": getattr(engine, "num_cores", None),
        "num_streams": getattr(engine, "num_streams", None),
        "scheduler": str(getattr(engine, "scheduler", "")),
        "cpu_avx_type": getattr(engine, "cpu_avx_type", None),
        "fraction_of_supported_ops": getattr(engine, "fraction_of_supported_ops", None),
        "compile_seconds": compile_seconds,
        "latencies_ms": latencies,
        "output_shapes": [list(np.shape(o)) for o in outputs],
    }


def main():
    os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
    # Keep stdout for the reply alone: whatever DeepSparse or its libraries print goes to stderr.
    sys.stdout.flush()
    reply_fd = os.dup(1)
    os.dup2(2, 1)
    ok = False
    try:
        if "--probe" in sys.argv[1:]:
            reply = _probe()
        else:
            request = json.loads(sys.stdin.read())
            if request.get("protocol") != PROTOCOL:
                raise ValueError(f"protocol {request.get('protocol')!r} not understood (this worker speaks {PROTOCOL})")
            reply = _run(request)
        reply.update({"protocol": PROTOCOL, "ok": True})
        ok = True
    except Exception as exc:
        reply = {"protocol": PROTOCOL, "ok": False, "error": _first_line(exc)}
    sys.stdout.flush()
    with os.fdopen(reply_fd, "w") as out:
        out.write(json.dumps(reply) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
