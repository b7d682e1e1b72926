"""`trainkit eval`: score a checkpoint on a split, needing nothing but the checkpoint file.

Beyond loss and accuracy it explains: the confusion matrix, per-class precision / recall / F1
/ support with macro and weighted averages, top-k where k < classes, and the most confident
mistakes. `--save DIR` writes them as files (eval.json, confusion_matrix.csv/.png,
per_class.csv, mistakes.csv, mistakes.png); training does the same for best.pt at its end.
"""

from __future__ import annotations

import copy
import csv
import io
from pathlib import Path
from typing import Any

import torch

from trainkit.checkpoint import (
    build_model_from_checkpoint,
    require_code_permission,
    resolve_checkpoint_path,
)
from trainkit.config import apply_overrides, config_from_dict
from trainkit.errors import TrainkitError
from trainkit.runtime import pick_device
from trainkit.text import output_dir, printable, to_json, write_file

NO_TEST = (
    "no separate test split: evaluating on val, which chose the best checkpoint (an optimistic score; "
    "data.val_fraction keeps a test split apart)"
)
TOP_KS = (5,)  # shown only where k < the number of classes
MISTAKES_KEPT = 100  # rows of mistakes.csv / eval.json
MISTAKES_SHOWN = 10  # lines on screen
MISTAKES_GRID = 32  # thumbnails in mistakes.png

# Keys of a checkpoint's config that choose where files are written: a checkpoint's author
# never decides that, so they are reset to the defaults (the user's overrides may set them).
_WRITE_LOCATION_KEYS = {"data": {"cache_dir": None, "download": False}}


def config_without_write_locations(checkpoint_config: dict[str, Any]) -> dict[str, Any]:
    raw = copy.deepcopy(checkpoint_config)
    for section, defaults in _WRITE_LOCATION_KEYS.items():
        if isinstance(raw.get(section), dict):
            raw[section].update(defaults)
    return raw


def choose_split(splits, requested: str | None) -> tuple[str, str | None]:
    """The one rule for which split eval scores → (split, a line to say or None).

    `test` when the dataset has a test split of its own; otherwise val (then a test request
    would silently score val), said in one line because val chose best.pt and flatters it."""
    honest_test = splits.test is not splits.val
    if requested is None:
        requested = "test" if honest_test else "val"
        if not honest_test:
            return "val", NO_TEST
        return requested, None
    if requested == "test" and not honest_test:
        return "val", NO_TEST
    return requested, None


@torch.inference_mode()
def collect_outputs(model, source, transform, loss_fn, precision: str = "32"):
    """→ (probabilities float32 (N, K), labels int64 (N,), mean loss), in the source's order."""
    from trainkit.trainer import autocast_for

    model.eval()
    probs, labels = [], []
    loss_sum = torch.zeros((), dtype=torch.float64, device=source.device)
    for batch in source.epoch(0):
        targets = batch.labels
        if targets.shape[0] == 0:
            continue
        with autocast_for(source.device, precision):
            logits = model(transform(batch.images))  # (b, K)
        logits = logits.float()
        loss_sum += loss_fn(logits, targets).double() * targets.shape[0]
        probs.append(logits.softmax(dim=1).cpu())
        labels.append(targets.cpu())
    if not labels:
        raise TrainkitError("the split has no images to evaluate")
    count = sum(t.shape[0] for t in labels)
    return torch.cat(probs), torch.cat(labels), float(loss_sum) / count


def _class_scores(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, torch.Tensor]:
    """Confusion (K, K) as (true, predicted) and per-class precision, recall, F1, support (K,)."""
    confusion = torch.bincount(labels * num_classes + predicted, minlength=num_classes**2)
    confusion = confusion.view(num_classes, num_classes)  # (true, predicted)
    true_positive = confusion.diagonal().double()
    support = confusion.sum(dim=1).double()
    predicted_count = confusion.sum(dim=0).double()
    precision = torch.where(predicted_count > 0, true_positive / predicted_count.clamp_min(1), 0.0)
    recall = torch.where(support > 0, true_positive / support.clamp_min(1), 0.0)
    denominator = precision + recall
    f1 = torch.where(denominator > 0, 2 * precision * recall / denominator.clamp_min(1e-12), 0.0)
    return {
        "confusion": confusion,
        "true_positive": true_positive,
        "support": support,
        "precision": precision,
        "recall": recall,
        "f1": f1,
    }


def _top_k_accuracy(probs: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    return float((probs.topk(k, dim=1).indices == labels[:, None]).any(dim=1).double().mean())


def _confident_mistakes(
    probs: torch.Tensor,
    labels: torch.Tensor,
    predicted: torch.Tensor,
    names: list[str],
    paths: list[str] | None,
    kept: int,
) -> tuple[int, list[dict[str, Any]]]:
    """→ (how many are wrong, the `kept` most confident of them; ties keep the split's order)."""
    wrong = torch.nonzero(predicted != labels).squeeze(1)
    confidence = probs[wrong, predicted[wrong]]
    order = wrong[confidence.argsort(descending=True, stable=True)][:kept]
    mistakes = [
        {
            "index": int(i),
            **({"path": paths[i]} if paths is not None else {}),
            "true": names[int(labels[i])],
            "predicted": names[int(predicted[i])],
            "probability": float(probs[i, predicted[i]]),
            "probability_true": float(probs[i, labels[i]]),
        }
        for i in order.tolist()
    ]
    return int(wrong.numel()), mistakes


def summarize(
    probs: torch.Tensor,
    labels: torch.Tensor,
    classes: list[str],
    loss: float,
    paths: list[str] | None = None,
    mistakes_kept: int = MISTAKES_KEPT,
) -> dict[str, Any]:
    """Every number eval reports, from probabilities (N, K) and true labels (N,).

    precision = TP / predicted as the class, recall = TP / truly the class (0 when the
    denominator is 0), F1 their harmonic mean; the macro average is over the classes present
    in the split (support > 0), the weighted one weighs them by support."""
    count, num_classes = probs.shape
    predicted = probs.argmax(dim=1)
    scores = _class_scores(predicted, labels, num_classes)
    support = scores["support"]
    present = support > 0
    weights = support / support.sum()

    def averages(name: str) -> tuple[float, float]:
        values = scores[name]
        return float(values[present].mean()), float((values * weights).sum())

    accuracy = float(scores["true_positive"].sum()) / count
    top_k = {str(k): _top_k_accuracy(probs, labels, k) for k in TOP_KS if k < num_classes}
    top5 = _top_k_accuracy(probs, labels, min(5, num_classes))

    names = list(classes) + [f"class_{i}" for i in range(len(classes), num_classes)]
    per_class_table = [
        {
            "class": names[i],
            "precision": float(scores["precision"][i]),
            "recall": float(scores["recall"][i]),
            "f1": float(scores["f1"][i]),
            "support": int(support[i]),
        }
        for i in range(num_classes)
    ]
    num_mistakes, mistakes = _confident_mistakes(probs, labels, predicted, names, paths, mistakes_kept)
    macro = averages("precision"), averages("recall"), averages("f1")
    return {
        # today's keys
        "loss": loss,
        "accuracy": accuracy,
        "top5": top5,
        "num_samples": count,
        "per_class": {row["class"]: row["recall"] for row in per_class_table},
        "per_class_count": {row["class"]: row["support"] for row in per_class_table},
        # new ones
        "classes": names,
        "top_k": top_k,
        "confusion_matrix": scores["confusion"].tolist(),
        "per_class_metrics": per_class_table,
        "macro_avg": {"precision": macro[0][0], "recall": macro[1][0], "f1": macro[2][0]},
        "weighted_avg": {"precision": macro[0][1], "recall": macro[1][1], "f1": macro[2][1]},
        "num_mistakes": num_mistakes,
        "mistakes": mistakes,
    }


def split_paths(split) -> list[str] | None:
    """The file of each sample of a split, in its order; None for in-memory arrays."""
    from trainkit.data.datasets import FileSplit, SubsetSplit

    if isinstance(split, FileSplit):
        return split.paths if split.kept is None else [split.paths[i] for i in split.kept.tolist()]
    if isinstance(split, SubsetSplit):
        base = split_paths(split.base)
        return None if base is None else [base[i] for i in split._positions().tolist()]
    return None


def use_memory_checked(data_cfg, part, preprocess) -> bool:
    """The tensor path when the split fits; else its images are checked first (DataLoader)."""
    from trainkit.data.pipeline import check_parts, fits_in_memory

    in_memory = fits_in_memory(data_cfg, [part], preprocess.channels, preprocess.image_size)
    if not in_memory:
        check_parts([part])
    return in_memory


def score_split(
    model,
    part,
    *,
    in_memory: bool,
    preprocess,
    loss_fn,
    classes: list[str],
    batch_size: int,
    device,
    num_workers: int,
    precision: str = "32",
) -> tuple[dict[str, Any], Any]:
    """Evaluate `model` on one split → (summary, the split) — shared by eval and training's end."""
    from trainkit.data.pipeline import BatchTransform, make_source

    source = make_source(
        part,
        in_memory=in_memory,
        batch_size=batch_size,
        seed=0,
        shuffle=False,
        device=device,
        num_workers=num_workers,
    )
    probs, labels, loss = collect_outputs(model, source, BatchTransform(preprocess, None), loss_fn, precision)
    return summarize(probs, labels, classes, loss, split_paths(part)), part


def _eval_data_config(data, preprocess, overrides: list[str]):
    # The data must look like what the model was trained on, whatever the overrides say.
    # A checkpoint never chooses where to write: its data.cache_dir is used only when the
    # command line names it again.
    overridden = any(o.split("=", 1)[0].strip() == "data.cache_dir" for o in overrides)
    data_cfg = data.model_copy(
        update={
            "channels": preprocess.channels,
            "image_size": preprocess.image_size,
            "resize": preprocess.resize,
            "resize_size": preprocess.resize_size,
            "cache_dir": data.cache_dir if overridden else None,
        }
    )
    return data_cfg


def run_eval(
    checkpoint: str,
    overrides: list[str],
    split: str | None,
    device: str = "auto",
    save: str | None = None,
    config_path: str | None = None,
    trust_code: bool = False,
) -> dict[str, Any]:
    from trainkit.data.datasets import build_splits
    from trainkit.data.preprocess import Preprocess
    from trainkit.optim import build_loss
    from trainkit.reporting import note
    from trainkit.weights import load_for_inference

    target = pick_device(device)
    checkpoint = resolve_checkpoint_path(checkpoint)
    state = load_for_inference(checkpoint, config_path, overrides, trust_code, "cpu")
    require_code_permission(state, checkpoint, trust_code)
    raw = config_without_write_locations(state["config"])
    config = config_from_dict(apply_overrides(raw, overrides), "checkpoint config")
    preprocess = Preprocess.from_dict(state["preprocess"])
    data_cfg = _eval_data_config(config.data, preprocess, overrides)
    classes = list(state["classes"])
    splits = build_splits(data_cfg, config.run.seed, split=split, classes=classes)
    if list(splits.classes) != classes:
        raise TrainkitError(
            f"the data's classes ({', '.join(map(printable, splits.classes[:5]))}…) differ from the "
            f"checkpoint's ({', '.join(map(printable, classes[:5]))}…)"
        )
    split, remark = choose_split(splits, split)
    if remark:
        note(remark)
    part = splits.get(split)
    in_memory = use_memory_checked(data_cfg, part, preprocess)
    model = build_model_from_checkpoint(state, checkpoint, trust_code).to(target)
    num_classes = int(state["model_spec"]["num_classes"])
    loss_fn = build_loss(config.loss, num_classes).to(target)
    metrics, part = score_split(
        model,
        part,
        in_memory=in_memory,
        preprocess=preprocess,
        loss_fn=loss_fn,
        classes=classes,
        batch_size=config.data.eval_batch_size,
        device=target,
        num_workers=config.data.num_workers,
    )
    metrics.update(split=split, checkpoint=str(checkpoint), dataset=config.data.name)
    if save:
        save_eval(metrics, save, part)
    return metrics


# --------------------------------------------------------------------------- files


def _csv_text(header: list[str], rows: list[list]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _per_class_rows(metrics: dict[str, Any]) -> list[list]:
    def row(label: str, scores: dict, support) -> list:
        return [
            label,
            f"{scores['precision']:.6f}",
            f"{scores['recall']:.6f}",
            f"{scores['f1']:.6f}",
            support,
        ]

    rows = [row(r["class"], r, r["support"]) for r in metrics["per_class_metrics"]]
    rows += [row(label, metrics[label], metrics["num_samples"]) for label in ("macro_avg", "weighted_avg")]
    return rows


def _mistakes_png(shown: list[dict[str, Any]], part) -> bytes | None:
    """A thumbnail grid of the mistakes whose images still load; None when none do."""
    from trainkit.plots import image_grid_png

    if not shown:
        return None
    items = part.dataset()
    images, captions = [], []
    for mistake in shown:
        try:
            images.append(items[mistake["index"]][0])
        except TrainkitError:  # the file changed since: leave it out of the picture
            continue
        true, predicted = printable(mistake["true"], 15), printable(mistake["predicted"], 11)
        captions.append(f"{true}\n→ {predicted} {mistake['probability']:.2f}")
    if not images:
        return None
    return image_grid_png(
        images, captions, columns=8, title="most confident mistakes: true → predicted, probability"
    )


def save_eval(metrics: dict[str, Any], directory: str | Path, part=None, plots: bool = True) -> list[Path]:
    """eval.json, confusion_matrix.csv/.png, per_class.csv, mistakes.csv (+ mistakes.png when
    the split's pixels are at hand) into `directory` → the paths written. plots=False: no PNGs."""
    from trainkit.plots import confusion_png

    folder = output_dir(directory)
    classes = metrics["classes"]
    written = []

    def put(name: str, data) -> None:
        write_file(folder / name, data)
        written.append(folder / name)

    put("eval.json", to_json(metrics, indent=1) + "\n")
    put(
        "confusion_matrix.csv",
        _csv_text(
            ["true \\ predicted", *classes],
            [[name, *row] for name, row in zip(classes, metrics["confusion_matrix"])],
        ),
    )
    put(
        "per_class.csv",
        _csv_text(["class", "precision", "recall", "f1", "support"], _per_class_rows(metrics)),
    )
    columns = ["index", "path", "true", "predicted", "probability", "probability_true"]
    put("mistakes.csv", _csv_text(columns, [[m.get(c, "") for c in columns] for m in metrics["mistakes"]]))
    if not plots:
        return written
    put("confusion_matrix.png", confusion_png(metrics["confusion_matrix"], classes))
    picture = _mistakes_png(metrics["mistakes"][:MISTAKES_GRID], part) if part is not None else None
    if picture is not None:
        put("mistakes.png", picture)
    return written


# --------------------------------------------------------------------------- screen


def print_metrics(metrics: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(to_json(metrics))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(
        markup=False, highlight=False, emoji=False, soft_wrap=True
    )  # names are data, not markup
    extra = "".join(f"  top-{k} {100 * v:.2f}%" for k, v in metrics["top_k"].items())
    console.print(
        f"{printable(metrics['checkpoint'])} on {metrics['dataset']} {metrics['split']} "
        f"({metrics['num_samples']} images): loss {metrics['loss']:.4f}  "
        f"top-1 {100 * metrics['accuracy']:.2f}%{extra}"
    )
    table = Table(title="per class")
    for column in ("class", "precision", "recall", "f1", "support"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for row in metrics["per_class_metrics"]:
        table.add_row(
            printable(row["class"], 40),
            f"{100 * row['precision']:.2f}%",
            f"{100 * row['recall']:.2f}%",
            f"{100 * row['f1']:.2f}%",
            str(row["support"]),
        )
    table.add_section()
    for label in ("macro_avg", "weighted_avg"):
        avg = metrics[label]
        table.add_row(
            label.replace("_", " "),
            f"{100 * avg['precision']:.2f}%",
            f"{100 * avg['recall']:.2f}%",
            f"{100 * avg['f1']:.2f}%",
            str(metrics["num_samples"]),
        )
    console.print(table)
    _print_confusion(console, metrics)
    mistakes = metrics["mistakes"][:MISTAKES_SHOWN]
    if mistakes:
        console.print(f"most confident mistakes ({metrics['num_mistakes']} in all):")
        for m in mistakes:
            where = printable(m["path"]) if "path" in m else f"#{m['index']}"
            console.print(
                f"  {m['probability']:.3f}  {printable(m['true'], 40)} → "
                f"{printable(m['predicted'], 40)}  {where}"
            )


def _print_confusion(console, metrics: dict[str, Any]) -> None:
    """The matrix itself while it fits a terminal; beyond that, its largest confusions."""
    classes, matrix = metrics["classes"], metrics["confusion_matrix"]
    if len(classes) <= 12:
        from rich.table import Table

        table = Table(title="confusion matrix (rows: true, columns: predicted)")
        table.add_column("")
        for name in classes:
            table.add_column(printable(name, 8), justify="right")
        for name, row in zip(classes, matrix):
            table.add_row(printable(name, 16), *(str(v) for v in row))
        console.print(table)
        return
    pairs = sorted(
        ((matrix[i][j], i, j) for i in range(len(classes)) for j in range(len(classes)) if i != j),
        reverse=True,
    )[:10]
    console.print("largest confusions (true → predicted: images):")
    for count, i, j in pairs:
        if count:
            console.print(f"  {printable(classes[i], 30)} → {printable(classes[j], 30)}: {count}")
