"""The run report: a JSON document for machines and a table for people."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import OutputError


@dataclass
class LayerRow:
    """One prunable weight after the run, counted on the written file."""

    name: str
    op_type: str
    nodes: list[str]
    shape: list[int]
    dtype: str
    storage: str
    params: int
    zeros_before: int
    zeros: int
    sparsity: float
    macs: int | None
    nonzero_macs: int | None


def jsonable(value: Any) -> Any:
    """``value`` with every bytes key or value as text: protobuf hands back a name whose bytes are
    not UTF-8 (a damaged file) as bytes, which JSON cannot hold."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {jsonable(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


@dataclass
class Report:
    """Everything a sparsify run did and measured."""

    tool_version: str
    input_path: str
    input_sha256: str
    output_path: str
    output_sha256: str
    output_files: list[str]
    method: str
    options: dict
    target_sparsity: float
    total_params: int
    zero_params: int
    required_zeros: int
    achieved_sparsity: float
    layers: list[LayerRow]
    skipped: list[dict]
    calibration: dict
    fidelity: list[dict]
    verification: dict
    timings_s: dict[str, float]
    notes: list[str] = field(default_factory=list)
    learning: dict | None = None  # the learner's record (fcpts or reconstruction); None for data-free runs
    bench: dict | None = None  # `optimize --bench`: fcpts_onnx.bench's JSON (BenchResult.to_dict())

    def to_dict(self) -> dict:
        return jsonable(asdict(self))

    def write_json(self, path: str | os.PathLike) -> None:
        """Atomic: the report appears whole or not at all."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
            os.replace(tmp, path)
        except OSError as exc:
            raise OutputError(
                f"{path}: cannot write the report ({exc.strerror or exc}); the model itself was written "
                f"to {self.output_path}"
            ) from None
        finally:
            tmp.unlink(missing_ok=True)

    def format_table(self) -> str:
        return format_summary(self)


def format_scaled(n: int | None, units: tuple[tuple[str, float], ...] = (("G", 1e9), ("M", 1e6), ("k", 1e3)),
                  unit_of_one: str = "") -> str:
    """``n`` in the largest decimal unit it reaches (1.23M; 4.50 MB with units " MB" ...), '?' if unknown."""
    if n is None:
        return "?"
    for unit, scale in units:
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n}{unit_of_one}"


def _fmt_count(n: int | None) -> str:
    return format_scaled(n)


def format_layer_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Plain aligned text table; columns are (header, key, align '<' or '>')."""
    cells = [[str(r[key]) for _, key, _ in columns] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (h, _, _) in enumerate(columns)]
    def line(values):
        return "  ".join(f"{v:{a}{w}}" for v, (_, _, a), w in zip(values, columns, widths)).rstrip()
    out = [line([h for h, _, _ in columns]), line(["-" * w for w in widths])]
    out += [line(c) for c in cells]
    return "\n".join(out)


# The name torch's legacy exporter makes up for a Linear weight it transposed while exporting
# ("onnx::MatMul_12"); the node that reads it ("/q/MatMul") names the layer by the module's path,
# better in a table or plot for people. The JSON keeps the tensor's own name. (tf2onnx's folded
# constants, "const_fold_opt__865", are read by nodes named no better: "Gemm__1386".)
_MADE_UP = re.compile(r"^onnx::[A-Za-z]+_\d+$")


def layer_label(name: str, nodes: list[str]) -> str:
    """What a table calls a prunable weight: its name, or its first reader's if the name is made up."""
    return nodes[0] if nodes and _MADE_UP.match(name) else name


def _short(name: str, width: int = 48) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3):]


def describe_start_choice(learning: dict) -> str:
    """How the start was chosen: each candidate's held-out loss untuned -> after its
    trial, and whether the trials overturned the untuned ranking (choose_start_by_evidence)."""
    trials = learning.get("start_trials_holdout_loss") or {}
    if not trials:
        return ""
    untuned = learning.get("start_candidates_holdout_loss") or {}
    choice = learning.get("start_choice") or {}
    where = "held-out loss"
    samples = choice.get("samples") or {}
    if samples.get("not_yet_learned") and choice.get("trials"):  # judged on more than the held-out split
        untuned, trials = choice["untuned"], choice["trials"]
        where = f"loss on {samples['held_out']} held-out + {samples['not_yet_learned']} not yet learned samples"
    losses = ", ".join(f"{name} {untuned[name]:.3g} -> {loss:.3g}" if name in untuned else f"{name} {loss:.3g}"
                       for name, loss in trials.items())
    text = f" ({where} untuned -> after {learning['start_trial_steps']} trial steps: {losses}"
    lead, t = choice.get("trial_best"), choice.get("t")
    if lead and lead != choice.get("untuned_best"):
        strength = "" if t is None else f", t = {t:.1f}"
        if lead == learning["initial_allocation"]:
            text += f"; the trials overturned the untuned best, {choice['untuned_best']}{strength}"
        elif choice.get("reason"):
            text += f"; {lead}'s lead after the trials was not used: {choice['reason']}"
        else:
            text += f"; {lead}'s lead after the trials was within the held-out noise{strength}"
    return text + ")"


def _learning_line(learning: dict) -> str:
    """One line on what learning did: steps, time, start, and the held-out loss it moved."""
    if learning["method"] == "fcpts":
        what = "fcpts" + (" + reconstruction" if learning["reconstruct"] else "")
        what += f", started from {learning['initial_allocation']}"
        what += describe_start_choice(learning)
    else:
        what = f"reconstruction after {learning['method']}"
    loss = learning["holdout_loss"]
    moved = ""
    refined = learning.get("refinement")
    skipped = (refined or {}).get("skipped")
    if skipped:
        refined = None
    if loss.get("initial") is not None and loss.get("best") is not None:
        stepped = refined["holdout_loss"]["before"] if refined else loss["best"]
        moved = f"; held-out loss {loss['initial']:.4g} -> {stepped:.4g} (best at step {learning['best_step']})"
    if refined:
        moved += (f"; then {refined['exchanges_kept']} of {refined['evaluations']} pair exchanges kept in "
                  f"{refined['seconds']:.0f} s"
                  + ("" if refined["converged"] else " (stopped by the time budget)")
                  + f", learning-split loss {refined['train_loss']['before']:.4g} -> {refined['train_loss']['after']:.4g}, "
                  + (f"held-out -> {refined['holdout_loss']['after']:.4g}" if refined["accepted"] else
                     "not used: the held-out loss did not fall" if refined["exchanges_kept"] else "nothing gained"))
    if skipped:
        moved += f"; no pair exchanges: {skipped}"
    steps = f"{learning['steps']} steps"
    others = learning["steps"] - (learning.get("repeat_iters") or learning["steps"])
    if learning.get("start_trial_continued") and others > 0:
        # the chosen start's trial is the run's first steps; the other candidates' come on top
        steps += (f" ({learning['repeat_iters']} from {learning['initial_allocation']}, its trial's "
                  f"{learning['start_trial_steps']} first; {others} in the other trials)")
    return (f"learned: {what}; {steps} in {learning['seconds']:.0f} s "
            f"({learning['step_time_s']:.2g} s/step, batch {learning.get('batch_size') or learning['memory']['batch_size']})"
            f"{moved}")


def format_summary(report: Report) -> str:
    rows = [
        {
            "name": _short(layer_label(r.name, r.nodes)), "op": r.op_type, "shape": "x".join(map(str, r.shape)),
            "params": _fmt_count(r.params), "before": f"{r.zeros_before / r.params:.1%}",
            "sparsity": f"{r.sparsity:.1%}", "macs": _fmt_count(r.macs),
        }
        for r in report.layers
    ]
    table = format_layer_table(rows, [
        ("layer", "name", "<"), ("op", "op", "<"), ("shape", "shape", "<"), ("params", "params", ">"),
        ("zeros before", "before", ">"), ("sparsity", "sparsity", ">"), ("MACs", "macs", ">"),
    ])
    lines = [
        f"fcpts-onnx {report.tool_version}: {report.method} to {report.target_sparsity:.1%} target",
        table,
        "",
        f"global sparsity: {report.achieved_sparsity:.4%} ({report.zero_params} of {report.total_params} "
        f"prunable weights are zero; target needs {report.required_zeros}), counted in the written file",
    ]
    macs = [r.macs for r in report.layers]
    if all(m is not None for m in macs) and macs:
        nz = sum(r.nonzero_macs for r in report.layers)
        lines.append(f"MACs of prunable layers: {_fmt_count(sum(macs))} dense, {_fmt_count(nz)} on non-zero weights")
    if report.learning is not None:
        lines.append(_learning_line(report.learning))
    for f in report.fidelity:
        parts = []
        if f.get("top1_agreement") is not None:
            interval = f.get("top1_interval")
            parts.append(f"top-1 agreement {f['top1_agreement']:.2%}" + (
                f" (95% interval {interval[0]:.1%} to {interval[1]:.1%} over {f['samples']} samples)"
                if interval and f.get("samples") else ""))
        if f.get("kl") is not None:
            parts.append(f"KL {f['kl']:.3g}")
        if f.get("nmse") is not None:
            parts.append(f"NMSE {f['nmse']:.3g}")
        if f.get("cosine") is not None:
            parts.append(f"cosine {f['cosine']:.4f}")
        if f.get("exact_match") is not None:
            parts.append(f"exact match {f['exact_match']:.2%}")
        lines.append(f"fidelity of output {f['name']!r} vs dense: " + ", ".join(parts))
    cal = report.calibration
    kind = "generated" if cal["generated"] else "calibration"
    if cal.get("learned_on"):
        lines.append(f"on the {cal['held_out_samples']} of {cal['n_samples']} {kind} samples held out from learning "
                     f"({cal['source']}; learned on the other {cal['learned_on']}; they also chose the "
                     "snapshot kept, which can flatter these numbers)")
    else:
        lines.append(f"on {cal['n_samples']} {kind} samples ({cal['source']})")
    if report.skipped:
        lines.append(f"{len(report.skipped)} weight(s) left dense: " + "; ".join(
            f"{_short(s['name'], 40)} ({s['reason']})" for s in report.skipped[:5]
        ) + (" ..." if len(report.skipped) > 5 else ""))
    for note in report.notes:
        lines.append(f"note: {note}")
    lines.append(f"wrote {report.output_path}")
    if report.bench is not None:
        from .bench.report import format_bench

        lines += ["", format_bench(report.bench)]
    return "\n".join(lines)
