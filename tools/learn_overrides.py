"""``--learn KEY=VALUE`` for the benchmarks: any LearnOptions field, for experiments.

    python tools/bench_orientation.py --runs fcpts:on --learn max_sparsity_step=none

Values are read as Python literals (``0.02``, ``True``, ``"lamp"``); ``none`` is None and a
bare word is a string. Unknown fields are refused by name, so a typo cannot pass as a run
with the defaults.
"""

from __future__ import annotations

import ast
import dataclasses


def parse_learn_overrides(pairs: list[str] | None) -> dict:
    from fcpts_onnx.learner.options import LearnOptions

    fields = {f.name for f in dataclasses.fields(LearnOptions)}
    overrides = {}
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise SystemExit(f"--learn {pair!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(fields))}")
        if text.strip().lower() == "none":
            value = None
        else:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text
        overrides[key] = value
    return overrides
