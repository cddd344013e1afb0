"""Is fcpts measurably closer to the dense MNIST model than a data-free allocator? A paired test.

    python tools/mnist_paired.py [--sparsity 0.7] [--against lamp] [--seeds 0,1,2] [--reconstruct]

Each of the 4488 test images gets its KL(dense || sparse) under fcpts and under the other
method; the script prints the mean of the per-image differences (fcpts minus the other), its
standard error and t for each fcpts seed. |t| below about 2 means the test images cannot tell
the two apart. The accuracy table of tools/bench_mnist.py moves in whole images, and a mean
KL alone does not say whether a gap is larger than the images' spread.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "mnist_cnn" / "mnist_cnn.onnx"
CALIB = ROOT / "models" / "mnist_cnn" / "calib.npz"
sys.path.insert(0, str(ROOT / "tools"))


def per_image_kl(path: Path, dense_logp: np.ndarray, images: np.ndarray) -> np.ndarray:
    import mnist_eval

    logq = mnist_eval._log_softmax(mnist_eval._scores(path, images, 512))
    return np.sum(np.exp(dense_logp) * (dense_logp - logq), axis=1)


def main(argv: list[str] | None = None) -> int:
    import mnist_eval

    from fcpts_onnx import sparsify
    from fcpts_onnx.learner.options import LearnOptions

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--against", default="lamp", help="uniform, global, erk or lamp")
    parser.add_argument("--seeds", default="0,1,2", help="fcpts learner seeds")
    parser.add_argument("--reconstruct", action="store_true", help="both methods with reconstruction (the "
                        "other one then runs with the first seed)")
    args = parser.parse_args(argv)
    with np.load(mnist_eval.DEFAULT_EVAL_NPZ) as data:
        images = data["images"]
    dense = mnist_eval._log_softmax(mnist_eval._scores(MODEL, images, 512))
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sparse.onnx"
        sparsify(MODEL, out, CALIB, sparsity=args.sparsity, method=args.against, reconstruct=args.reconstruct,
                 learn=LearnOptions(seed=seeds[0]), report_path=False)
        other = per_image_kl(out, dense, images)
        recon = "with" if args.reconstruct else "without"
        print(f"{args.sparsity:.0%} {recon} reconstruction, {len(images)} test images; "
              f"{args.against}: mean KL {other.mean():.5f}")
        for seed in seeds:
            sparsify(MODEL, out, CALIB, sparsity=args.sparsity, method="fcpts", reconstruct=args.reconstruct,
                     learn=LearnOptions(seed=seed), report_path=False)
            diff = per_image_kl(out, dense, images) - other
            se = diff.std(ddof=1) / np.sqrt(diff.size)
            print(f"fcpts seed {seed}: mean KL {other.mean() + diff.mean():.5f}; fcpts - {args.against} "
                  f"{diff.mean():+.2e} +- {se:.2e} (t = {diff.mean() / se:+.2f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
