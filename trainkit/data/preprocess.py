"""The one definition of preprocessing, shared by train, eval and predict.

An image becomes a uint8 tensor (C, H, W) with the model's channels and size (`decode_image`
for files, `to_channels` + `resize` for arrays); batches of those become normalized floats with
`Preprocess.normalize`. The Preprocess record is saved in every checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import os
import stat
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from trainkit.errors import TrainkitError

# Refuse images whose declared size is above this many pixels before decoding them
# (a decompression bomb is a tiny file declaring a huge canvas).
MAX_IMAGE_PIXELS = 64_000_000
# Transparent pixels are composited on this background before dropping alpha.
ALPHA_BACKGROUND = (255, 255, 255)
EXIF_ORIENTATION = 0x0112  # the EXIF tag that says how the camera was held
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}

KNOWN_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def image_files(directory: str, problems: list[str] | None = None) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of every image under `directory`, in sorted path order: the one
    rule for which files are images, used by the ImageFolder scan and by predict's folders.

    os.scandir hands back each entry's type without a stat and one stat per image gives the
    cache key's size and mtime: about 10x faster than Path.rglob + is_file + stat. Hidden
    entries are skipped, as glob does (macOS "._x.jpg" resource forks are not images). A folder
    reached twice (a symbolic link loop) is walked once; links to folders are followed (class
    folders linked into a shared store are common) except to a file system's root, /proc, /sys
    or /dev (a link to / or /proc would walk the whole machine). With
    `problems` given, such links, loops, unreadable folders and image names that are not
    regular files (a FIFO would block the reader) are described there and the walk goes on;
    else an unreadable folder raises and the others are warned about. Links to nothing are
    skipped with a warning.
    """
    found: list[tuple[str, int, int]] = []
    dangling: list[str] = []
    skipped: list[str] = []  # for the warning when there is no `problems` list
    pending = [directory]
    seen: set[tuple[int, int]] = set()

    def problem(message: str) -> None:
        (problems if problems is not None else skipped).append(message)

    while pending:
        folder = pending.pop()
        try:
            info = os.stat(folder)
            if (info.st_dev, info.st_ino) in seen:
                problem(f"{folder}: a symbolic link loop, skipped")
                continue
            seen.add((info.st_dev, info.st_ino))
            with os.scandir(folder) as scan:
                entries = list(scan)
        except OSError as error:
            if problems is None:
                raise
            problems.append(f"{folder}: cannot list ({error.strerror or error}), skipped")
            continue
        for entry in entries:
            name = entry.name
            if name[0] == ".":
                continue
            try:
                if entry.is_dir():
                    target = os.path.realpath(entry.path) if entry.is_symlink() else None
                    if target is not None and _system_folder(target):
                        problem(f"{entry.path}: a link to {target}, not followed")
                    else:
                        pending.append(entry.path)
                elif name[name.rfind(".") :].lower() in IMAGE_EXTENSIONS:
                    if entry.is_file():
                        stat_result = entry.stat()
                        found.append((entry.path, stat_result.st_size, stat_result.st_mtime_ns))
                    elif entry.is_symlink() and not os.path.exists(entry.path):
                        dangling.append(entry.path)  # a link to nothing: skipped, never silently
                    else:  # a FIFO, socket or device (or a link to one)
                        problem(f"{entry.path}: not a regular file, skipped")
            except OSError as error:  # e.g. a link to itself: ELOOP
                if problems is None:
                    raise
                problems.append(f"{entry.path}: {error.strerror or error}, skipped")
    from trainkit.reporting import warn
    from trainkit.text import printable

    if dangling:
        dangling.sort()
        more = f" and {len(dangling) - 3} more" if len(dangling) > 3 else ""
        shown = ", ".join(printable(name) for name in dangling[:3])
        warn(f"skipped {len(dangling)} broken symbolic link(s): {shown}{more}")
    for message in sorted(skipped)[:3]:
        warn(printable(message))
    if len(skipped) > 3:
        warn(f"and {len(skipped) - 3} more entries skipped")
    found.sort()
    return found


# Where a folder link found in a walk is never followed: the whole machine (a link to / reaches
# everything, /proc/<pid>/root again) or kernel pseudo-files that are not images and never end.
SYSTEM_FOLDERS = ("/proc", "/sys", "/dev")


def _system_folder(path: str) -> bool:
    if os.path.dirname(path) == path:  # a file system's root: / (or C:\\)
        return True
    return any(path == top or path.startswith(top + os.sep) for top in SYSTEM_FOLDERS)


RESIZE_MODES = ("squash", "crop", "letterbox")
CROP_FRACTION = 0.875  # resize=crop without resize_size: 224 px crops of 256 px (the ImageNet rule)


def stored_side(image_size: int, resize_mode: str, resize_size: int | None) -> int:
    """Side of the square each image is decoded (and cached) to: the crop's source square for
    resize=crop, the model's input side otherwise."""
    if resize_mode != "crop":
        return image_size
    return max(image_size, resize_size or int(round(image_size / CROP_FRACTION)))


@dataclass(frozen=True)
class Preprocess:
    """How raw images become model inputs: channels, square size, per-channel mean/std, and the
    resize mode. Files are decoded to `stored_size` squares (`fit_image`); `prepare` makes a
    batch of those the model's input (the centre crop of resize=crop, then normalisation)."""

    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str = "squash"
    resize_size: int | None = None  # resize=crop: the shorter side before the crop

    @property
    def stored_size(self) -> int:
        return stored_side(self.image_size, self.resize, self.resize_size)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> Preprocess:
        resize = str(state.get("resize", "squash"))  # checkpoints before resize modes squashed
        if resize not in RESIZE_MODES:
            raise TrainkitError(f"unknown resize mode {resize!r} in the checkpoint")
        resize_size = state.get("resize_size")
        return cls(
            channels=int(state["channels"]),
            image_size=int(state["image_size"]),
            mean=tuple(float(m) for m in state["mean"]),
            std=tuple(float(s) for s in state["std"]),
            resize=resize,
            resize_size=None if resize_size is None else int(resize_size),
        )

    def center_crop(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) stored squares → (B, C, image_size, image_size)."""
        side, size = images.shape[-1], self.image_size
        if side == size:
            return images
        start = (side - size) // 2
        return images[..., start : start + size, start : start + size]

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Stored uint8 squares (B, C, S, S) → the model's normalized float input (eval, predict)."""
        return self.normalize(self.center_crop(images))

    def normalize(self, images: torch.Tensor, value_range: float = 255.0) -> torch.Tensor:
        """(B, C, H, W) → float32 x * scale - shift = (x / value_range - mean) / std: the one
        normalization formula (uint8 images have value_range 255, augmented floats 1).

        A float copy, then two in-place passes: on CPU (torch 2.14, 2 threads) 0.05 ms for a
        128 x 3 x 32 x 32 batch, where one broadcast `addcmul` took 1.4 ms (13 % of a LeNet step)
        and a mixed uint8 x float `mul` 1.1 ms."""
        scale, shift = _normalization_constants(self.mean, self.std, value_range, images.device)
        return images.to(torch.float32, copy=True).mul_(scale).sub_(shift)


@functools.lru_cache(maxsize=64)
def _normalization_constants(
    mean: tuple[float, ...], std: tuple[float, ...], value_range: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each (1, C, 1, 1) on `device`: made once, not at every batch (as normal
    tensors even when first asked for under inference mode, so that training may use them)."""
    with torch.inference_mode(False):
        return _constants(mean, std, value_range, device)


def _constants(mean, std, value_range, device) -> tuple[torch.Tensor, torch.Tensor]:
    scale = torch.tensor([1.0 / (value_range * s) for s in std], device=device).view(1, -1, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std)], device=device).view(1, -1, 1, 1)
    return scale, shift


def stats_for(
    normalization: Any, dataset_name: str, channels: int, native_channels: int
) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """Mean/std from the config; None means 'compute them from the training images'."""
    if normalization == "none":
        return (0.0,) * channels, (1.0,) * channels
    if normalization == "half":
        return (0.5,) * channels, (0.5,) * channels
    if normalization == "imagenet":
        if channels == 3:
            return IMAGENET_STATS
        mean, std = IMAGENET_STATS
        return (sum(mean) / 3,), (sum(std) / 3,)
    if normalization == "dataset":
        if dataset_name in KNOWN_STATS and channels == native_channels:
            return KNOWN_STATS[dataset_name]
        return None
    mean, std = tuple(normalization.mean), tuple(normalization.std)
    if len(mean) != channels or len(std) != channels:
        from trainkit.errors import ConfigError

        raise ConfigError("data.normalization", f"mean and std need {channels} values each")
    return mean, std


def compute_stats(images) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of a uint8 (N, C, H, W) tensor, or of an iterable of such chunks
    (so a sample of large images never has to sit in memory at once), in chunks to bound memory."""
    chunks = [images] if isinstance(images, torch.Tensor) else images
    total = total_sq = None
    count = 0
    for part in chunks:
        for start in range(0, part.shape[0], 4096):
            # float32 within a chunk (torch sums pairwise), float64 across chunks: 3x faster
            chunk = part[start : start + 4096].to("cpu", torch.float32)
            if total is None:
                total = torch.zeros(chunk.shape[1], dtype=torch.float64)
                total_sq = torch.zeros(chunk.shape[1], dtype=torch.float64)
            total += chunk.sum(dim=(0, 2, 3)).double()
            total_sq += (chunk * chunk).sum(dim=(0, 2, 3)).double()
            count += chunk.shape[0] * chunk.shape[2] * chunk.shape[3]
    total, total_sq = total / 255.0, total_sq / 255.0**2
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(round(float(m), 4) for m in mean), tuple(round(max(float(s), 1e-3), 4) for s in std)


# --------------------------------------------------------------------------- pixels


def to_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 (..., C, H, W) with C in {1, 3} → `channels` (ITU-R 601 luma for RGB → L)."""
    have = images.shape[-3]
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return images.expand(*images.shape[:-3], 3, *images.shape[-2:]).contiguous()
    if have == 3 and channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114], device=images.device).view(3, 1, 1)
        gray = (images.float() * weights).sum(dim=-3, keepdim=True)
        return gray.round_().clamp_(0, 255).to(torch.uint8)
    raise TrainkitError(f"cannot convert {have}-channel images to {channels} channels")


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (..., C, H, W) → (..., C, size, size), bilinear with antialiasing."""
    if images.shape[-2:] == (size, size):
        return images
    from torchvision.transforms.v2 import functional as TF

    return TF.resize(images, [size, size], antialias=True)


def fit_image(images: torch.Tensor, size: int, mode: str = "squash") -> torch.Tensor:
    """uint8 (..., C, H, W) → (..., C, size, size): squash = stretch; crop = shorter side to
    `size` (longer side scaled and truncated, as torchvision's Resize), then the centre square;
    letterbox = longer side to `size`, centred on black padding."""
    if mode == "squash":
        return resize(images, size)
    from torchvision.transforms.v2 import functional as TF

    height, width = images.shape[-2:]
    if mode == "crop":
        short, long = min(height, width), max(height, width)
        new_long = max(size, int(size * long / short))
        new = (size, new_long) if height <= width else (new_long, size)
        if tuple(new) != (height, width):
            images = TF.resize(images, list(new), antialias=True)
        top, left = (new[0] - size) // 2, (new[1] - size) // 2
        return images[..., top : top + size, left : left + size].contiguous()
    if mode == "letterbox":
        scale = size / max(height, width)
        new = (max(1, int(round(height * scale))), max(1, int(round(width * scale))))
        if tuple(new) != (height, width):
            images = TF.resize(images, list(new), antialias=True)
        out = torch.zeros(*images.shape[:-2], size, size, dtype=images.dtype, device=images.device)
        top, left = (size - new[0]) // 2, (size - new[1]) // 2
        out[..., top : top + new[0], left : left + new[1]] = images
        return out
    raise TrainkitError(f"unknown resize mode {mode!r}; choices: {', '.join(RESIZE_MODES)}")


def _flatten_alpha(image: Image.Image) -> Image.Image:
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "PA", "RGBA", "La", "RGBa"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, ALPHA_BACKGROUND + (255,))
        image = Image.alpha_composite(background, image).convert("RGB")
    return image


def _high_depth_to_uint8(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit modes are scaled to 0..255, never clipped."""
    array = np.asarray(image)
    if image.mode.startswith("I;16"):
        scaled = array.astype(np.float32) / 65535.0
    elif image.mode == "F":
        scaled = (
            np.clip(array.astype(np.float32), 0.0, 1.0)
            if array.max() <= 1.0
            else (array.astype(np.float32) / max(float(array.max()), 1e-12))
        )
    else:  # "I": 32-bit ints, usually 16-bit data widened by PIL
        top = 65535.0 if array.max() <= 65535 else float(array.max())
        scaled = np.clip(array.astype(np.float64), 0, None) / top
    return Image.fromarray(np.round(scaled * 255.0).astype(np.uint8), mode="L")


def pil_to_uint8(image: Image.Image, channels: int, reduce_to: int | None = None) -> torch.Tensor:
    """Any PIL image (L, LA, RGB, RGBA, P, CMYK, 16-bit, EXIF-rotated) → uint8 (C, H, W).
    With `reduce_to`, an image at least twice that side in both dimensions is first shrunk by
    an integer box filter (Image.reduce) to no less than it: the final antialiased resize then
    works on a fraction of the pixels, with the same look."""
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:  # transpose copies: only when needed
        image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        image = _high_depth_to_uint8(image)
    image = _flatten_alpha(image)
    target = "L" if channels == 1 else "RGB"
    if image.mode != target:  # convert to the same mode is a copy
        image = image.convert(target)
    if reduce_to:
        # a gap of 2 (as PIL.Image.resize(reducing_gap=2)): the antialiased resize still halves
        factor = min(image.width // reduce_to, image.height // reduce_to) // 2
        if factor >= 2:
            image = image.reduce(factor)
    array = np.asarray(image, dtype=np.uint8)  # (H, W) or (H, W, C), read-only
    # one writable copy, made by numpy: a torch permute + contiguous costs ~10 us per image more
    array = array[None] if channels == 1 else array.transpose(2, 0, 1)
    return torch.from_numpy(np.array(array, order="C"))


def open_regular_file(path):
    """Open `path` for reading, refusing anything but a regular file. O_NONBLOCK: a FIFO put
    in place of a file after the folder was listed would otherwise block the open forever."""
    nonblocking = getattr(os, "O_NONBLOCK", 0)  # POSIX only
    descriptor = os.open(path, os.O_RDONLY | nonblocking | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise TrainkitError(f"{path}: not a regular file, skipped")
        if nonblocking:
            os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


@contextlib.contextmanager
def open_image(path):
    """Open (header only) a regular file as an image and refuse decompression bombs before any
    pixel is allocated; the file is closed on leaving the `with`."""
    import warnings

    with open_regular_file(path) as file:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(file)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise TrainkitError(f"{path}: refused, image too large ({error})") from error
        with image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise TrainkitError(f"{path}: refused, declares {width}x{height} pixels")
            yield image


def image_error_reason(error: Exception) -> str:
    """The first line of why PIL could not read a file (opened here by descriptor, so PIL's
    own "cannot identify image file <_io.BufferedReader name=5>" names no file)."""
    if isinstance(error, Image.UnidentifiedImageError):
        return "not an image, or a format PIL cannot read"
    return str(error).split("\n")[0] or type(error).__name__


def decode_image(path, channels: int, image_size: int | None, mode: str = "squash") -> torch.Tensor:
    """File → uint8 (C, H, W) with the given channels and size (resized by `mode`, see
    fit_image); one-line error when unreadable.

    A large JPEG is decoded reduced (libjpeg's DCT scaling by 1/2, 1/4 or 1/8, through PIL's
    `draft`) to no less than `image_size` on either side, other formats are box-reduced after
    decoding: a 2592x1944 photo for a 224 px model costs a fraction of a full decode."""
    try:
        with open_image(path) as image:
            image.seek(0)  # animated GIF/PNG/WebP: the first frame
            if image_size and image.format == "JPEG":
                image.draft(None, (image_size, image_size))
            image.load()
            tensor = pil_to_uint8(image, channels, image_size)
    except TrainkitError:
        raise
    except FileNotFoundError as error:
        raise TrainkitError(f"{path}: no such file") from error
    except (OSError, ValueError, SyntaxError, Image.UnidentifiedImageError) as error:
        reason = image_error_reason(error)
        raise TrainkitError(f"{path}: cannot read image ({reason})") from error
    return fit_image(tensor, image_size, mode) if image_size else tensor
