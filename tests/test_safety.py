"""Hostile inputs: checkpoints that try to run code, broken files, image bombs, odd image modes."""

from __future__ import annotations

import io
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from trainkit.checkpoint import load_checkpoint
from trainkit.data.preprocess import decode_image
from trainkit.errors import TrainkitError


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # creates the marker file when unpickled


def _evil_checkpoint(path, marker):
    torch.save({"format_version": 1, "model": {}, "boom": _Payload(marker)}, path)


@pytest.mark.parametrize("verb", ["eval", "predict", "resume"])
def test_pickle_payload_never_runs(cli, tmp_path, verb):
    from conftest import write_config

    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pth"
    _evil_checkpoint(evil, marker)
    args = {
        "eval": ["eval", evil],
        "predict": ["predict", "x.png", "-c", evil],
        "resume": ["train", write_config(tmp_path), evil, "--resume"],
    }[verb]
    result = cli(*args)
    assert result.exit_code == 1, result
    assert "Unsupported global" in result.stderr or "refused" in result.stderr, result
    assert "open" in result.stderr  # names the refused global
    assert result.stderr.count("\n") == 1
    assert not marker.exists()


@pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:FutureWarning"
)  # the archive is the hostile input
def test_torchscript_archives_are_refused(tmp_path):
    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    path = tmp_path / "model.pt"
    scripted.save(str(path))
    with pytest.raises(TrainkitError, match="TorchScript"):
        load_checkpoint(path)


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.9, 0.999])
def test_truncated_checkpoints(tmp_path, cut):
    path = tmp_path / "full.pt"
    torch.save({"format_version": 1, "model": {"w": torch.randn(64, 64)}}, path)
    data = path.read_bytes()
    broken = tmp_path / "cut.pt"
    broken.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(TrainkitError):
        load_checkpoint(broken)


def test_newer_format_is_refused(tmp_path):
    path = tmp_path / "future.pt"
    torch.save({"format_version": 99, "model": {}}, path)
    with pytest.raises(TrainkitError, match="newer"):
        load_checkpoint(path)


def test_decompression_bomb_is_refused_fast(tmp_path):
    # a real PNG header declaring 100000 x 100000 pixels, tiny on disk
    image = Image.new("L", (1, 1))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = (100_000).to_bytes(4, "big") * 2  # IHDR width, height
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # keep the chunk valid
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bytes(data))
    began = time.perf_counter()
    with pytest.raises(TrainkitError, match="too large|declares"):
        decode_image(bomb, 3, 32)
    assert time.perf_counter() - began < 1.0


def test_image_modes_give_the_right_tensors(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    rgba.save(tmp_path / "rgba.png")
    out = decode_image(tmp_path / "rgba.png", 3, None)
    assert out.shape == (3, 4, 4) and out.dtype == torch.uint8
    assert out.flatten().tolist() == [255] * 48  # composited on white

    deep = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    deep.save(tmp_path / "deep.png")
    gray = decode_image(tmp_path / "deep.png", 1, None)
    assert gray.shape == (1, 4, 4) and int(gray[0, 0, 0]) == 128  # scaled, not clipped to 255

    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
    cmyk.save(tmp_path / "cmyk.jpg")
    red = decode_image(tmp_path / "cmyk.jpg", 3, None)
    assert red[0].float().mean() > 200 and red[1].float().mean() < 60

    frames = [Image.new("RGB", (4, 4), color) for color in ((250, 0, 0), (0, 0, 250))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    first = decode_image(tmp_path / "anim.gif", 3, 8)
    assert first.shape == (3, 8, 8) and first[0].float().mean() > 200 and first[2].float().mean() < 50

    la = Image.new("LA", (4, 4), (0, 0))  # black, fully transparent
    la.save(tmp_path / "la.png")
    assert decode_image(tmp_path / "la.png", 1, None).flatten().tolist() == [255] * 16  # on white

    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)  # index 0 black, 1 green
    palette.putpixel((0, 0), 1)
    palette.info["transparency"] = 0  # index 0 transparent
    palette.save(tmp_path / "palette.png", transparency=0)
    rgb = decode_image(tmp_path / "palette.png", 3, None)
    assert rgb[:, 0, 0].tolist() == [0, 255, 0] and rgb[:, 1, 1].tolist() == [255, 255, 255]
    assert decode_image(tmp_path / "palette.png", 1, None).shape == (1, 4, 4)

    wide = Image.new("RGB", (6, 2), (0, 0, 255))
    exif = wide.getexif()
    exif[0x0112] = 6  # rotate 90°
    wide.save(tmp_path / "rotated.jpg", exif=exif)
    assert decode_image(tmp_path / "rotated.jpg", 3, None).shape == (3, 6, 2)


@pytest.mark.parametrize("content", [b"", b"plain text", b"\xff\xd8\xff\xe0 truncated jpeg"])
def test_unreadable_images_are_one_line(tmp_path, content):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(TrainkitError) as info:
        decode_image(path, 3, 32)
    assert "bad.jpg" in str(info.value) and "\n" not in str(info.value)


def test_no_unsafe_loading_in_the_code():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "trainkit"
    for source in root.rglob("*.py"):
        text = source.read_text()
        unsafe = "weights_only=" + "False"  # spelled in two parts so this file never contains it
        assert unsafe not in text.replace(" ", ""), source
        assert "pickle.load" not in text and "yaml.unsafe_load" not in text, source
