"""Top-1 accuracy of an MNIST classifier in ONNX form on the bundled evaluation split.

The evaluation split (``models/mnist_cnn/eval.npz``, written by ``tools/export_mnist.py``)
stores raw ``uint8`` pixels and ``int64`` labels; this module applies the same
preprocessing the model was trained with (torchvision ``ToTensor`` followed by
``Normalize((0.1307,), (0.3081,))``) and runs the model in onnxruntime on the CPU.

Usage::

    python tools/mnist_eval.py MODEL.onnx [MODEL2.onnx ...]

Only numpy and onnxruntime are needed, so the helper can score a sparsified model
without torch installed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

# Normalisation constants of digit-recognizer-py (the usual MNIST mean / std).
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

_REPO_ROOT = Path(__file__).resolve().parents[1]
# Anchored at the repository root rather than the working directory, so the default
# works wherever the helper is called from.
DEFAULT_EVAL_NPZ = _REPO_ROOT / "models" / "mnist_cnn" / "eval.npz"


def preprocess(images: np.ndarray) -> np.ndarray:
    """Turn raw pixels into model input.

    Args:
        images: ``uint8`` (or any numeric) array of shape ``[N, 28, 28]`` with values 0..255.

    Returns:
        ``float32`` array of shape ``[N, 1, 28, 28]``: ``(pixels / 255 - mean) / std``.
    """
    x = np.asarray(images, dtype=np.float32) / np.float32(255.0)
    x = (x - np.float32(MNIST_MEAN)) / np.float32(MNIST_STD)
    return x.reshape(-1, 1, 28, 28).astype(np.float32, copy=False)


def evaluate(
    model_path: str | os.PathLike[str],
    eval_npz: str | os.PathLike[str] = DEFAULT_EVAL_NPZ,
    batch_size: int = 512,
) -> float:
    """Top-1 accuracy of an ONNX model on the MNIST evaluation split.

    Args:
        model_path: ONNX model taking ``[batch, 1, 28, 28]`` float32 input and returning
            ``[batch, 10]`` scores as its first output.
        eval_npz: ``.npz`` file with ``images`` (``uint8 [N, 28, 28]``) and ``labels``
            (integer ``[N]``).
        batch_size: samples per onnxruntime call.

    Returns:
        Fraction of samples whose arg-max score equals the label, in ``[0, 1]``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    with np.load(eval_npz) as data:
        images = data["images"]
        labels = data["labels"].astype(np.int64)
    if len(images) == 0:
        raise ValueError(f"{eval_npz} holds no samples")

    scores = _scores(model_path, images, batch_size)
    return int(np.count_nonzero(scores.argmax(axis=1) == labels)) / len(images)


def _scores(model_path, images: np.ndarray, batch_size: int) -> np.ndarray:
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    parts = [session.run(None, {input_name: preprocess(images[start : start + batch_size])})[0]
             for start in range(0, len(images), batch_size)]
    return np.concatenate(parts).astype(np.float64)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def fidelity(
    model_path: str | os.PathLike[str],
    dense_path: str | os.PathLike[str],
    eval_npz: str | os.PathLike[str] = DEFAULT_EVAL_NPZ,
    batch_size: int = 512,
) -> dict[str, float]:
    """Finer measures than accuracy on the evaluation split, which near the dense model's
    accuracy moves by whole images (1 of 4488 is 0.022%).

    Returns:
        ``accuracy``; ``nll``: mean cross-entropy of the labels (the test log-loss);
        ``agreement``: share of arg-max equal to the dense model's; ``kl``: mean
        KL(dense || model) of the softmax outputs (temperature 1).
    """
    with np.load(eval_npz) as data:
        images = data["images"]
        labels = data["labels"].astype(np.int64)
    logp = _log_softmax(_scores(model_path, images, batch_size))
    dense = _log_softmax(_scores(dense_path, images, batch_size))
    return {
        "accuracy": float(np.mean(logp.argmax(axis=1) == labels)),
        "nll": float(-np.mean(logp[np.arange(len(labels)), labels])),
        "agreement": float(np.mean(logp.argmax(axis=1) == dense.argmax(axis=1))),
        "kl": float(np.mean(np.sum(np.exp(dense) * (dense - logp), axis=1))),
    }


def main(argv: list[str] | None = None) -> int:
    """CLI: print the accuracy of each model given on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path, help="ONNX model file(s)")
    parser.add_argument("--eval-npz", type=Path, default=DEFAULT_EVAL_NPZ, help="evaluation split")
    parser.add_argument("--batch-size", type=int, default=512)
    args = parser.parse_args(argv)
    for model in args.models:
        accuracy = evaluate(model, args.eval_npz, args.batch_size)
        print(f"{model}: top-1 accuracy {accuracy:.4%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
