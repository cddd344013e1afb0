"""The benchmark as people read it: a latency table, a size and compute table, and notes.

Every function takes the JSON form (``BenchResult.to_dict()``), so the optimize report can
print the section it stored.
"""

from __future__ import annotations

from ..report import _fmt_count, format_layer_table, format_scaled


def _bytes(n: int | None) -> str:
    return format_scaled(n, ((" GB", 1e9), (" MB", 1e6), (" kB", 1e3)), unit_of_one=" B")


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value >= 1 else f"{value:.3g}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def latency_rows(data: dict) -> list[dict]:
    sparsity = {m["label"]: m["macs"]["sparsity"] for m in data["models"]}
    rows = []
    for c in data["cases"]:
        ok = c["status"] == "ok"
        rows.append({
            "model": c["model"], "sparsity": f"{sparsity.get(c['model'], 0.0):.0%}", "runtime": c["runtime"],
            "batch": str(c["batch_size"]),
            "median": _ms(c.get("median_latency_ms")) if ok else c["status"],
            "p90": _ms(c.get("p90_latency_ms")) if ok else "-",
            "p99": _ms(c.get("p99_latency_ms")) if ok else "-",
            "ips": _rate(c.get("items_per_sec")) if ok else "-",
            "vs_dense": _x(c.get("speedup_vs_dense")) if ok else "-",
            "vs_ort": _x(c.get("speedup_vs_onnxruntime_dense")) if ok else "-",
        })
    return rows


LATENCY_COLUMNS = [
    ("model", "model", "<"), ("sparsity", "sparsity", ">"), ("runtime", "runtime", "<"), ("batch", "batch", ">"),
    ("median ms", "median", ">"), ("p90 ms", "p90", ">"), ("p99 ms", "p99", ">"), ("items/s", "ips", ">"),
    ("vs dense", "vs_dense", ">"), ("vs ORT dense", "vs_ort", ">"),
]


def size_rows(data: dict) -> list[dict]:
    rows = []
    for m in data["models"]:
        s, k = m["sizes"], m["macs"]
        rows.append({
            "model": m["label"], "storage": m["storage"], "sparsity": f"{k['sparsity']:.1%}",
            "file": _bytes(s["file_bytes"]), "zip": _bytes(s["zip_bytes"]),
            "sparse": _bytes(s["sparse_initializer_bytes"]), "sparse_zip": _bytes(s["sparse_initializer_zip_bytes"]),
            "macs": _fmt_count(k["macs"]), "nz_macs": _fmt_count(k["nonzero_macs"]),
        })
    return rows


SIZE_COLUMNS = [
    ("model", "model", "<"), ("stored", "storage", "<"), ("sparsity", "sparsity", ">"), ("file", "file", ">"),
    ("zip", "zip", ">"), ("sparse_init", "sparse", ">"), ("sparse_init zip", "sparse_zip", ">"),
    ("MACs", "macs", ">"), ("MACs on non-zeros", "nz_macs", ">"),
]


def case_notes(data: dict) -> list[str]:
    """One line per distinct reason a case was skipped or failed."""
    seen: dict[tuple[str, str, str, str], list[int]] = {}
    for c in data["cases"]:
        if c["status"] != "ok":
            seen.setdefault((c["status"], c["model"], c["runtime"], c["note"] or ""), []).append(c["batch_size"])
    return [f"{status}: {model} on {runtime} at batch {','.join(map(str, batches))}: {note}"
            for (status, model, runtime, note), batches in seen.items()]


def header(data: dict) -> list[str]:
    opts = data["options"]
    threads = f"{opts['threads']} thread(s)" if opts["threads"] else "default threads"
    budget = (f"{opts['iterations']} iterations" if opts["iterations"] is not None else f"{opts['seconds']:g} s")
    engines = ", ".join(r["engine"] for r in data["runtimes"] if r["available"])
    return [
        f"fcpts-onnx bench: {data['machine']['cpu']} ({data['machine']['logical_cores']} logical cores), {threads}, "
        f"{budget} per case after {opts['warmup_iterations']} warm-up run(s)",
        f"runtimes: {engines or 'none available'}",
        f"inputs: {data['inputs']['description']}",
    ]


def format_bench(data: dict) -> str:
    lines = header(data) + [
        "",
        "latency per batch (ms), throughput, speedup by median latency (vs dense: against the first model on "
        "the same runtime; vs ORT dense: against the first model on onnxruntime):",
        format_layer_table(latency_rows(data), LATENCY_COLUMNS),
        "",
        "size and compute (MACs per item, prunable layers):",
        format_layer_table(size_rows(data), SIZE_COLUMNS),
        "",
    ]
    lines += [f"note: {n}" for n in data["notes"]]
    lines += [f"note: {n}" for n in case_notes(data)]
    return "\n".join(lines)


def _md_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    out = ["| " + " | ".join(h for h, _, _ in columns) + " |",
           "|" + "".join(" --- |" if a == "<" else " ---: |" for _, _, a in columns)]
    out += ["| " + " | ".join(str(r[k]) for _, k, _ in columns) + " |" for r in rows]
    return "\n".join(out)


def format_markdown(data: dict) -> str:
    lines = [line.replace("fcpts-onnx bench: ", "") for line in header(data)[:1]] + [
        "",
        _md_table(latency_rows(data), LATENCY_COLUMNS),
        "",
        _md_table(size_rows(data), SIZE_COLUMNS),
        "",
    ]
    lines += [f"- {n}" for n in data["notes"] + case_notes(data)]
    return "\n".join(lines)
