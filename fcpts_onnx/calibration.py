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

Not every graph keeps its samples on every input's first axis. A streaming export's state
([2, batch, 128] beside a signal [batch, 512]; an LSTM's h0/c0 [layers, batch, hidden]) keeps
them on another axis, and a scalar input (a sample rate) is a setting with one value for
every sample. :func:`infer_layout` reads where from the graph (``--batch-axis NAME=AXIS`` where
it cannot), and a :class:`BatchLayout` says it: the data is given as the graph takes it,
held here with the samples first, and turned back into graph feeds (settings added) for
every run.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class BatchLayout:
    """Where a graph's inputs and outputs keep their samples, where that is not the first axis.

    ``inputs``: input name -> its batch axis as the graph takes it, or None for a setting (a
    scalar input: one value for every sample); inputs not named keep the batch first.
    ``outputs``: output name -> its batch axis (outputs not named: the first).
    """

    inputs: Mapping[str, int | None] = field(default_factory=dict)
    outputs: Mapping[str, int] = field(default_factory=dict)

    @property
    def trivial(self) -> bool:
        return not self.inputs and not self.outputs

    @property
    def settings(self) -> list[str]:
        return [name for name, axis in self.inputs.items() if axis is None]

    def to_graph(self, name: str, array, xp=np):
        """One input's samples-first array as the graph takes it."""
        axis = self.inputs.get(name, 0)
        return array if not axis else xp.moveaxis(array, 0, axis)

    def output_first(self, name: str, array, xp=np):
        """One output as the graph gives it, samples first."""
        axis = self.outputs.get(name, 0)
        return array if not axis else xp.moveaxis(array, axis, 0)


@dataclass
class CalibrationSet:
    """Validated calibration inputs: one array per batched graph input, first axis = samples
    (whatever axis the graph keeps them on: ``layout``), and the settings' values."""

    arrays: dict[str, np.ndarray]
    source: str
    generated: bool = False
    layout: BatchLayout = field(default_factory=BatchLayout)
    settings: dict[str, np.ndarray] = field(default_factory=dict)  # setting input -> its one value

    @property
    def n_samples(self) -> int:
        return next(iter(self.arrays.values())).shape[0]

    def take(self, index: np.ndarray | slice) -> CalibrationSet:
        return CalibrationSet({k: v[index] for k, v in self.arrays.items()}, self.source, self.generated,
                              self.layout, self.settings)

    def feed(self) -> dict[str, np.ndarray]:
        """All the samples as one feed, as the graph takes them (settings included)."""
        feed = {k: np.ascontiguousarray(self.layout.to_graph(k, v)) for k, v in self.arrays.items()}
        return feed | self.settings

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Feeds of ``batch_size`` samples, as the graph takes them (settings included)."""
        for start in range(0, self.n_samples, batch_size):
            yield self.take(slice(start, start + batch_size)).feed()


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


def _concat(collected: dict[str, list[np.ndarray]], source: str, layout: BatchLayout) -> dict[str, np.ndarray]:
    arrays = {}
    for name, parts in collected.items():
        axis = layout.inputs.get(name, 0)
        if axis is None:  # a setting: one value, the same in every batch
            if any(p.shape != parts[0].shape or not np.array_equal(p, parts[0]) for p in parts):
                raise CalibrationError(
                    f"{source}: input {name!r} is a setting (a scalar) but the batches give it different "
                    "values; calibrate with one value"
                )
            arrays[name] = parts[0]
            continue
        ranks = {p.ndim for p in parts}
        if len(ranks) > 1 or 0 in ranks or min(ranks) <= axis:
            raise CalibrationError(
                f"{source}: batches of input {name!r} differ in rank or are scalars; "
                f"give each batch the shape the model takes, samples on axis {axis}"
            )
        try:
            arrays[name] = np.concatenate(parts, axis=axis)
        except ValueError:
            shapes = sorted({p.shape[:axis] + p.shape[axis + 1:] for p in parts})
            raise CalibrationError(
                f"{source}: batches of input {name!r} have different sample shapes {shapes}; "
                "make them equal"
            ) from None
    return arrays


def _raw_arrays(source: Any, specs: list[InputSpec], layout: BatchLayout) -> tuple[dict[str, np.ndarray], str]:
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
        return _concat(_from_feeds(_reader_feeds(source), name), name, layout), name
    if isinstance(source, Iterable):
        return _concat(_from_feeds(source, "calibration data"), "calibration data", layout), "calibration data"
    raise CalibrationError(
        f"calibration data of type {type(source).__name__} is not understood; pass a .npz/.npy path, "
        "an iterable of feed dicts or a CalibrationDataReader"
    )


def validate(arrays: dict[str, np.ndarray], specs: list[InputSpec], source: str,
             layout: BatchLayout | None = None) -> None:
    """Check names, dtypes, shapes and values against the graph's inputs; the arrays are as
    the graph takes them, samples on each input's batch axis (``layout``)."""
    layout = layout or BatchLayout()
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
        sample_axis = layout.inputs.get(name, 0)
        if sample_axis is None:  # a setting: one value for every sample
            if array.ndim != 0:
                raise CalibrationError(
                    f"{source}: input {name!r} is a setting the model takes as a scalar (one value for every "
                    f"sample) but the data gives shape {list(array.shape)}; give one value, a 0-d array"
                )
        elif spec.dims is not None:
            where = "the first axis is" if sample_axis == 0 else f"axis {sample_axis} is"
            if array.ndim != len(spec.dims):
                raise CalibrationError(
                    f"{source}: input {name!r} has shape {list(array.shape)} but the model expects "
                    f"{spec.describe()} (rank {len(spec.dims)}); {where} the sample axis"
                )
            for axis, (want, got) in enumerate(zip(spec.dims, array.shape)):
                if axis != sample_axis and isinstance(want, int) and want != got:
                    raise CalibrationError(
                        f"{source}: input {name!r} has shape {list(array.shape)} but the model expects "
                        f"{spec.describe()} (axis {axis} must be {want})"
                    )
            batch = spec.dims[sample_axis] if isinstance(spec.dims[sample_axis], int) else None
            if batch and array.shape[sample_axis] % batch:
                raise CalibrationError(
                    f"{source}: input {name!r} has {array.shape[sample_axis]} samples but the model's batch is "
                    f"fixed at {batch}; give a multiple of {batch}"
                )
        if sample_axis is not None and (array.ndim <= sample_axis or array.shape[sample_axis] == 0):
            raise CalibrationError(f"{source}: input {name!r} has no samples; give at least one")
        if np.issubdtype(array.dtype, np.floating) or array.dtype.kind == "V":
            bad = np.count_nonzero(~np.isfinite(array.astype(np.float32)))
            if bad:
                raise CalibrationError(
                    f"{source}: input {name!r} has {bad} NaN or infinite values; clean the data first"
                )
        if sample_axis is not None:
            counts[name] = array.shape[sample_axis]
    if not counts:
        raise CalibrationError(f"{source}: every input is a setting; the model needs at least one batched input")
    if len(set(counts.values())) > 1:
        per_input = ", ".join(f"{k!r}: {v}" for k, v in sorted(counts.items()))
        raise CalibrationError(
            f"{source}: inputs have different sample counts ({per_input}); give every input the same number"
        )


# ends an onnxruntime failure on generated inputs: dynamic dimensions were guessed (32)
GENERATED_INPUTS_HINT = ("; the inputs were generated from the graph's shapes: give real ones with --calib or "
                         "sizes with --shape")


def generate(specs: list[InputSpec], n_samples: int = 8, seed: int = 0,
             shapes: Mapping[str, tuple[int, ...]] | None = None,
             layout: BatchLayout | None = None) -> CalibrationSet:
    """Random inputs from the graph's declared shapes, for verification when no data is given.

    Dynamic dims take their value from ``shapes`` (per input, full shape as the graph takes
    it) or DEFAULT_DYNAMIC_DIM. Float inputs are standard normal, integer inputs zero. A
    setting (a scalar input) cannot be made up: it is refused with what to give instead.
    """
    layout = layout or infer_layout(specs)
    rng = np.random.default_rng(seed)
    arrays = {}
    settings = [spec.name for spec in specs if layout.inputs.get(spec.name, 0) is None]
    if settings:
        raise CalibrationError(
            f"input {settings[0]!r} is a setting the model takes as a scalar (a sample rate, say), and random "
            "inputs cannot choose its value; give calibration data with its value as a 0-d array "
            "(numpy.savez(..., NAME=numpy.array(VALUE)))")
    # Inputs with a dynamic batch axis follow the fixed one: a stateful export declares
    # [1, 1, H] for its state beside [batch, T] for its signal (silero-vad).
    fixed = static_batch_of(specs, layout)
    for spec in specs:
        axis = layout.inputs.get(spec.name, 0)
        if shapes and spec.name in shapes:
            shape = tuple(shapes[spec.name])
        elif spec.dims is None:
            raise CalibrationError(
                f"input {spec.name!r} has no declared shape; give calibration data with --calib"
            )
        else:
            declared = spec.dims[axis]
            batch = declared if isinstance(declared, int) else n_samples
            if fixed:  # a graph with one fixed batch B for every input takes any multiple of B samples
                batch = -(-n_samples // fixed) * fixed
            shape = tuple(batch if i == axis else d if isinstance(d, int) else DEFAULT_DYNAMIC_DIM
                          for i, d in enumerate(spec.dims))
        if np.issubdtype(spec.dtype, np.floating):
            array = rng.standard_normal(shape).astype(spec.dtype)
        else:
            array = np.zeros(shape, dtype=spec.dtype)
        arrays[spec.name] = np.moveaxis(array, axis, 0) if axis else array
    return CalibrationSet(arrays, "generated", generated=True, layout=layout)


def load_calibration(source: Any, model: onnx.ModelProto, layout: BatchLayout | None = None) -> CalibrationSet:
    """Read and validate calibration data from any accepted source (see module docstring);
    the data is as the graph takes it (``layout``: where each input keeps its samples)."""
    specs = graph_inputs(model)
    layout = layout or infer_layout(specs)
    if source is None:
        return generate(specs, layout=layout)
    if isinstance(source, CalibrationSet):
        validate(source.feed(), specs, source.source, source.layout)
        return source
    arrays, name = _raw_arrays(source, specs, layout)
    if not arrays:
        raise CalibrationError(f"{name}: holds no arrays; give one array per model input")
    validate(arrays, specs, name, layout)
    settings = {k: v for k, v in arrays.items() if layout.inputs.get(k, 0) is None}
    batched = {k: (np.moveaxis(v, layout.inputs.get(k, 0), 0) if layout.inputs.get(k, 0) else v)
               for k, v in arrays.items() if k not in settings}
    return CalibrationSet(batched, name, layout=layout, settings=settings)


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


def infer_layout(specs: list[InputSpec], batch_axes: Mapping[str, int] | None = None) -> BatchLayout:
    """Where each input keeps its samples (see the module docstring): ``batch_axes`` where
    given, a scalar input is a setting, and an input whose first axis the graph fixes at a
    size the others do not share keeps them where the others' batch is named, or on its one
    dynamic axis (a state [2, batch, 128]); where every first axis is fixed, on its axis of
    the size every input has (the batch of a fixed-batch streaming export). A dimension name
    every input has once (``batch`` in a time-major x [T, batch, F] and h0 [2, batch, H]) is
    the batch before all that. Raises
    UnsupportedModelError, naming the input and the option, where the graph does not say."""
    from .errors import OptionError

    batch_axes = dict(batch_axes or {})
    by_name = {s.name: s for s in specs}
    unknown = sorted(set(batch_axes) - set(by_name))
    if unknown:
        raise OptionError(f"--batch-axis names {', '.join(map(repr, unknown))}, not among the model's inputs "
                          f"({'; '.join(s.describe() for s in specs)})")
    axes: dict[str, int | None] = {}
    for name, axis in batch_axes.items():
        dims = by_name[name].dims
        if dims is not None and not 0 <= axis < len(dims):
            raise OptionError(f"--batch-axis {name}={axis}: input {name!r} has {len(dims)} axes "
                              f"({by_name[name].describe()}); give one from 0 to {len(dims) - 1}")
        axes[name] = int(axis)
    for spec in specs:
        if spec.name not in axes and spec.dims is not None and len(spec.dims) == 0:
            axes[spec.name] = None  # a setting
    rest = [s for s in specs if s.name not in axes and s.dims]
    fixed_first = [s for s in rest if isinstance(s.dims[0], int)]
    dynamic_first = [s for s in rest if not isinstance(s.dims[0], int)]
    sizes = {s.dims[0] for s in fixed_first}
    batch_names = {s.dims[0] for s in dynamic_first if isinstance(s.dims[0], str)}
    moved: dict[str, int] = {}
    refuse = None
    # Where the first axes disagree, a dimension name every input has once is the batch
    # (time-major exports: x [T, batch, F] beside h0 [layers, batch, H]); of several, the one
    # called batch. Where they agree, only a name called batch moves it (x [seq, batch_size]).
    common = sorted(d for d in {d for d in rest[0].dims if isinstance(d, str)}
                    if all(list(s.dims).count(d) == 1 for s in rest)) if rest else []
    disagree = len(sizes) > 1 or bool(fixed_first and dynamic_first)
    if len(common) > 1 or not disagree:
        common = [d for d in common if "batch" in d.lower()]
    if len(common) == 1:
        moved = {s.name: list(s.dims).index(common[0]) for s in rest}
    elif fixed_first and dynamic_first:
        ambiguous, stuck = [], []
        for s in fixed_first:
            named = [i for i, d in enumerate(s.dims) if isinstance(d, str) and d in batch_names]
            dynamic = [i for i, d in enumerate(s.dims) if not isinstance(d, int)]
            if len(named) == 1:
                moved[s.name] = named[0]
            elif not batch_names and len(dynamic) == 1:  # nothing named (spox writes no names): its one dynamic axis
                moved[s.name] = dynamic[0]
            elif not batch_names and dynamic:
                ambiguous.append(s)
            else:  # no axis the batch could be on
                stuck.append(s)
        if ambiguous:
            refuse = ambiguous[0]
        elif stuck and len(sizes) == 1:
            # a state fixed at [1, 1, H] beside a dynamic signal: the graph runs at that one batch
            moved = {}
        elif stuck:
            refuse = stuck[0]
    elif len(sizes) > 1:  # every first axis fixed, at different sizes: the batch is the size all have
        common = [b for b in sorted(sizes) if all(b in s.dims for s in fixed_first)]
        if len(common) == 1:
            moved = {s.name: list(s.dims).index(common[0]) for s in fixed_first if s.dims[0] != common[0]}
        else:
            refuse = next(s for s in fixed_first if s.dims[0] != min(sizes))
    if refuse is not None:
        listing = "; ".join(s.describe() for s in rest)
        raise UnsupportedModelError(
            f"cannot tell which axis of input {refuse.name!r} holds the samples: the graph fixes its first axis "
            f"at {refuse.dims[0]} and the inputs do not agree on a batch axis ({listing}); say where with "
            f"--batch-axis {refuse.name}=AXIS (the axis that grows with the number of samples)")
    axes.update({k: v for k, v in moved.items() if v})
    return BatchLayout(inputs={k: v for k, v in axes.items() if v != 0})


def static_batch_of(specs: list[InputSpec], layout: BatchLayout) -> int | None:
    """The batch size the graph fixes on its inputs' batch axes, if it fixes one."""
    sizes = set()
    for spec in specs:
        axis = layout.inputs.get(spec.name, 0)
        if axis is not None and spec.dims and isinstance(spec.dims[axis], int):
            sizes.add(spec.dims[axis])
    return max(sizes) if sizes else None


def static_batch(model: onnx.ModelProto, layout: BatchLayout | None = None) -> int | None:
    """The graph's fixed batch size, when its inputs declare one on their batch axes."""
    specs = graph_inputs(model)
    return static_batch_of(specs, layout if layout is not None else infer_layout(specs))
