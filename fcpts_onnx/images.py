"""Calibration from a folder of images, preprocessed the way the model expects.

``ImageFolder(path, resize=256, crop=(224, 224), mean=..., std=..., ...)`` is a calibration
source like an .npz file; the CLI builds one when ``--calib`` names a folder. Preprocessing
order: decode -> RGB/grayscale -> resize (shorter side to ``resize``, or straight to the
crop size) -> centre crop -> x * scale -> (x - mean) / std -> channel order -> layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CalibrationError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass(frozen=True)
class ImageFolder:
    """A folder of images and how to turn each into a model input.

    Attributes:
        path: the folder (searched recursively, files sorted by path).
        resize: shorter side after resizing; None resizes straight to the crop size.
        crop: (height, width) of the centre crop; None takes the model input's static size.
        mean, std: per-channel normalisation after scaling (one value for grayscale).
        scale: multiplies the 0..255 pixel values first (1/255 gives 0..1).
        layout: "NCHW" or "NHWC"; None guesses from the input shape (channels of 1 or 3).
        channel_order: "RGB" or "BGR".
        limit: use at most this many images (the first ones in sorted order).
    """

    path: str | Path
    resize: int | None = None
    crop: tuple[int, int] | None = None
    mean: Sequence[float] = (0.0,)
    std: Sequence[float] = (1.0,)
    scale: float = 1 / 255
    layout: str | None = None
    channel_order: str = "RGB"
    limit: int | None = None


def _layout(dims: Sequence, given: str | None) -> str:
    if given is not None:
        if given not in ("NCHW", "NHWC"):
            raise CalibrationError(f"--layout {given!r}: use NCHW or NHWC")
        return given
    if len(dims) == 4 and dims[1] in (1, 3) and dims[3] not in (1, 3):
        return "NCHW"
    if len(dims) == 4 and dims[3] in (1, 3):
        return "NHWC"
    return "NCHW"


def load_image_folder(folder: ImageFolder, input_name: str, dims: Sequence | None, dtype: np.dtype) -> np.ndarray:
    """Images as one array shaped for the graph input (first axis = sample)."""
    try:
        from PIL import Image
    except ImportError:
        raise CalibrationError("reading an image folder needs Pillow: pip install pillow") from None
    root = Path(folder.path)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if folder.limit:
        files = files[: folder.limit]
    if not files:
        raise CalibrationError(f"{root}: no images found ({', '.join(sorted(IMAGE_SUFFIXES))}); check the folder")
    if dims is None or len(dims) != 4:
        raise CalibrationError(
            f"{root}: an image folder feeds a 4-D image input, but {input_name!r} has shape {dims}; "
            "give an .npz instead"
        )
    layout = _layout(dims, folder.layout)
    channels = dims[1] if layout == "NCHW" else dims[3]
    channels = channels if isinstance(channels, int) else 3
    if channels not in (1, 3):
        raise CalibrationError(f"{root}: input {input_name!r} has {channels} channels; images give 1 or 3")
    static_hw = (dims[2], dims[3]) if layout == "NCHW" else (dims[1], dims[2])
    crop = folder.crop or (tuple(static_hw) if all(isinstance(d, int) for d in static_hw) else None)
    if crop is None:
        raise CalibrationError(
            f"input {input_name!r} has dynamic height/width; give the image size with --crop HxW"
        )
    mean = np.array(folder.mean, dtype=np.float32).reshape(-1)
    std = np.array(folder.std, dtype=np.float32).reshape(-1)
    if mean.size not in (1, channels) or std.size not in (1, channels) or np.any(std == 0):
        raise CalibrationError(f"--mean/--std need 1 or {channels} values and a non-zero std")
    if folder.channel_order not in ("RGB", "BGR"):
        raise CalibrationError(f"--channel-order {folder.channel_order!r}: use RGB or BGR")
    out = []
    for file in files:
        try:
            with Image.open(file) as img:
                img = img.convert("L" if channels == 1 else "RGB")
                if folder.resize:
                    w, h = img.size
                    s = folder.resize / min(w, h)
                    img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
                    w, h = img.size
                    ch, cw = crop
                    if ch > h or cw > w:
                        raise CalibrationError(f"--crop {ch}x{cw} is larger than the resized image {h}x{w}")
                    top, left = (h - ch) // 2, (w - cw) // 2
                    img = img.crop((left, top, left + cw, top + ch))
                else:
                    img = img.resize((crop[1], crop[0]), Image.BILINEAR)
                array = np.asarray(img, dtype=np.float32)
        except CalibrationError:
            raise
        except Exception as exc:  # PIL raises many types for unreadable files
            raise CalibrationError(f"{file}: cannot read the image ({type(exc).__name__}); remove or fix it") from None
        if array.ndim == 2:
            array = array[:, :, None]
        if folder.channel_order == "BGR" and channels == 3:
            array = array[:, :, ::-1]
        array = (array * folder.scale - mean) / std
        out.append(array.transpose(2, 0, 1) if layout == "NCHW" else array)
    return np.stack(out).astype(dtype)
