#!/usr/bin/env bash
# Create the separate interpreter that runs DeepSparse for `fcpts-onnx bench`.
#
#   bash tools/setup_deepsparse.sh [VENV_DIR]      (default: .venv-deepsparse in the repo root)
#
# DeepSparse 1.8.0 needs onnx<1.15 and numpy<2, which cannot live in the main environment
# (onnx>=1.16, numpy 2). It runs on x86-64/aarch64 Linux with Python 3.8-3.11. bench finds
# the interpreter at VENV_DIR/bin/python, or wherever FCPTS_DEEPSPARSE_PYTHON or
# --deepsparse-python points.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv-deepsparse}"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for candidate in python3.11 python3.10 python3.9 python3.8 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(0 if (3, 8) <= sys.version_info[:2] <= (3, 11) else 1)' 2>/dev/null; then
      PY="$candidate"; break
    fi
  done
fi
if [ -z "$PY" ]; then
  echo "setup_deepsparse: DeepSparse 1.8.0 needs Python 3.8-3.11; none found (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi
echo "setup_deepsparse: creating $VENV with $("$PY" --version 2>&1)"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "deepsparse==1.8.0" "onnx<1.15" "numpy<2"
NM_DISABLE_ANALYTICS=1 "$VENV/bin/python" -c 'import deepsparse, onnx, numpy; print("setup_deepsparse: deepsparse", deepsparse.__version__, "onnx", onnx.__version__, "numpy", numpy.__version__)'
echo "setup_deepsparse: done; fcpts-onnx bench finds $VENV/bin/python"
