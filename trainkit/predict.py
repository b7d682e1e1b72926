"""`trainkit predict`: top-k classes for image files, folders or globs, from a checkpoint."""

from __future__ import annotations

import glob
import os
import stat
import sys
from pathlib import Path
from typing import Any

import torch

from trainkit.checkpoint import build_model_from_checkpoint, resolve_checkpoint_path
from trainkit.data.preprocess import Preprocess, decode_image, image_files
from trainkit.data.workers import from_arrays, to_arrays, worker_options
from trainkit.errors import TrainkitError
from trainkit.runtime import pick_device
from trainkit.text import escape, to_json

PREDICT_BATCH = 256


def find_default_checkpoint(runs_dir: str = "runs") -> Path:
    found = [p for p in Path(runs_dir).glob("**/checkpoints/best.pt") if p.is_file()]
    if not found:
        raise TrainkitError(f"no checkpoint given (-c) and no {runs_dir}/**/checkpoints/best.pt found")
    return max(found, key=lambda path: path.stat().st_mtime)


def expand_inputs(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Files, folders (their images, as the ImageFolder scan finds them) and globs → paths;
    unmatched inputs, anything but a plain file (a FIFO would block), loops → errors."""
    paths: list[Path] = []
    errors: list[str] = []
    for item in inputs:
        path = Path(item)
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            mode = None
        except OSError as error:  # ELOOP, EACCES, ENAMETOOLONG: name it and go on
            errors.append(f"{item}: {error.strerror or error}")
            continue
        if mode is not None and stat.S_ISDIR(mode):
            paths += [Path(file) for file, _, _ in image_files(str(path), errors)]
        elif mode is not None and stat.S_ISREG(mode):
            paths.append(path)
        elif mode is not None:
            errors.append(f"{item}: not a regular file, skipped")
        elif glob.has_magic(item):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file())
            if not matches:
                errors.append(f"{item}: no files match")
            paths += matches
        else:
            errors.append(f"{item}: no such file or folder")
    return list(dict.fromkeys(paths)), errors  # a file named twice is predicted once


def load_classifier(
    path: Path, device: str = "auto", on_state=None, config_path: str | None = None, trust_code: bool = False
):
    """A checkpoint (run by torch on `device`) or an exported .onnx (run by onnxruntime on the
    CPU, with the preprocessing and classes stored in the file). `on_state` sees a checkpoint's
    loaded dict (to describe it) before the model is built."""
    from trainkit.export import file_kind, onnx_classifier, torch_classifier

    if file_kind(path) == "onnx":
        if device not in ("auto", "cpu"):
            raise TrainkitError(f"{path}: ONNX models run on the CPU here; drop --device {device}")
        return onnx_classifier(path)
    from trainkit.weights import load_for_inference

    target = pick_device(device)
    state = load_for_inference(path, config_path, [], trust_code, "cpu")
    if on_state is not None:
        on_state(state)
    model = build_model_from_checkpoint(state, path, trust_code).to(target).eval()
    return torch_classifier(model, Preprocess.from_dict(state["preprocess"]), list(state["classes"]))


def describe_checkpoint(path: Path, state: dict) -> str:
    """`runs/x/checkpoints/best.pt (run x, val_accuracy 95.20% at epoch 4)`."""
    from trainkit.text import printable

    run = path.resolve().parent.parent.name if path.parent.name == "checkpoints" else "?"
    monitor, value = state.get("monitor"), state.get("best_metric")
    detail = f"run {printable(run)}"
    if isinstance(value, (int, float)) and monitor:
        shown = f"{value:.4f}" if monitor == "val_loss" else f"{100 * value:.2f}%"
        detail += f", {monitor} {shown} at epoch {state.get('best_epoch')}"
    return f"{printable(path)} ({detail})"


def run_predict(
    inputs: list[str],
    checkpoint: str | None,
    topk: int,
    as_json: bool,
    device: str = "auto",
    out: str | None = None,
    sort_into: str | None = None,
    copy: bool = False,
    config_path: str | None = None,
    trust_code: bool = False,
) -> int:
    """Print one line per image (or write them to `out`); unreadable images get one error
    line. → exit code."""
    from trainkit.predict_out import PredictionFile, Sorter

    path = resolve_checkpoint_path(checkpoint) if checkpoint else find_default_checkpoint()

    def announce(state: dict) -> None:  # the newest best.pt under runs/ may not be the one meant
        print(f"using {describe_checkpoint(path, state)}", file=sys.stderr)

    classifier = load_classifier(
        path, device, None if checkpoint else announce, config_path=config_path, trust_code=trust_code
    )
    preprocess, classes = classifier.preprocess, classifier.classes
    output = PredictionFile(out, max(1, min(topk, len(classes)))) if out else None
    sorter = Sorter(sort_into, copy) if sort_into else None
    k = max(1, min(topk, len(classes)))

    paths, errors = expand_inputs(inputs)
    for message in errors:
        print(f"error: {escape(message)}", file=sys.stderr)
    failed = bool(errors)
    for batch, kept, unreadable in decoded_batches(paths, preprocess):
        failed = failed or unreadable
        if batch is None:
            continue
        for image_path, record in _top_k_records(classifier, batch, kept, classes, k):
            if sorter is not None:
                sorter.add(image_path, record["label"])
            if output is not None:
                output.add(record)
            elif as_json:
                print(to_json(record))
            else:
                print(_text_line(record))
        sys.stdout.flush()
    _close_outputs(output, sorter)
    if not paths and not errors:
        print("error: no images found in the inputs", file=sys.stderr)
        return 1
    return 1 if failed else 0


class _Decoding(torch.utils.data.Dataset):
    """Image i of `paths` → (uint8 (C, H, W) or None, the one-line error or None)."""

    def __init__(self, paths: list[Path], preprocess: Preprocess):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, str | None]:
        p = self.preprocess
        try:
            return decode_image(self.paths[index], p.channels, p.stored_size, p.resize), None
        except TrainkitError as error:
            return None, str(error)


def decode_workers(count: int) -> int:
    """Worker processes that decode for predict: none for a batch or less (no start-up cost for
    one image), else one per core up to 4. Decoding is the larger part of predict's time (a
    CIFAR-10 JPEG: ~0.15 ms to decode vs ~0.05 ms of LeNet forward) and PIL holds the GIL for
    much of it, so processes, not threads."""
    if count <= PREDICT_BATCH:
        return 0
    cores = _cores()
    return min(4, cores) if cores > 1 else 0


def _cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _collate(items: list[tuple[torch.Tensor | None, str | None]]) -> tuple[torch.Tensor | None, list]:
    """→ (the decoded images stacked (b, C, H, W), each item's error or None): one tensor per
    batch crosses from a worker, not one per image."""
    images = [image for image, _ in items if image is not None]
    return (torch.stack(images) if images else None), [error for _, error in items]


def _collate_in_worker(items: list[tuple[torch.Tensor | None, str | None]]) -> tuple[Any, list]:
    images, errors = _collate(items)
    return to_arrays(images), errors  # through the worker's pipe, not /dev/shm


def decoded_batches(paths: list[Path], preprocess: Preprocess):
    """→ (decoded images (b, C, H, W) or None, their paths, whether any failed) per batch of
    PREDICT_BATCH paths, in order; each failure gets one error line."""
    dataset = _Decoding(paths, preprocess)
    workers = decode_workers(len(paths))
    if workers:
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=PREDICT_BATCH,
            num_workers=workers,
            collate_fn=_collate_in_worker,
            prefetch_factor=2,
            **worker_options(workers),
        )
        chunks = ((from_arrays(images), errors) for images, errors in loader)
    else:
        starts = range(0, len(paths), PREDICT_BATCH)
        chunks = (
            _collate([dataset[i] for i in range(s, min(s + PREDICT_BATCH, len(paths)))]) for s in starts
        )
    # The workers take cores: the forward here runs beside them on what is left. A forward on
    # every core's thread spins at OpenMP barriers while workers hold those cores (10,000
    # CIFAR-10 JPEGs on 2 cores with 2 workers: 3.8-4.3 s with 2 threads, 3.4 s with 1).
    threads = torch.get_num_threads()
    if workers:
        torch.set_num_threads(max(1, _cores() - workers))
    try:
        start = 0
        for images, errors in chunks:
            kept = []
            for image_path, error in zip(paths[start : start + len(errors)], errors):
                if error is not None:
                    print(f"error: {escape(error)}", file=sys.stderr)
                else:
                    kept.append(image_path)
            start += len(errors)
            yield images, kept, any(error is not None for error in errors)
    finally:
        torch.set_num_threads(threads)


def _top_k_records(classifier, batch: torch.Tensor, kept: list[Path], classes: list[str], k: int):
    with torch.inference_mode():
        logits = classifier(batch)[:, : len(classes)]  # (b, K): spare outputs unused
        probs = logits.float().softmax(dim=1)
        top_p, top_i = probs.topk(k, dim=1)
    for image_path, p_row, i_row in zip(kept, top_p.tolist(), top_i.tolist()):
        yield (
            image_path,
            {
                "path": str(image_path),
                "label": classes[i_row[0]],
                "index": i_row[0],
                "prob": p_row[0],
                "topk": [{"label": classes[i], "prob": p} for i, p in zip(i_row, p_row)],
            },
        )


def _text_line(record: dict) -> str:
    """`path<TAB>label<TAB>prob[<TAB>runner-up prob  ...]`, names escaped (they come from files)."""
    extra = "  ".join(f"{escape(t['label'])} {t['prob']:.3f}" for t in record["topk"][1:])
    line = f"{escape(record['path'])}\t{escape(record['label'])}\t{record['prob']:.4f}"
    return line + (f"\t{extra}" if extra else "")


def _close_outputs(output, sorter) -> None:
    if output is not None:
        output.close()
        print(f"wrote {len(output.records)} predictions to {escape(output.path)}", file=sys.stderr)
    if sorter is not None:
        sorter.close()
        how = f", {sorter.copied} copied" if sorter.copied else ""
        placed = sum(sorter.counts.values())
        where = f"{escape(sorter.root)}/<label>/"
        print(f"sorted {placed} images into {where} (hard links{how})", file=sys.stderr)
