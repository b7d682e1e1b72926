"""`trainkit report RUN_DIR [RUN_DIR...]`: one self-contained HTML page about one or more runs.

Everything is inline (CSS in a <style>, figures as base64 PNG): no script, no font, no network
request, so the page opens from a file anywhere and can be mailed around. Every text that
comes from a run (its name, config, class names, file names) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from trainkit.errors import TrainkitError
from trainkit.text import printable, write_file

MAX_JSON_BYTES = 64_000_000  # eval.json of 1000 classes is ~20 MB
MAX_PNG_BYTES = 16_000_000
MISTAKE_ROWS = 20

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;
max-width:1200px;color:#1d232a;background:#fff;padding:0 16px}
h1{font-size:26px;margin:0 0 4px}
h2{font-size:19px;margin-top:28px;border-bottom:1px solid #dde;padding-bottom:4px}
.headline{font-size:20px;margin:6px 0 18px;color:#234}
.metric{display:inline-block;margin-right:28px}.metric b{font-size:28px;color:#0b5cad}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
td,th{border:1px solid #dde;padding:3px 8px;text-align:right}
th{background:#f2f5f9}td:first-child,th:first-child{text-align:left}
pre{background:#f6f8fa;padding:10px;font-size:12px;overflow:auto;max-height:420px}
img{max-width:100%;height:auto;border:1px solid #eee}.muted{color:#667;font-size:13px}
details{margin:10px 0}summary{cursor:pointer;font-weight:600}
"""


def _esc(value: Any) -> str:
    return html.escape(printable(value, 300), quote=True)


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    if path.stat().st_size > MAX_JSON_BYTES:
        raise TrainkitError(f"{printable(path)}: too large to be a trainkit file")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TrainkitError(f"{printable(path)}: not readable JSON ({error})") from error
    return value if isinstance(value, dict) else None


def _png_file(path: Path) -> bytes | None:
    """A PNG from the run directory, if it is one (checked by its signature) and not huge."""
    if not path.is_file() or path.is_symlink() or path.stat().st_size > MAX_PNG_BYTES:
        return None
    data = path.read_bytes()
    return data if data.startswith(b"\x89PNG\r\n\x1a\n") else None


def _img(data: bytes | None, alt: str) -> str:
    if not data:
        return f'<p class="muted">({_esc(alt)}: not available)</p>'
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{encoded}">'


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


class Run:
    """What a run directory holds, read and checked."""

    def __init__(self, directory: str | Path):
        import yaml

        from trainkit.insight import read_metrics

        self.path = Path(directory)
        if not self.path.is_dir():
            raise TrainkitError(f"{printable(directory)}: not a run directory")
        if not (self.path / "metrics.csv").is_file() and not (self.path / "config.yaml").is_file():
            raise TrainkitError(
                f"{printable(directory)}: no metrics.csv or config.yaml (not a run directory)"
            )
        self.name = self.path.resolve().name
        self.rows = read_metrics(self.path / "metrics.csv")
        self.config: dict = {}
        config_path = self.path / "config.yaml"
        if config_path.is_file():
            try:
                loaded = yaml.safe_load(config_path.read_text(encoding="utf-8"))
                self.config = loaded if isinstance(loaded, dict) else {}
            except (OSError, UnicodeDecodeError, yaml.YAMLError):
                self.config = {}
            self.config_text = config_path.read_text(encoding="utf-8", errors="replace")[:100_000]
        else:
            self.config_text = ""
        self.info = _read_json(self.path / "run.json") or {}
        self.eval = _read_json(self.path / "eval.json")

    def best_val(self) -> float | None:
        values = [float(r["val_accuracy"]) for r in self.rows if r.get("val_accuracy")]
        return max(values) if values else None

    def accuracy(self) -> tuple[float | None, str]:
        """The headline accuracy: best.pt's eval when the run has one, else the best val."""
        if self.eval and isinstance(self.eval.get("accuracy"), (int, float)):
            return float(self.eval["accuracy"]), str(self.eval.get("split", "eval"))
        return self.best_val(), "val (best epoch)"

    def final(self) -> dict[str, str]:
        accuracy, split = self.accuracy()
        last = self.rows[-1] if self.rows else {}
        seconds = sum(float(r.get("epoch_seconds") or 0) for r in self.rows)
        macro = (self.eval or {}).get("macro_avg", {}).get("f1")
        return {
            "accuracy": "–" if accuracy is None else f"{100 * accuracy:.2f}% ({split})",
            "macro F1": "–" if macro is None else f"{100 * float(macro):.2f}%",
            "best val accuracy": "–" if self.best_val() is None else f"{100 * self.best_val():.2f}%",
            "last val loss": last.get("val_loss") or "–",
            "epochs": last.get("epoch", "–"),
            "train time": f"{seconds:.1f} s",
        }


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _percent_row(label: Any, scores: dict, support: Any) -> list[Any]:
    return [
        label,
        f"{100 * scores['precision']:.2f}%",
        f"{100 * scores['recall']:.2f}%",
        f"{100 * scores['f1']:.2f}%",
        support,
    ]


def _headline(run: Run) -> str:
    accuracy, split = run.accuracy()
    shown = "–" if accuracy is None else f"{100 * accuracy:.2f}%"
    metrics = [f'<span class="metric">accuracy ({_esc(split)}) <b>{shown}</b></span>']
    if run.eval:
        metrics.append(
            f'<span class="metric">macro F1 <b>{100 * float(run.eval["macro_avg"]["f1"]):.2f}%</b></span>'
        )
        metrics.append(f'<span class="metric">images <b>{int(run.eval["num_samples"])}</b></span>')
    return f'<div class="headline">{"".join(metrics)}</div>'


def _curves_section(run: Run) -> list[str]:
    from trainkit.plots import results_png

    # results.png is written by training; runs that predate it are drawn from results.csv
    curves = _png_file(run.path / "results.png") or (results_png(run.rows) if run.rows else None)
    return ["<h2>Curves</h2>", _img(curves, "loss, accuracy and lr per epoch")]


def _eval_section(run: Run) -> list[str]:
    from trainkit.plots import confusion_png

    if not run.eval:
        return [
            '<p class="muted">No eval.json in this run directory (the run did not finish, or predates '
            "it): run <code>trainkit eval RUN/checkpoints/best.pt --save RUN</code>.</p>"
        ]
    parts = []
    classes = [str(c) for c in run.eval.get("classes", [])]
    parts.append(f"<h2>Confusion matrix of best.pt on {_esc(run.eval.get('split'))}</h2>")
    picture = _png_file(run.path / "confusion_matrix.png")
    if picture is None and run.eval.get("confusion_matrix"):
        picture = confusion_png(run.eval["confusion_matrix"], classes)
    parts.append(_img(picture, "confusion matrix"))
    parts.append("<h2>Per class</h2>")
    rows = [_percent_row(r["class"], r, r["support"]) for r in run.eval.get("per_class_metrics", [])]
    for label in ("macro_avg", "weighted_avg"):
        avg = run.eval.get(label, {})
        if avg:
            rows.append(_percent_row(label.replace("_", " "), avg, run.eval["num_samples"]))
    parts.append(_table(["class", "precision", "recall", "F1", "support"], rows))
    parts.extend(_mistakes_section(run))
    return parts


def _mistakes_section(run: Run) -> list[str]:
    mistakes = run.eval.get("mistakes", [])
    rows = [
        [
            m.get("index"),
            m.get("true"),
            m.get("predicted"),
            f"{float(m.get('probability', 0)):.3f}",
            m.get("path", ""),
        ]
        for m in mistakes[:MISTAKE_ROWS]
    ]
    return [
        f"<h2>Most confident mistakes ({int(run.eval.get('num_mistakes', len(mistakes)))} in all)</h2>",
        _img(_png_file(run.path / "mistakes.png"), "thumbnails of the most confident mistakes"),
        _table(["#", "true", "predicted", "probability", "file"], rows),
    ]


def _timing_section(run: Run) -> list[str]:
    speeds = [float(r["images_per_s"]) for r in run.rows if r.get("images_per_s")]
    info = run.info
    timing = [
        ["epochs", len(run.rows)],
        [
            "training time (sum of epochs)",
            f"{sum(float(r.get('epoch_seconds') or 0) for r in run.rows):.1f} s",
        ],
        ["data preparation", f"{info['data_seconds']:.1f} s" if "data_seconds" in info else "–"],
        ["wall time, start to end", f"{info['wall_seconds']:.1f} s" if "wall_seconds" in info else "–"],
        ["throughput (last epoch)", f"{speeds[-1]:,.0f} images/s" if speeds else "–"],
        ["throughput (best epoch)", f"{max(speeds):,.0f} images/s" if speeds else "–"],
    ]
    return ["<h2>Timing and throughput</h2>", _table(["", ""], timing)]


_ENVIRONMENT_KEYS = (
    "trainkit",
    "torch",
    "torchvision",
    "python",
    "platform",
    "device",
    "cuda",
    "parameters",
    "trainable_parameters",
    "size_mb",
    "flops_per_image",
    "started",
    "finished",
)


def _environment_section(run: Run) -> list[str]:
    rows = [[k, run.info[k]] for k in _ENVIRONMENT_KEYS if k in run.info] or [["run.json", "missing"]]
    return [
        "<h2>Environment and model</h2>",
        _table(["", ""], rows),
        "<h2>Config</h2>",
        f"<pre>{html.escape(run.config_text)}</pre>",
    ]


def _run_section(run: Run, full: bool) -> str:
    parts = [_headline(run), *_curves_section(run), *_eval_section(run), *_timing_section(run)]
    if full:
        parts.extend(_environment_section(run))
    return "\n".join(parts)


def _comparison(runs: list[Run]) -> str:
    from trainkit.plots import curves_png

    flat = [_flatten(run.config) for run in runs]
    keys = sorted({k for f in flat for k in f})
    differing = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]
    differing = [k for k in differing if k != "run.name"]
    finals = [run.final() for run in runs]

    def shown(value: Any) -> str:
        return value if isinstance(value, str) else json.dumps(value)

    # one column per run, one row per metric then per differing key: any number of keys fits
    header = ["", *(run.name for run in runs)]
    rows = [[metric, *(final[metric] for final in finals)] for metric in finals[0]]
    rows += [[key, *(shown(f.get(key)) for f in flat)] for key in differing]
    parts = [
        "<h2>Comparison</h2>",
        '<p class="muted">Final metrics, then the config keys that differ between the runs.</p>',
        _table(header, rows),
        "<h2>Curves, overlaid</h2>",
        _img(curves_png([(run.name, run.rows) for run in runs if run.rows]), "overlaid curves"),
    ]
    return "\n".join(parts)


def build_report(directories: list[str]) -> str:
    if not directories:
        raise TrainkitError("give at least one run directory")
    runs = [Run(d) for d in directories]
    if len(runs) == 1:
        run = runs[0]
        accuracy, split = run.accuracy()
        title = f"trainkit run {run.name}"
        body = [
            f"<h1>{_esc(title)}</h1>",
            f'<p class="muted">{_esc(run.path)}</p>',
            _run_section(run, full=True),
        ]
    else:
        title = f"trainkit: {len(runs)} runs compared"
        body = [f"<h1>{_esc(title)}</h1>", _comparison(runs)]
        for run in runs:
            body.append(
                f"<details><summary>{_esc(run.name)}</summary>{_run_section(run, full=True)}</details>"
            )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        # no network: the page may not load anything, even by accident
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
        "style-src 'unsafe-inline'\">"
        f"<title>{_esc(title)}</title><style>{STYLE}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def run_report(directories: list[str], out: str | None) -> Path:
    page = build_report(directories)
    if out:
        target = Path(out)
    elif len(directories) == 1:
        target = Path(directories[0]) / "report.html"
    else:
        target = Path("report.html")
    if target.is_dir():
        target = target / "report.html"
    if not target.parent.is_dir():
        raise TrainkitError(f"folder {printable(target.parent)} does not exist")
    write_file(target, page)
    return target
