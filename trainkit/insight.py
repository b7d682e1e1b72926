"""What a run leaves to look at, beside its checkpoints (main process only).

At the start: a summary line (parameters, size, FLOPs per image, device by name), run.json
(versions, device, model figures), TensorBoard's grid of augmented training images and, when
asked, the model graph. At each evaluation: per-class accuracy and PR curves in TensorBoard.
At the end: results.png, and best.pt scored on the test split (val without one) into the run
directory: eval.json, confusion_matrix.csv/.png, per_class.csv, mistakes.csv/.png.
"""

from __future__ import annotations

import csv
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from trainkit.callbacks import Callback
from trainkit.text import printable, write_file

GRID_IMAGES = 64  # augmented training images in TensorBoard's grid


def count_flops(model: torch.nn.Module, example: torch.Tensor) -> int | None:
    """Forward FLOPs of one image (torch.utils.flop_counter; a multiply-add counts 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(example)
        return int(counter.get_total_flops())
    except Exception:  # noqa: BLE001 - an operator the counter cannot trace: the line says n/a
        return None
    finally:
        model.train(was_training)


def device_description(device: torch.device, count: int = 1) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return f"{name} x{count}" if count > 1 else name
    if device.type == "cpu":
        return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)" + (
            f" x{count} processes" if count > 1 else ""
        )
    return str(device)


def _human(number: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(number) >= size:
            return f"{number / size:.2f}{unit}"
    return f"{number:.0f}"


def model_summary(model: torch.nn.Module, input_shape: tuple[int, int, int], device: torch.device) -> dict:
    parameters = list(model.parameters())
    total = sum(p.numel() for p in parameters)
    trainable = sum(p.numel() for p in parameters if p.requires_grad)
    size = sum(p.numel() * p.element_size() for p in parameters)
    size += sum(b.numel() * b.element_size() for b in model.buffers())
    flops = count_flops(model, torch.zeros(1, *input_shape, device=device))
    return {
        "parameters": total,
        "trainable_parameters": trainable,
        "size_mb": size / 1e6,
        "flops_per_image": flops,
    }


def environment(device: torch.device, count: int) -> dict[str, Any]:
    import torchvision

    import trainkit

    return {
        "trainkit": trainkit.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device_description(device, count),
        "device_type": device.type,
        "device_count": count,
        "cuda": torch.version.cuda,
    }


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class RunInsight(Callback):
    """A callback of the main process: the summary line, run.json and TensorBoard's image grid
    (and graph) at fit_start, per-class accuracy and PR curves at each evaluated epoch_end;
    `finish` (called by run_train once training and any process group are done) writes
    results.png and scores best.pt into the run directory."""

    def __init__(
        self,
        run_dir: Path,
        *,
        console,
        bundle,
        log,
        seed: int,
        writer=None,
        data_seconds=None,
        trust_code=False,
    ):
        self.run_dir, self.console, self.bundle, self.log = run_dir, console, bundle, log
        self.trust_code = trust_code  # the run's own model code was allowed (--trust-code)
        self.classes = list(bundle.splits.classes)
        self.seed, self.writer, self.data_seconds = seed, writer, data_seconds
        self.record: dict[str, Any] = {}
        self.began = time.perf_counter()

    # ------------------------------------------------------------------ start

    def on_fit_start(self, trainer) -> None:
        from trainkit.runtime import unwrap_model

        placement, splits = trainer.placement, self.bundle.splits
        plain = unwrap_model(trainer.model)
        shape = (splits.channels, splits.image_size, splits.image_size)
        summary = model_summary(plain, shape, placement.device)
        count = placement.world if placement.parallel == "ddp" else len(placement.device_ids or [0])
        self.record = {
            "name": self.run_dir.name,
            "started": _now(),
            **environment(placement.device, count),
            **summary,
            "precision": trainer.cfg.precision,
            "channels_last": bool(trainer.cfg.channels_last),
        }
        if self.data_seconds is not None:
            self.record["data_seconds"] = round(self.data_seconds, 3)
        flops = summary["flops_per_image"]
        self.console.say(
            f"model: {summary['trainable_parameters']:,} trainable / {summary['parameters']:,} parameters, "
            f"{summary['size_mb']:.2f} MB, {_human(flops) if flops is not None else 'n/a'} FLOPs per image; "
            f"device: {self.record['device']}; {speed_text(trainer.cfg)}"
        )
        self._save_record()
        if self.writer is not None:
            trainer.keep_eval_outputs = True  # for the PR curves
            self._image_grid(splits.train, trainer.train_transform, self.seed, placement.device)
            if self.log.graph:
                self._graph(plain, shape, placement.device)
            self.writer.flush()

    def on_epoch_end(self, trainer, row: dict[str, Any]) -> None:
        evaluation = getattr(trainer, "last_evaluation", None)
        if self.writer is None or row.get("val_loss") is None or evaluation is None:
            return
        log_evaluation(self.writer, evaluation, evaluation.get("outputs"), self.classes, row["global_step"])
        self.writer.flush()

    def _image_grid(self, split, transform, seed: int, device) -> None:
        """What the model sees in its first steps: epoch 0's first images after augmentation."""
        from torchvision.utils import make_grid

        from trainkit.data.loader import epoch_order

        count = min(GRID_IMAGES, len(split))
        order = epoch_order(len(split), seed, 0, True)[:count]
        items = split.dataset()
        images = torch.stack([items[int(i)][0] for i in order]).to(device)  # (n, C, H, W) uint8
        transform.start_epoch(0, len(split), device)
        x = transform(images, torch.arange(count, device=device))  # normalised floats
        mean = torch.tensor(transform.preprocess.mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(transform.preprocess.std, device=device).view(1, -1, 1, 1)
        pixels = (x * std + mean).clamp(0, 1).cpu()
        self.writer.add_image("train/augmented_batch", make_grid(pixels, nrow=8, padding=2), 0)

    def _graph(self, model, shape, device) -> None:
        import warnings

        try:
            was_training = model.training
            model.eval()
            with warnings.catch_warnings():  # torch.jit.trace's deprecation notice
                warnings.simplefilter("ignore", FutureWarning)
                self.writer.add_graph(model, torch.zeros(1, *shape, device=device))
            model.train(was_training)
        except Exception as error:  # noqa: BLE001 - tracing is optional; say why it was skipped
            reason = f"{type(error).__name__}: {str(error)[:100]}"
            self.console.warn(f"model graph not written to TensorBoard ({reason})")

    def _save_record(self) -> None:
        write_file(self.run_dir / "run.json", json.dumps(self.record, indent=1) + "\n")

    # ------------------------------------------------------------------ end

    def finish(self, trainer, data_cfg) -> None:
        from trainkit.checkpoint import build_model_from_checkpoint, load_checkpoint
        from trainkit.data.preprocess import Preprocess
        from trainkit.evaluate import choose_split, save_eval, score_split, use_memory_checked
        from trainkit.plots import results_png

        state, splits, device = trainer.state, self.bundle.splits, trainer.placement.device
        best = self.run_dir / "checkpoints" / "best.pt"
        rows = read_metrics(self.run_dir / "metrics.csv")
        if rows and self.log.plots:
            write_file(self.run_dir / "results.png", results_png(rows))
        self.record.update(
            finished=_now(),
            wall_seconds=round(time.perf_counter() - self.began, 3),
            train_seconds=round(sum(float(r["epoch_seconds"] or 0) for r in rows), 3),
            monitor=trainer.monitor.name,
            best_metric=state.best_metric,
            best_epoch=state.best_epoch,
            epochs=state.epoch,
            global_step=state.global_step,
        )
        if best.is_file():
            checkpoint = load_checkpoint(best, map_location=device)
            split, remark = choose_split(splits, None)
            part = splits.get(split)
            preprocess = Preprocess.from_dict(checkpoint["preprocess"])
            model = build_model_from_checkpoint(checkpoint, best, self.trust_code).to(device)
            memory = use_memory_checked(data_cfg, part, preprocess)
            metrics, part = score_split(
                model,
                part,
                in_memory=memory,
                preprocess=preprocess,
                loss_fn=trainer.loss_fn,
                classes=self.classes,
                batch_size=data_cfg.eval_batch_size,
                device=device,
                num_workers=data_cfg.num_workers,
            )
            metrics.update(split=split, checkpoint=str(best), dataset=data_cfg.name)
            save_eval(metrics, self.run_dir, part, self.log.plots)
            self.record.update(
                eval_split=split, eval_accuracy=metrics["accuracy"], eval_macro_f1=metrics["macro_avg"]["f1"]
            )
            where = " (no test split; val chose it)" if remark else ""
            accuracy, f1 = 100 * metrics["accuracy"], 100 * metrics["macro_avg"]["f1"]
            self.console.say(
                f"best.pt on {split}{where}: accuracy {accuracy:.2f}%, macro F1 {f1:.2f}%; confusion "
                f"matrix, per-class metrics and mistakes in {printable(self.run_dir)}"
            )
        self._save_record()


def read_metrics(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------------- each evaluation


def log_evaluation(writer, metrics: dict[str, Any], outputs, classes: list[str], step: int) -> None:
    """Per-class accuracy scalars and one PR curve per class (one-vs-rest) in TensorBoard."""
    for index, accuracy in enumerate(metrics["per_class"]):
        name = classes[index] if index < len(classes) else f"class_{index}"
        writer.add_scalar(f"val_class_accuracy/{_tag(name)}", accuracy, step)
    if outputs:
        probs = torch.cat([p for p, _ in outputs])  # (N, K)
        labels = torch.cat([y for _, y in outputs])  # (N,)
        for index in range(probs.shape[1]):
            name = classes[index] if index < len(classes) else f"class_{index}"
            writer.add_pr_curve(f"val_pr/{_tag(name)}", labels == index, probs[:, index], step)


def _tag(name: str) -> str:
    """A TensorBoard tag part: printable, no slashes (they would nest groups)."""
    return printable(name, 60).replace("/", "_") or "_"


def speed_text(train) -> str:
    """`bf16 autocast, channels_last` / `float32` (the options a run trains with, auto resolved)."""
    precision = {"32": "float32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}[train.precision]
    return precision + (", channels_last" if train.channels_last else "")
