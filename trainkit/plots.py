"""Figures as PNG bytes: results curves, confusion matrices, image grids.

matplotlib is imported here only, inside the functions, with the Agg backend: nothing that
does not draw pays for it, and no display is needed.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

from trainkit.text import plot_text


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(figure, dpi: int = 100, tight: bool = True) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    _pyplot().close(figure)
    return buffer.getvalue()


def _floats(rows: list[dict], key: str) -> list[float | None]:
    values = []
    for row in rows:
        try:
            values.append(float(row[key]) if row.get(key) not in (None, "") else None)
        except ValueError:
            values.append(None)
    return values


def _plot_series(axis, epochs, values, label, **style) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    points = [(e, v) for e, v in zip(epochs, values) if v is not None]
    if points:
        xs, ys = zip(*points)
        axis.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, label=label, **style)


def results_png(rows: list[dict]) -> bytes:
    """metrics.csv rows → loss, accuracy and lr per epoch (three panels)."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    epochs = [int(float(row["epoch"])) for row in rows]
    _plot_series(axes[0], epochs, _floats(rows, "train_loss"), "train")
    _plot_series(axes[0], epochs, _floats(rows, "val_loss"), "val")
    axes[0].set_title("loss")
    percent = lambda values: [None if v is None else 100 * v for v in values]  # noqa: E731
    _plot_series(axes[1], epochs, percent(_floats(rows, "train_accuracy")), "train")
    _plot_series(axes[1], epochs, percent(_floats(rows, "val_accuracy")), "val")
    axes[1].set_title("accuracy (%)")
    _plot_series(axes[2], epochs, _floats(rows, "lr"), "lr", color="tab:green")
    axes[2].set_title("learning rate (end of epoch)")
    for axis in axes:
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    figure.tight_layout()
    return _png(figure)


def curves_png(runs: list[tuple[str, list[dict]]]) -> bytes:
    """Several runs' curves overlaid: val accuracy, val loss, train loss per epoch."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for name, rows in runs:
        epochs = [int(float(row["epoch"])) for row in rows]
        accuracy = [None if v is None else 100 * v for v in _floats(rows, "val_accuracy")]
        _plot_series(axes[0], epochs, accuracy, plot_text(name))
        _plot_series(axes[1], epochs, _floats(rows, "val_loss"), plot_text(name))
        _plot_series(axes[2], epochs, _floats(rows, "train_loss"), plot_text(name))
    for axis, title in zip(axes, ("val accuracy (%)", "val loss", "train loss")):
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    return _png(figure)


def confusion_png(matrix, classes: Sequence[str]) -> bytes:
    """(K, K) counts (rows: true, columns: predicted) → counts and row-normalised panels.
    Readable at 100 classes: the figure grows with K, tick labels shrink, and the numbers are
    written in the cells only while they fit. Margins are fixed (no tight layout): laying out
    hundreds of tick labels again for each layout pass is what makes big matrices slow."""
    import numpy as np

    plt = _pyplot()
    counts = np.asarray(matrix, dtype=np.int64)
    k = counts.shape[0]
    normalised = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    cell = 0.32 if k <= 20 else 0.16  # inches per class
    panel = max(3.5, cell * k)
    margin = 0.4 + 0.065 * min(24, max((len(str(c)) for c in classes), default=1))  # room for labels
    width, height = 2 * (panel + margin + 0.9) + 0.3, panel + margin + 0.7
    figure = plt.figure(figsize=(width, height))
    tick_size = 9 if k <= 20 else 6 if k <= 60 else 5
    names = [plot_text(name, 24) for name in classes]
    panels = (
        (counts, "counts", "d"),
        (normalised, "row-normalised (recall on the diagonal)", ".2f"),
    )
    for index, (data, title, fmt) in enumerate(panels):
        left = (margin + index * (panel + margin + 0.9)) / width
        axis = figure.add_axes((left, margin / height, panel / width, panel / height))
        top = data.max() if data.max() > 0 else 1
        image = axis.imshow(data, cmap="Blues", vmin=0, vmax=top, interpolation="nearest", aspect="auto")
        bar = figure.add_axes((left + (panel + 0.1) / width, margin / height, 0.15 / width, panel / height))
        figure.colorbar(image, cax=bar)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("predicted")
        axis.set_ylabel("true")
        axis.set_xticks(range(k))
        axis.set_yticks(range(k))
        axis.set_xticklabels(names, rotation=90, fontsize=tick_size)
        axis.set_yticklabels(names, fontsize=tick_size)
        if k <= 20:
            for i, j in zip(*np.nonzero(data)):
                value = data[i, j]
                text = format(int(value), "d") if fmt == "d" else format(value, fmt)
                color = "white" if value > top / 2 else "black"
                axis.text(j, i, text, ha="center", va="center", fontsize=7 if k > 10 else 8, color=color)
    return _png(figure, dpi=100, tight=False)


# ---------------------------------------------------------------------------- image grids
# Drawn with PIL, not matplotlib subplots: a 32-image grid takes milliseconds instead of ~1.5 s.


def _font(size: int):
    """DejaVu Sans from matplotlib's own files (wide Unicode coverage), found without importing
    matplotlib; PIL's default font otherwise."""
    import importlib.util
    from pathlib import Path

    from PIL import ImageFont

    spec = importlib.util.find_spec("matplotlib")
    for folder in spec.submodule_search_locations if spec and spec.submodule_search_locations else []:
        path = Path(folder) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if path.is_file():
            return ImageFont.truetype(str(path), size)
    return ImageFont.load_default()


def _thumbnail(image, side: int):
    """uint8 (C, H, W) tensor or (H, W, C) array → a PIL RGB image, longest side `side`."""
    import numpy as np
    from PIL import Image

    pixels = image.permute(1, 2, 0).numpy() if hasattr(image, "permute") else np.asarray(image)
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    picture = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), "RGB")
    scale = side / max(picture.size)
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    small = max(picture.size) * 2 <= side  # tiny images: keep their pixels sharp
    return picture.resize(size, Image.NEAREST if small else Image.BILINEAR)


def _png_of(picture) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def image_grid_png(images, captions: Sequence[str], columns: int = 8, title: str | None = None) -> bytes:
    """uint8 (N, C, H, W) images with a caption each (one or two short lines) → a PNG grid."""
    from PIL import Image, ImageDraw

    from trainkit.text import printable

    side, caption_height, pad = 104, 30, 6
    count = len(images)
    columns = max(1, min(columns, count))
    rows = max(1, math.ceil(count / columns))
    top = 26 if title else 0
    width = columns * (side + pad) + pad
    canvas = Image.new("RGB", (width, top + rows * (side + caption_height + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font(11)
    if title:
        draw.text((pad, 6), printable(title, 120), fill="black", font=_font(14))
    for index in range(count):
        row, column = divmod(index, columns)
        x = pad + column * (side + pad)
        y = top + pad + row * (side + caption_height + pad)
        thumb = _thumbnail(images[index], side)
        canvas.paste(thumb, (x + (side - thumb.width) // 2, y + (side - thumb.height) // 2))
        for line_number, line in enumerate(str(captions[index]).split("\n")[:2]):
            draw.text((x, y + side + 2 + 13 * line_number), line, fill="black", font=font)
    return _png_of(canvas)


def class_grid_png(samples: list[tuple[str, list]], per_class: int) -> bytes:
    """[(class name, [uint8 (C, H, W), ...]), ...] → one row per class, its name on the left."""
    from PIL import Image, ImageDraw

    from trainkit.text import printable

    side, pad, label_width = 64, 4, 150
    rows = max(1, len(samples))
    canvas = Image.new(
        "RGB", (label_width + per_class * (side + pad) + pad, rows * (side + pad) + pad), "white"
    )
    draw = ImageDraw.Draw(canvas)
    font = _font(12)
    for row, (name, images) in enumerate(samples):
        y = pad + row * (side + pad)
        draw.text((pad, y + side // 2 - 7), printable(name, 22), fill="black", font=font)
        for column, image in enumerate(images[:per_class]):
            thumb = _thumbnail(image, side)
            x = label_width + column * (side + pad)
            canvas.paste(thumb, (x + (side - thumb.width) // 2, y + (side - thumb.height) // 2))
    return _png_of(canvas)
