"""The Python API: the CLI's verbs as functions for notebooks and scripts.

Same validation as the CLI; failures are exceptions (trainkit.errors.ConfigError for config
mistakes, TrainkitError for runtime failures, Interrupted for a run stopped by a signal) rather
than exit codes, and results are plain Python data.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainkit.callbacks import Callback
from trainkit.config import Config, apply_overrides, config_from_dict, load_config
from trainkit.errors import ConfigError, TrainkitError

Overrides = Mapping[str, Any] | Iterable[str] | None


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    monitor: str  # the train.monitor metric, e.g. "val_accuracy"
    best_metric: float | None
    best_epoch: int | None
    global_step: int
    epochs: int  # epochs completed
    metrics: dict[str, float]  # the last epoch's metrics.csv row


def _override_list(overrides: Overrides) -> list[str]:
    """{"optim.lr": 0.01} or ["optim.lr=0.01"] → ["optim.lr=0.01"] (values keep their types)."""
    if overrides is None:
        return []
    if isinstance(overrides, str):
        raise ConfigError("overrides", "give a list of key=value strings or a dict, not one string")
    if isinstance(overrides, Mapping):
        return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]  # JSON is YAML
    return [str(item) for item in overrides]


def resolve_config(config: str | Path | Mapping[str, Any] | Config, overrides: Overrides = None) -> Config:
    """A YAML path, a dict of sections or a Config, plus overrides → a validated Config."""
    items = _override_list(overrides)
    if isinstance(config, Config):
        return config_from_dict(apply_overrides(config.to_dict(), items))
    if isinstance(config, Mapping):
        return config_from_dict(apply_overrides(dict(config), items))
    return load_config(config, items)


def train(
    config: str | Path | Mapping[str, Any] | Config | None,
    overrides: Overrides = None,
    callbacks: Iterable[Callback] = (),
    *,
    resume: bool | str | Path = False,
    handle_signals: bool = True,
) -> TrainResult:
    """Train as `trainkit train` does; → where the run is and how it ended.

    `callbacks` get the engine's events (trainkit.callbacks.Callback). `resume=True` continues
    the newest run of the config's name, a path continues that run directory or checkpoint; a
    resume may pass config=None (the checkpoint's config, with `overrides`).
    With `handle_signals` (main thread only) a Ctrl-C saves last.pt at the next step boundary
    and raises trainkit.errors.Interrupted.
    """
    from trainkit.train import run_train

    resolved = resolve_config(config, overrides) if config is not None else None  # None: resume's
    summary = run_train(
        resolved,
        overrides=_override_list(overrides),
        resume=resume is not False,
        resume_path=None if isinstance(resume, bool) else str(resume),
        callbacks=list(callbacks),
        handle_signals=handle_signals,
    )
    return TrainResult(
        run_dir=Path(summary["run_dir"]),
        best_checkpoint=Path(summary["best"]),
        last_checkpoint=Path(summary["last"]),
        monitor=summary["monitor"],
        best_metric=summary["best_metric"],
        best_epoch=summary["best_epoch"],
        global_step=summary["global_step"],
        epochs=summary["epoch"],
        metrics=summary["metrics"],
    )


def evaluate(
    checkpoint: str | Path, *, split: str = "test", overrides: Overrides = None, device: str = "auto"
) -> dict[str, Any]:
    """Score a checkpoint as `trainkit eval --json` does; → the same dict (loss, accuracy, top5,
    num_samples, per_class, per_class_count, split, checkpoint, dataset)."""
    from trainkit.evaluate import run_eval

    return run_eval(str(checkpoint), _override_list(overrides), split, device)


def predict(
    checkpoint: str | Path, images: Any, *, topk: int = 1, device: str = "auto"
) -> list[dict[str, Any]]:
    """Classify images as `trainkit predict --json` does (`checkpoint` may be an .onnx export);
    → one dict per image, in order:
    {"path", "label", "index", "prob", "topk": [{"label", "prob"}, …]}, or {"path", "error"} for
    an image that cannot be read. `images`: a path, folder or glob, a PIL image, or a list of
    them (a PIL image's "path" is None). An input that matches nothing raises TrainkitError."""
    import torch

    from trainkit.predict import load_classifier

    classifier = load_classifier(Path(checkpoint), device)  # a checkpoint or an .onnx export
    preprocess, classes = classifier.preprocess, classifier.classes
    k = max(1, min(int(topk), len(classes)))
    records, decoded = [], []  # decoded: (record index, uint8 (C, H, W))
    for path, image in _inputs(images):
        try:
            decoded.append((len(records), _decode(path, image, preprocess)))
            records.append({"path": path})
        except TrainkitError as error:
            records.append({"path": path, "error": str(error)})
    for start in range(0, len(decoded), 256):
        chunk = decoded[start : start + 256]
        with torch.inference_mode():
            logits = classifier(torch.stack([x for _, x in chunk]))  # (b, K)
            top_p, top_i = logits.float().softmax(dim=1).topk(k, dim=1)
        for (at, _), p_row, i_row in zip(chunk, top_p.tolist(), top_i.tolist()):
            ranked = [{"label": classes[i], "prob": p} for i, p in zip(i_row, p_row)]
            records[at].update(label=classes[i_row[0]], index=i_row[0], prob=p_row[0], topk=ranked)
    return records


def _inputs(images: Any) -> list[tuple[str | None, Any]]:
    """→ (path or None, PIL image or None) for every input image."""
    from trainkit.predict import expand_inputs

    items = [images] if isinstance(images, (str, Path)) or hasattr(images, "getbands") else list(images)
    found: list[tuple[str | None, Any]] = []
    for item in items:
        if hasattr(item, "getbands"):  # a PIL image
            found.append((None, item))
            continue
        paths, errors = expand_inputs([str(item)])
        if errors:
            raise TrainkitError(errors[0])
        found += [(str(path), None) for path in paths]
    return found


def _decode(path: str | None, image: Any, preprocess) -> Any:
    from trainkit.data.preprocess import decode_image, pil_to_uint8, resize

    if image is None:
        return decode_image(path, preprocess.channels, preprocess.image_size)
    return resize(pil_to_uint8(image, preprocess.channels), preprocess.image_size)
