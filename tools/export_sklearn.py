"""Export the scikit-learn MLP under tests/data/skl2onnx/ with skl2onnx, as a scikit-learn user would.

scikit-learn and skl2onnx are not this project's dependencies, so this runs in a virtual
environment of its own:

    python -m venv /tmp/sklenv
    /tmp/sklenv/bin/pip install scikit-learn skl2onnx onnx
    /tmp/sklenv/bin/python tools/export_sklearn.py [--out tests/data/skl2onnx]

The classifier is trained on scikit-learn's bundled 8x8 digits (1797 images, pixels / 16; no
download), seed 0. Two exports: the default one, whose probabilities leave through a ZipMap
(a list of {class: probability} maps, which the trainable form cannot hold), and one with
``zipmap=False``, whose outputs are tensors: the labels (ArgMax mapped to the classes by an
ai.onnx.ml ArrayFeatureExtractor) and the probabilities. The digits go beside them
(digits.npz) for tools/bench_sklearn.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "data" / "skl2onnx")
    args = parser.parse_args()
    import numpy as np
    import skl2onnx
    import sklearn
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32) / 16
    clf = MLPClassifier((64, 32), max_iter=300, random_state=0).fit(x, y)
    args.out.mkdir(parents=True, exist_ok=True)
    # the digits themselves (pixels 0..16 as uint8, 115 kB), for tools/bench_sklearn.py
    pixels, _ = load_digits(return_X_y=True)
    np.savez_compressed(args.out / "digits.npz", pixels=pixels.astype(np.uint8), labels=y.astype(np.int64))
    for name, options in (("mlp_digits.onnx", None), ("mlp_digits_nozipmap.onnx", {id(clf): {"zipmap": False}})):
        model = to_onnx(clf, x[:1], options=options, target_opset=17)
        (args.out / name).write_bytes(model.SerializeToString())
        print(f"{name}: training accuracy {clf.score(x, y):.4f}, scikit-learn {sklearn.__version__}, "
              f"skl2onnx {skl2onnx.__version__}")


if __name__ == "__main__":
    main()
