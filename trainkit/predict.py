"""`trainkit predict`: top-k classes for image files, folders or globs, from a checkpoint."""

from __future__ import annotations

import glob
import json
import sys
from pathlib import Path

import torch

from trainkit.checkpoint import build_model_from_checkpoint, load_checkpoint
from trainkit.data.preprocess import Preprocess, decode_image, image_files
from trainkit.errors import TrainkitError
from trainkit.runtime import pick_device

PREDICT_BATCH = 256


def find_default_checkpoint(runs_dir: str = "runs") -> Path:
    found = [p for p in Path(runs_dir).glob("**/checkpoints/best.pt") if p.is_file()]
    if not found:
        raise TrainkitError(f"no checkpoint given (-c) and no {runs_dir}/**/checkpoints/best.pt found")
    return max(found, key=lambda path: path.stat().st_mtime)


def expand_inputs(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Files, folders (their images, as the ImageFolder scan finds them) and globs → paths;
    unmatched → errors."""
    paths: list[Path] = []
    errors: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths += [Path(file) for file, _, _ in image_files(str(path))]
        elif path.exists():
            paths.append(path)
        elif glob.has_magic(item):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file())
            if not matches:
                errors.append(f"{item}: no files match")
            paths += matches
        else:
            errors.append(f"{item}: no such file or folder")
    return list(dict.fromkeys(paths)), errors  # a file named twice is predicted once


def load_classifier(path: Path, device: str = "auto"):
    """A checkpoint (run by torch on `device`) or an exported .onnx (run by onnxruntime on the
    CPU, with the preprocessing and classes stored in the file)."""
    from trainkit.export import file_kind, onnx_classifier, torch_classifier

    if file_kind(path) == "onnx":
        if device not in ("auto", "cpu"):
            raise TrainkitError(f"{path}: ONNX models run on the CPU here; drop --device {device}")
        return onnx_classifier(path)
    target = pick_device(device)
    state = load_checkpoint(path, map_location=target)
    model = build_model_from_checkpoint(state, path).to(target).eval()
    return torch_classifier(model, Preprocess.from_dict(state["preprocess"]), list(state["classes"]))


def run_predict(
    inputs: list[str], checkpoint: str | None, topk: int, as_json: bool, device: str = "auto"
) -> int:
    """Print one line per image; unreadable images get one error line. → exit code."""
    path = Path(checkpoint) if checkpoint else find_default_checkpoint()
    classifier = load_classifier(path, device)
    preprocess, classes = classifier.preprocess, classifier.classes
    k = max(1, min(topk, len(classes)))

    paths, errors = expand_inputs(inputs)
    for message in errors:
        print(f"error: {message}", file=sys.stderr)
    failed = bool(errors)
    for start in range(0, len(paths), PREDICT_BATCH):
        batch, kept = [], []
        for image_path in paths[start : start + PREDICT_BATCH]:
            try:
                batch.append(decode_image(image_path, preprocess.channels, preprocess.image_size))
                kept.append(image_path)
            except TrainkitError as error:
                print(f"error: {error}", file=sys.stderr)
                failed = True
        if not batch:
            continue
        with torch.inference_mode():
            logits = classifier(torch.stack(batch))  # (b, K)
            probs = logits.float().softmax(dim=1)
            top_p, top_i = probs.topk(k, dim=1)
        for image_path, p_row, i_row in zip(kept, top_p.tolist(), top_i.tolist()):
            if as_json:
                record = {
                    "path": str(image_path),
                    "label": classes[i_row[0]],
                    "index": i_row[0],
                    "prob": p_row[0],
                    "topk": [{"label": classes[i], "prob": p} for i, p in zip(i_row, p_row)],
                }
                print(json.dumps(record))
            else:
                extra = "  ".join(f"{classes[i]} {p:.3f}" for i, p in zip(i_row[1:], p_row[1:]))
                print(f"{image_path}\t{classes[i_row[0]]}\t{p_row[0]:.4f}" + (f"\t{extra}" if extra else ""))
        sys.stdout.flush()
    if not paths and not errors:
        print("error: no images found in the inputs", file=sys.stderr)
        return 1
    return 1 if failed else 0
