"""Loading and saving ONNX models: external data, integrity checks, atomic writes."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import ModelLoadError, OutputError

# protobuf cannot serialise a message of 2 GiB or more; leave headroom for the graph.
_PROTOBUF_LIMIT = 2**31 - 64 * 2**20


@dataclass
class LoadedModel:
    """A model held in memory with every tensor's data loaded."""

    model: onnx.ModelProto
    path: Path
    external_data_files: tuple[str, ...]  # relative locations, empty when self-contained
    external_tensors: frozenset[str]  # names of the tensors that were stored externally

    @property
    def has_external_data(self) -> bool:
        return bool(self.external_data_files)


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _all_tensors(graph: onnx.GraphProto):
    """Every TensorProto in the graph: initializers and Constant/attribute tensors, recursively."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for sub in attr.graphs:
                yield from _all_tensors(sub)


def _external_locations(model: onnx.ModelProto) -> list[str]:
    locations = []
    for tensor in _all_tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location" and entry.value not in locations:
                    locations.append(entry.value)
    return locations


def external_tensor_names(model: onnx.ModelProto) -> set[str]:
    """Names of main-graph tensors whose data sits in an external file (Constant nodes by output)."""
    names = {t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.HasField("t") and attr.t.data_location == onnx.TensorProto.EXTERNAL:
                names.add(node.output[0])
    return names


def _check_location_inside(base_dir: Path, location: str, model_path: Path) -> None:
    """Refuse external data that points outside the model's folder (path traversal, symlinks)."""
    if os.path.isabs(location):
        raise ModelLoadError(
            f"{model_path}: external data location {location!r} is an absolute path; "
            "keep the data file next to the model and use a relative location"
        )
    target = (base_dir / location).resolve()
    if not target.is_relative_to(base_dir.resolve()):
        raise ModelLoadError(
            f"{model_path}: external data location {location!r} points outside the model's folder; "
            "move the data file next to the model"
        )
    if not target.is_file():
        raise ModelLoadError(
            f"{model_path}: external data file {location!r} is missing; copy it next to the model"
        )
    if (base_dir / location).is_symlink():  # onnx refuses to read external data through a link
        raise ModelLoadError(
            f"{model_path}: external data file {location!r} is a symbolic link, which onnx does not read; "
            "put the real file next to the model"
        )


def _check_tensor_sizes(model: onnx.ModelProto, path: Path) -> None:
    """Refuse a tensor of unknown type or whose bytes do not match its dims and type
    (onnx.checker lets both pass, and they would fail deep inside the tool)."""
    known = set(onnx.TensorProto.DataType.values())
    for tensor in _all_tensors(model.graph):
        if tensor.data_type not in known:
            raise ModelLoadError(f"{path}: tensor {tensor.name!r} has an unknown data type ({tensor.data_type}); "
                                 "the file is damaged or from a newer ONNX: re-export the model")
        if not tensor.HasField("raw_data") or tensor.data_type in (onnx.TensorProto.STRING,
                                                                   onnx.TensorProto.UNDEFINED):
            continue
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        except (KeyError, TypeError, ValueError):
            continue  # an unknown type: the checker reports it
        bits = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}.get(tensor.data_type)
        count = 1
        for d in tensor.dims:
            count *= max(int(d), 0)
        expected = (count * bits + 7) // 8 if bits else count * itemsize
        if len(tensor.raw_data) != expected:
            raise ModelLoadError(
                f"{path}: tensor {tensor.name!r} holds {len(tensor.raw_data)} bytes, but its dims "
                f"{list(tensor.dims)} as {onnx.TensorProto.DataType.Name(tensor.data_type)} need {expected}; "
                "the file is damaged: re-export the model"
            )


def load_model(path: str | os.PathLike) -> LoadedModel:
    """Read a model and its external data, refusing anything that is not a valid ONNX file."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file; check the model path")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a folder, not an ONNX file; pass the .onnx file inside it")
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except PermissionError:
        raise ModelLoadError(f"{path}: permission denied; make the file readable") from None
    except (DecodeError, ValueError, RuntimeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(
            f"{path}: not an ONNX model ({type(exc).__name__}); export the model to .onnx first"
        ) from None
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read ({exc.strerror or exc}); check the file") from None
    if not model.HasField("graph") or len(model.graph.node) == 0:
        raise ModelLoadError(f"{path}: not an ONNX model (no graph nodes); export the model to .onnx first")
    locations = _external_locations(model)
    external = external_tensor_names(model)
    for location in locations:
        _check_location_inside(path.parent, location, path)
    if locations:
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except (OSError, ValueError, onnx.checker.ValidationError) as exc:
            first = (str(exc).strip().splitlines() or ["unreadable"])[0]
            raise ModelLoadError(f"{path}: cannot read external data ({first}); check the data file") from None
    _check_tensor_sizes(model, path)
    try:
        # The path form also works past protobuf's 2 GiB limit and checks external data.
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        # the checker's message may break mid-sentence ("of node: \n(name)"): one line, bounded
        first = " ".join(str(exc).split())[:240] or "invalid model"
        raise ModelLoadError(
            f"{path}: fails onnx.checker ({first}); re-export the model or fix the graph"
        ) from None
    except UnicodeDecodeError:  # the checker's message quotes a name whose bytes are not UTF-8
        raise ModelLoadError(
            f"{path}: fails onnx.checker (a name in the graph is not valid UTF-8: the file is damaged); "
            "re-export the model"
        ) from None
    return LoadedModel(model=model, path=path, external_data_files=tuple(locations),
                       external_tensors=frozenset(external))


def tensor_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in _all_tensors(model.graph))


def external_data_name(output_path: Path) -> str:
    return output_path.name + ".data"


def _mark_external(model: onnx.ModelProto, location: str) -> None:
    """Mark the tensors of 1 KiB or more to be written to ``location`` (relative to the model).

    onnx.save_model(..., location=...) refuses when a file of that name exists in the current
    working directory, not the model's folder: re-running an optimize whose output sat in the
    working directory failed. Converting without a location (a unique name) and renaming the
    location in the proto writes the same file without that check.
    """
    from onnx.external_data_helper import convert_model_to_external_data

    convert_model_to_external_data(model, all_tensors_to_one_file=True, location=None, size_threshold=1024)
    for tensor in _all_tensors(model.graph):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location


def check_output_path(output_path: Path, input_model: LoadedModel) -> None:
    """Refuse outputs that would overwrite the input or land where nothing can be written."""
    input_files = {input_model.path.resolve()}
    input_files |= {(input_model.path.parent / loc).resolve() for loc in input_model.external_data_files}
    targets = {output_path.resolve(), (output_path.parent / external_data_name(output_path)).resolve()}
    if input_files & targets:
        raise OutputError(
            f"{output_path}: the output would overwrite the input model; choose another path with -o"
        )
    _check_writable(output_path, "output", "-o", "model.sparse.onnx")


def _check_writable(path: Path, what: str, flag: str, example: str) -> None:
    """Refuse a file path that is a folder, or whose folder is missing or read-only."""
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give a file name such as {example}")
    parent = path.parent
    if not parent.is_dir():
        raise OutputError(f"{parent}: {what} folder does not exist; create it or choose another {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{parent}: {what} folder is not writable; choose another {flag}")


def check_report_path(report_path: Path, output_path: Path, input_model: LoadedModel) -> None:
    """Refuse a report path that would overwrite a model file or cannot be written (checked before any work)."""
    models = {input_model.path.resolve(), output_path.resolve(),
              (output_path.parent / external_data_name(output_path)).resolve()}
    models |= {(input_model.path.parent / loc).resolve() for loc in input_model.external_data_files}
    if report_path.resolve() in models:
        raise OutputError(f"{report_path}: the report would overwrite a model file; choose another --report path")
    _check_writable(report_path, "report", "--report", "model.report.json")


@dataclass
class StagedOutput:
    """A model written into a private folder beside its destination, moved there on commit.

    Verification reads the staged files; only a model that passed is committed, by
    renames within one file system, so a failure at any point leaves nothing behind.
    """

    output_path: Path
    tmp_dir: Path
    written: list[Path] = field(default_factory=list)

    @property
    def model_path(self) -> Path:
        return self.tmp_dir / self.output_path.name

    @property
    def data_path(self) -> Path:
        return self.tmp_dir / external_data_name(self.output_path)

    def save(self, model: onnx.ModelProto, *, external_data: bool) -> None:
        external_data = external_data or tensor_bytes(model) > _PROTOBUF_LIMIT
        try:
            if external_data:
                to_save = onnx.ModelProto()
                to_save.CopyFrom(model)  # onnx.save moves tensors out of the proto it is given
                _mark_external(to_save, self.data_path.name)
                onnx.save_model(to_save, str(self.model_path))  # writes the marked tensors beside it
            else:
                onnx.save_model(model, str(self.model_path))
        except OSError as exc:
            raise OutputError(
                f"{self.output_path}: cannot write ({exc.strerror or exc}); check free space and permissions"
            ) from None

    def commit(self) -> list[Path]:
        """Move the staged files into place, data file first so the model never dangles."""
        final_data = self.output_path.parent / self.data_path.name
        try:
            if self.data_path.exists():
                os.replace(self.data_path, final_data)
                self.written.append(final_data)
            os.replace(self.model_path, self.output_path)
            self.written.append(self.output_path)
        except OSError as exc:
            for path in self.written:
                path.unlink(missing_ok=True)
            raise OutputError(f"{self.output_path}: cannot move into place ({exc.strerror or exc})") from None
        return self.written


@contextmanager
def staged_output(output_path: str | os.PathLike) -> Iterator[StagedOutput]:
    """Stage a model beside ``output_path``; the staging folder is always removed."""
    output_path = Path(output_path)
    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=".fcpts-tmp-", dir=output_path.parent))
    except OSError as exc:
        raise OutputError(
            f"{output_path.parent}: cannot write there ({exc.strerror or exc}); choose another -o"
        ) from None
    try:
        yield StagedOutput(output_path, tmp_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def save_model_atomic(model: onnx.ModelProto, output_path: str | os.PathLike, *, external_data: bool) -> list[Path]:
    """Write the model (and its data file) so that either all of it appears or nothing does."""
    with staged_output(output_path) as stage:
        stage.save(model, external_data=external_data)
        return stage.commit()
