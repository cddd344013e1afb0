"""How many bytes a model takes: on disk, zip-compressed, and with pruned weights as sparse tensors.

- ``file_bytes``: the .onnx file plus its external data files.
- ``zip_bytes``: those files deflated (zipfile, level 6) in memory, the size a download or an
  app bundle pays.
- ``sparse_initializer_bytes``: the serialized model with every prunable weight whose
  non-zeros take fewer bytes as (value, int64 index) pairs stored in graph.sparse_initializer
  (what ``optimize --store sparse`` writes); ``sparse_initializer_zip_bytes`` deflated.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Sequence
from pathlib import Path

import onnx

from ..discovery import PrunableWeight
from ..sparse_storage import to_sparse_storage

ZIP_LEVEL = 6


def zip_size(members: Sequence[tuple[str, bytes]]) -> int:
    """Bytes of a zip archive of ``members`` (name, data), deflate level 6, built in memory."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=ZIP_LEVEL) as archive:
        for name, data in members:
            archive.writestr(name, data)
    return buffer.tell()


def model_sizes(path: Path, external_files: Sequence[str], model: onnx.ModelProto,
                weights: list[PrunableWeight]) -> dict:
    """Sizes of the model at ``path``; ``model`` is its densified in-memory form, ``weights`` its
    prunable weights as discovered in ``model``."""
    files = [path] + [path.parent / loc for loc in external_files]
    members = [(f.name, f.read_bytes()) for f in files]
    sizes: dict = {
        "file_bytes": sum(len(data) for _, data in members),
        "zip_bytes": zip_size(members),
        "sparse_initializer_bytes": None,
        "sparse_initializer_zip_bytes": None,
        "sparse_weights": 0,
    }
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    summary = to_sparse_storage(copy, weights)
    try:
        data = copy.SerializeToString()
    except ValueError:  # over protobuf's 2 GiB: no single-file form to measure
        return sizes
    sizes["sparse_initializer_bytes"] = len(data)
    sizes["sparse_initializer_zip_bytes"] = zip_size([(path.name, data)])
    sizes["sparse_weights"] = len(summary.converted)
    return sizes
