"""Calibration data: readers for every accepted source, validated against the graph's inputs.

Whatever the source, calibration becomes a :class:`CalibrationSet`: one array per graph
input whose first axis is the sample axis (the graph's batch axis). Sources:

- ``.npz`` file: keys are graph input names, first axis = sample;
- ``.npy`` file: one array, for single-input models;
- an iterable of feed dicts ``{input_name: array}`` (each a batch);
- an onnxruntime ``CalibrationDataReader`` (anything with ``get_next()``);
- ``None``: inputs generated from the graph's shapes (smoke runs only).

Everything is checked before any work: names, dtypes, ranks and static dimensions, sample
counts, and NaN/inf values.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .errors import CalibrationError, UnsupportedModelError

DEFAULT_DYNAMIC_DIM = 32  # generated inputs: unknown dims after the batch axis (override with shapes)


@dataclass(frozen=True)
class InputSpec:
    """A graph input as the graph declares it; dims are ints, or None/str when dynamic."""

    name: str
    dtype: np.dtype
    dims: tuple[int | str | None, ...] | None  # None: rank unknown

    def describe(self) -> str:
        dims = "?" if self.dims is None else "[" + ", ".join("?" if not isinstance(d, int) else str(d) for d in self.dims) + "]"
        return f"{self.name} {self.dtype} {dims}"

    @property
    def static_batch(self) -> int | None:
        if self.dims and isinstance(self.dims[0], int):
            return self.dims[0]
        return None


def graph_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller must feed (initializers that double as inputs are left out)."""
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        tt = vi.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)) if tt.elem_type else np.dtype("float32")
        dims = None
        if tt.HasField("shape"):
            # paddle2onnx and others write -1 for a dynamic size: read any negative size as dynamic
            dims = tuple(
                (d.dim_value if d.dim_value >= 0 else None) if d.HasField("dim_value") else (d.dim_param or None)
                for d in tt.shape.dim
            )
            if dims and dims[0] == 0:
                raise UnsupportedModelError(
                    f"input {vi.name!r} declares the shape {list(dims)}, a batch of 0; re-export the model "
                    "with a positive or named (dynamic) batch dimension")
        specs.append(InputSpec(vi.name, dtype, dims))
    return specs


@dataclass
class CalibrationSet:
    """Validated calibration inputs: one array per graph input, first axis = samples."""

    arrays: dict[str, np.ndarray]
    source: str
    generated: bool = False

    @property
    def n_samples(self) -> int:
        return next(iter(self.arrays.values())).shape[0]

    def take(self, index: np.ndarray | slice) -> CalibrationSet:
        return CalibrationSet({k: v[index] for k, v in self.arrays.items()}, self.source, self.generated)

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, self.n_samples, batch_size):
            yield {k: v[start:start + batch_size] for k, v in self.arrays.items()}


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
        for key, value in arrays.items():
            if not isinstance(value, np.ndarray):  # numpy hands back raw bytes for a member that is not .npy
                raise CalibrationError(
                    f"{path}: entry {key!r} is not a numpy array; save the file with numpy.savez"
                )
        return arrays
    except ValueError as exc:
        # numpy says "Object arrays cannot be loaded" for a real object array; a file that is
        # not .npy/.npz at all gets "contains pickled (object) data" and is corrupt, not pickled.
        if "object arrays" in str(exc).lower():
            raise CalibrationError(
                f"{path}: holds object arrays (pickled data), which are refused; save plain numeric arrays"
            ) from None
        reason = "not numpy data" if "pickle" in str(exc).lower() else exc  # numpy would suggest unpickling
        raise CalibrationError(f"{path}: not a readable .npz file ({reason}); save it with numpy.savez") from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise CalibrationError(f"{path}: not a readable .npz file ({exc}); save it with numpy.savez") from None


def _read_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        # numpy says "Object arrays cannot be loaded" for a real object array; a file that is
        # not .npy/.npz at all gets "contains pickled (object) data" and is corrupt, not pickled.
        if "object arrays" in str(exc).lower():
            raise CalibrationError(
                f"{path}: holds an object array (pickled data), which is refused; save a plain numeric array"
            ) from None
        reason = "not numpy data" if "pickle" in str(exc).lower() else exc  # numpy would suggest unpickling
        raise CalibrationError(f"{path}: not a readable .npy file ({reason}); save it with numpy.save") from None
    except (OSError, EOFError) as exc:
        raise CalibrationError(f"{path}: not a readable .npy file ({exc}); save it with numpy.save") from None


def _from_feeds(feeds: Iterable[Mapping[str, Any]], source: str) -> dict[str, list[np.ndarray]]:
    collected: dict[str, list[np.ndarray]] = {}
    keys = None
    for i, feed in enumerate(feeds):
        if not isinstance(feed, Mapping):
            raise CalibrationError(
                f"{source}: item {i} is a {type(feed).__name__}, not a dict of input name -> array"
            )
        if keys is None:
            keys = set(feed)
        elif set(feed) != keys:
            raise CalibrationError(
                f"{source}: item {i} has inputs {sorted(feed)} but item 0 has {sorted(keys)}; "
                "give every batch the same inputs"
            )
        for name, value in feed.items():
            collected.setdefault(name, []).append(np.asarray(value))
    return collected


def _reader_feeds(reader: Any) -> Iterator[Mapping[str, Any]]:
    """Drain an onnxruntime CalibrationDataReader (get_next() until None)."""
    if hasattr(reader, "rewind"):
        reader.rewind()
    while (feed := reader.get_next()) is not None:
        yield feed


def _concat(collected: dict[str, list[np.ndarray]], source: str) -> dict[str, np.ndarray]:
    arrays = {}
    for name, parts in collected.items():
        ranks = {p.ndim for p in parts}
        if len(ranks) > 1 or 0 in ranks:
            raise CalibrationError(
                f"{source}: batches of input {name!r} differ in rank or are scalars; "
                "give each batch the shape [batch, ...]"
            )
        try:
            arrays[name] = np.concatenate(parts, axis=0)
        except ValueError:
            shapes = sorted({p.shape[1:] for p in parts})
            raise CalibrationError(
                f"{source}: batches of input {name!r} have different sample shapes {shapes}; "
                "make them equal"
            ) from None
    return arrays


def _raw_arrays(source: Any, specs: list[InputSpec]) -> tuple[dict[str, np.ndarray], str]:
    from .images import ImageFolder, load_image_folder

    if isinstance(source, (str, Path)) and Path(source).is_dir():
        source = ImageFolder(source)
    if isinstance(source, ImageFolder):
        if len(specs) != 1:
            raise CalibrationError(
                f"{source.path}: an image folder feeds one input but the model has {len(specs)}; use an .npz"
            )
        spec = specs[0]
        return {spec.name: load_image_folder(source, spec.name, spec.dims, spec.dtype)}, str(source.path)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise CalibrationError(f"{path}: no such calibration file; check the --calib path")
        if path.suffix == ".npz":
            return _read_npz(path), str(path)
        if path.suffix == ".npy":
            if len(specs) != 1:
                names = ", ".join(s.name for s in specs)
                raise CalibrationError(
                    f"{path}: a .npy file holds one array but the model has {len(specs)} inputs ({names}); "
                    "use a .npz with one key per input"
                )
            return {specs[0].name: _read_npy(path)}, str(path)
        raise CalibrationError(
            f"{path}: unsupported calibration file type {path.suffix or '(none)'!r}; use .npz or .npy"
        )
    if isinstance(source, Mapping):
        return {k: np.asarray(v) for k, v in source.items()}, "calibration dict"
    if hasattr(source, "get_next"):
        name = type(source).__name__
        return _concat(_from_feeds(_reader_feeds(source), name), name), name
    if isinstance(source, Iterable):
        return _concat(_from_feeds(source, "calibration data"), "calibration data"), "calibration data"
    raise CalibrationError(
        f"calibration data of type {type(source).__name__} is not understood; pass a .npz/.npy path, "
        "an iterable of feed dicts or a CalibrationDataReader"
    )


def validate(arrays: dict[str, np.ndarray], specs: list[InputSpec], source: str) -> None:
    """Check names, dtypes, shapes and values against the graph's inputs."""
    expected = {s.name: s for s in specs}
    listing = "; ".join(s.describe() for s in specs)
    unknown = sorted(set(arrays) - set(expected))
    if unknown:
        raise CalibrationError(
            f"{source}: {', '.join(map(repr, unknown))} not among the model's inputs ({listing}); rename the keys"
        )
    missing = sorted(set(expected) - set(arrays))
    if missing:
        raise CalibrationError(
            f"{source}: no data for input {', '.join(map(repr, missing))} (model inputs: {listing}); add it"
        )
    counts: dict[str, int] = {}
    for name, array in arrays.items():
        spec = expected[name]
        if array.dtype == object:
            raise CalibrationError(f"{source}: input {name!r} is an object array; give a numeric array")
        if array.dtype != spec.dtype:
            raise CalibrationError(
                f"{source}: input {name!r} is {array.dtype} but the model expects {spec.dtype}; "
                f"convert it with .astype({str(spec.dtype)!r})"
            )
        if spec.dims is not None:
            if array.ndim != len(spec.dims):
                raise CalibrationError(
                    f"{source}: input {name!r} has shape {list(array.shape)} but the model expects "
                    f"{spec.describe()} (rank {len(spec.dims)}); the first axis is the sample axis"
                )
            for axis, (want, got) in enumerate(zip(spec.dims, array.shape)):
                if axis > 0 and isinstance(want, int) and want != got:
                    raise CalibrationError(
                        f"{source}: input {name!r} has shape {list(array.shape)} but the model expects "
                        f"{spec.describe()} (axis {axis} must be {want})"
                    )
            batch = spec.static_batch
            if batch and array.shape[0] % batch:
                raise CalibrationError(
                    f"{source}: input {name!r} has {array.shape[0]} samples but the model's batch is fixed "
                    f"at {batch}; give a multiple of {batch}"
                )
        if array.ndim == 0 or array.shape[0] == 0:
            raise CalibrationError(f"{source}: input {name!r} has no samples; give at least one")
        if np.issubdtype(array.dtype, np.floating) or array.dtype.kind == "V":
            bad = np.count_nonzero(~np.isfinite(array.astype(np.float32)))
            if bad:
                raise CalibrationError(
                    f"{source}: input {name!r} has {bad} NaN or infinite values; clean the data first"
                )
        counts[name] = array.shape[0]
    if len(set(counts.values())) > 1:
        per_input = ", ".join(f"{k!r}: {v}" for k, v in sorted(counts.items()))
        raise CalibrationError(
            f"{source}: inputs have different sample counts ({per_input}); give every input the same number"
        )


def generate(specs: list[InputSpec], n_samples: int = 8, seed: int = 0,
             shapes: Mapping[str, tuple[int, ...]] | None = None) -> CalibrationSet:
    """Random inputs from the graph's declared shapes, for verification when no data is given.

    Dynamic dims take their value from ``shapes`` (per input, full shape including batch)
    or DEFAULT_DYNAMIC_DIM. Float inputs are standard normal, integer inputs zero.
    """
    rng = np.random.default_rng(seed)
    arrays = {}
    # Inputs with a dynamic first axis follow the fixed one: a stateful export declares
    # [1, 1, H] for its state beside [batch, T] for its signal (silero-vad).
    batches = {spec.static_batch for spec in specs if spec.static_batch}
    fixed = batches.pop() if len(batches) == 1 else None
    for spec in specs:
        if shapes and spec.name in shapes:
            shape = tuple(shapes[spec.name])
        elif spec.dims is None:
            raise CalibrationError(
                f"input {spec.name!r} has no declared shape; give calibration data with --calib"
            )
        else:
            batch = spec.static_batch or n_samples
            if fixed:  # a graph with one fixed batch B for every input takes any multiple of B samples
                batch = -(-n_samples // fixed) * fixed
            shape = (batch,) + tuple(d if isinstance(d, int) else DEFAULT_DYNAMIC_DIM for d in spec.dims[1:])
        if np.issubdtype(spec.dtype, np.floating):
            arrays[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        else:
            arrays[spec.name] = np.zeros(shape, dtype=spec.dtype)
    return CalibrationSet(arrays, "generated", generated=True)


def load_calibration(source: Any, model: onnx.ModelProto) -> CalibrationSet:
    """Read and validate calibration data from any accepted source (see module docstring)."""
    specs = graph_inputs(model)
    if source is None:
        return generate(specs)
    if isinstance(source, CalibrationSet):
        validate(source.arrays, specs, source.source)
        return source
    arrays, name = _raw_arrays(source, specs)
    if not arrays:
        raise CalibrationError(f"{name}: holds no arrays; give one array per model input")
    validate(arrays, specs, name)
    return CalibrationSet(arrays, name)


HOLDOUT_MIN = 4


def split_holdout(calibration: CalibrationSet, fraction: float, seed: int,
                  multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Sample indices (train, holdout): a seeded random ``fraction`` held out, at least HOLDOUT_MIN.

    The held-out samples are never learned on; they choose the snapshot and measure fidelity.
    ``multiple``: a graph with a fixed batch size B needs both parts in multiples of B.
    """
    n = calibration.n_samples
    n_holdout = max(int(round(fraction * n)), min(HOLDOUT_MIN, n // 2))
    n_holdout = -(-n_holdout // multiple) * multiple
    if n < 2 * multiple or n_holdout < 1 or n - n_holdout < multiple:
        raise CalibrationError(
            f"{calibration.source}: {n} calibration sample(s) cannot be split into learning and held-out "
            f"parts{f' in multiples of the fixed batch {multiple}' if multiple > 1 else ''}; "
            "give more (a few hundred is typical)"
        )
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_holdout:]), np.sort(order[:n_holdout])


def batch_axis_conflict(specs: list[InputSpec]) -> str | None:
    """Why the inputs cannot be batched along their first axis, or None when they can.

    Every reader here takes the first axis of every input as the sample (batch) axis. A scalar
    input has none, and inputs that fix different sizes there (a streaming export's state
    [2, 1, 128] beside its signal [1, 576]) have no common one."""
    scalars = [s.name for s in specs if s.dims is not None and len(s.dims) == 0]
    if scalars:
        return (f"input {scalars[0]!r} is a scalar, so it has no batch axis to stack calibration samples on; "
                "fold it into the graph as a constant (it is usually a setting such as a sample rate) "
                "and give the model again")
    fixed = {s.name: s.static_batch for s in specs if s.static_batch}
    if len(set(fixed.values())) > 1:
        listing = ", ".join(f"{name!r} {size}" for name, size in fixed.items())
        return (f"the inputs fix different sizes on their first axis ({listing}); fcpts-onnx reads the first "
                "axis of every input as the batch axis: re-export with one shared (or dynamic) batch axis first")
    return None


def static_batch(model: onnx.ModelProto) -> int | None:
    """The graph's fixed batch size, when its inputs declare one."""
    sizes = {s.static_batch for s in graph_inputs(model) if s.static_batch}
    return max(sizes) if sizes else None
