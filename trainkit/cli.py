"""The `trainkit` command: parse arguments, call one function per verb.

Heavy modules (torch, torchvision, pydantic) are imported inside the verbs, so `--help` is fast.
Errors become one line on stderr: exit 2 for config/usage mistakes, 1 for runtime failures;
`--debug` or TRAINKIT_DEBUG=1 also shows the traceback (the exit code stays the same).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: importing rich to draw it would double `--help` time
    help="Train, evaluate and serve image classifiers from one YAML file.",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _debug() -> bool:
    return os.environ.get("TRAINKIT_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def _one_line(error: BaseException) -> str:
    """A failure as one escaped line: our own errors whole, others as 'Type: first line'."""
    from trainkit.text import escape

    message = str(error).strip()
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        message = f"{error.filename}: {error.strerror}"  # e.g. '…: refusing to write through a …'
    elif not hasattr(error, "exit_code"):
        first = next((line.strip() for line in message.splitlines() if line.strip()), "")
        message = f"{type(error).__name__}: {first}" if first else type(error).__name__
    return escape(message) if message else type(error).__name__


def _owns_process(ctx: typer.Context) -> bool:
    """Is this the `trainkit` process itself (main()), rather than a CLI call inside another
    program (a test runner)? Only the owner handles SIGINT/SIGTERM and turns Ctrl-C into exit
    130; inside another program they stay that program's."""
    obj = getattr(ctx, "obj", None)
    return isinstance(obj, dict) and bool(obj.get("owns_process"))


def _started(ctx: typer.Context) -> float | None:
    """When main() started (a time.perf_counter() value), if it did."""
    obj = getattr(ctx, "obj", None)
    return obj.get("started") if isinstance(obj, dict) else None


def _interrupt_once(signum, frame) -> None:
    """The process's Ctrl-C outside a run's own handling: one KeyboardInterrupt, after which
    the process is leaving and further Ctrl-C are ignored (one that landed in the interpreter's
    exit would end it by SIGINT instead of exit 130)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def _leaving(ctx: typer.Context) -> None:
    """A stop is being reported: from here on Ctrl-C changes nothing (the owner process only)."""
    if _owns_process(ctx):
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run(verb, ctx: typer.Context) -> None:
    """Call a verb; a non-zero int it returns, and known failures (as one line), become the
    exit code."""
    from trainkit.errors import Interrupted

    try:
        code = verb()
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        if not _owns_process(ctx):
            raise
        _leaving(ctx)
        print("interrupted", file=sys.stderr)
        raise typer.Exit(130) from None
    except BrokenPipeError:  # `trainkit eval --json | head`: the reader left, nothing to report
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush stays quiet
        raise typer.Exit(141) from None  # 128 + SIGPIPE, as a shell pipeline reports it
    except Exception as error:  # noqa: BLE001 - the CLI boundary
        if isinstance(error, Interrupted):
            _leaving(ctx)
        code = getattr(error, "exit_code", 1)
        if _debug():
            import traceback

            traceback.print_exc()
        line = _one_line(error)
        # a stop on request (checkpoint saved) is not an error
        print(line if isinstance(error, Interrupted) else f"error: {line}", file=sys.stderr)
        raise typer.Exit(code) from error
    if code:
        raise typer.Exit(code)


def _split_args(args: list[str]) -> tuple[str, list[str], list[str]]:
    """CONFIG, then key=value overrides; other words are returned separately."""
    config, rest = args[0], args[1:]
    overrides = [a for a in rest if _is_override(a)]
    others = [a for a in rest if not _is_override(a)]
    return config, overrides, others


def _is_override(word: str) -> bool:
    """`key=value` sets a key, `~key` removes one (see config.apply_overrides)."""
    return "=" in word or (word.startswith("~") and len(word) > 1)


def _print_version(value: bool) -> None:
    if not value:
        return
    from trainkit import __version__
    from trainkit.versions import version_lines

    print("\n".join(version_lines(__version__)))
    raise typer.Exit()


@app.callback()
def _options(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
    version: bool = typer.Option(
        False,
        "--version",
        callback=_print_version,
        is_eager=True,
        help="Show trainkit, torch, torchvision and Pillow versions (flagging any below its safe floor).",
    ),
) -> None:
    if debug:
        os.environ["TRAINKIT_DEBUG"] = "1"


def _trust_code_option():
    return typer.Option(
        False, "--trust-code", help="Allow importing the model's own code (model.name 'module:Class')."
    )


def _state_dict_config_option():
    return typer.Option(
        None,
        "--config",
        help="For a plain state dict (.pt/.pth/.safetensors): the model, data and preprocessing.",
    )


def _device_option():
    return typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N")


def _train_words(words: list[str], resume: bool) -> tuple[str | None, str | None]:
    """train's words that are not overrides → (CONFIG, RUN_DIR or CHECKPOINT to resume)."""
    if not resume:
        if not words:
            _usage("missing CONFIG (a YAML file)")
        if len(words) > 1:
            _usage(f"unexpected argument '{words[1]}' (overrides are key=value or ~key)")
        return words[0], None
    configs = [w for w in words if Path(w).suffix.lower() in (".yaml", ".yml")]
    targets = [w for w in words if w not in configs]
    if len(configs) > 1 or len(targets) > 1:
        _usage("--resume takes at most one CONFIG (.yaml) and one RUN_DIR or CHECKPOINT")
    return (configs or [None])[0], (targets or [None])[0]


@app.command()
def train(
    ctx: typer.Context,
    args: list[str] | None = typer.Argument(
        None,
        metavar="[CONFIG] [KEY=VALUE]... [RUN_DIR | CHECKPOINT]",
        help="YAML config (optional with --resume), then overrides such as optim.lr=0.01.",
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue a run: RUN_DIR or CHECKPOINT if given, else the newest run named run.name. "
        "The config comes from the checkpoint; only train.epochs, data location/cache/workers, "
        "device/parallel, log.* and data.eval_batch_size may change.",
    ),
    nproc: int | None = typer.Option(
        None, "--nproc", min=1, help="Start N DDP processes on this machine (torch.distributed.run)."
    ),
    trust_code: bool = _trust_code_option(),
) -> None:
    """Train a model; writes a run directory with checkpoints, metrics.csv and TensorBoard logs."""
    overrides = [a for a in args or [] if _is_override(a)]
    words = [a for a in args or [] if not _is_override(a)]
    config_path, target = _train_words(words, resume)

    def verb():
        from trainkit.config import load_config

        config = load_config(config_path, overrides) if config_path else None
        if nproc:
            from trainkit.launch import launch_local

            forwarded = ["train", *words, *overrides, "train.parallel=ddp"]
            forwarded += ["--resume"] if resume else []
            return launch_local(nproc, forwarded + (["--trust-code"] if trust_code else []))
        from trainkit.train import run_train

        run_train(
            config,
            overrides=overrides,
            resume=resume,
            resume_path=target,
            started=_started(ctx),
            handle_signals=_owns_process(ctx),
            trust_code=trust_code,
        )

    _run(verb, ctx)


@app.command("eval")
def evaluate(
    ctx: typer.Context,
    checkpoint: str = typer.Argument(..., help="A checkpoint file (e.g. runs/x/checkpoints/best.pt)."),
    overrides: list[str] | None = typer.Argument(
        None, metavar="[KEY=VALUE]...", help="Config overrides, e.g. data.root=/other/data."
    ),
    split: str | None = typer.Option(
        None, "--split", help="test | val | train; default: test, or val when the data has no test split"
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    device: str = _device_option(),
    config_path: str | None = _state_dict_config_option(),
    trust_code: bool = _trust_code_option(),
    save: str | None = typer.Option(
        None,
        "--save",
        metavar="DIR",
        help="Write eval.json, confusion_matrix.csv/.png, per_class.csv, mistakes.csv/.png into DIR.",
    ),
) -> None:
    """Loss, accuracy, confusion matrix, per-class precision/recall/F1 and the most confident
    mistakes of a checkpoint on a data split."""
    bad = [o for o in overrides or [] if not _is_override(o)]
    if bad:
        _usage(f"unexpected argument '{bad[0]}' (overrides are key=value or ~key)")

    def verb():
        from trainkit.evaluate import print_metrics, run_eval

        metrics = run_eval(checkpoint, overrides or [], split, device, save, config_path, trust_code)
        print_metrics(metrics, as_json)

    _run(verb, ctx)


@app.command()
def predict(
    ctx: typer.Context,
    inputs: list[str] = typer.Argument(..., help="Image files, folders or globs."),
    checkpoint: str | None = typer.Option(
        None, "-c", "--checkpoint", help="Checkpoint; default: the newest runs/**/checkpoints/best.pt."
    ),
    topk: int = typer.Option(1, "--topk", "-k", min=1, help="Classes to show per image."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
    device: str = _device_option(),
    config_path: str | None = _state_dict_config_option(),
    trust_code: bool = _trust_code_option(),
    out: str | None = typer.Option(
        None, "--out", metavar="FILE", help="Write the predictions to FILE.csv or FILE.jsonl instead."
    ),
    sort_into: str | None = typer.Option(
        None, "--sort-into", metavar="DIR", help="Hard-link (or copy) each image into DIR/<label>/."
    ),
    copy: bool = typer.Option(False, "--copy", help="With --sort-into: copy instead of hard links."),
) -> None:
    """Classify images: one line per image with label and probability."""

    def verb():
        from trainkit.predict import run_predict

        return run_predict(
            inputs, checkpoint, topk, as_json, device, out, sort_into, copy, config_path, trust_code
        )

    _run(verb, ctx)


@app.command()
def report(
    ctx: typer.Context,
    run_dirs: list[str] = typer.Argument(..., metavar="RUN_DIR...", help="One or more run directories."),
    out: str | None = typer.Option(
        None,
        "-o",
        "--out",
        metavar="FILE",
        help="Default: RUN_DIR/report.html, or ./report.html for several.",
    ),
) -> None:
    """One self-contained HTML page: curves, confusion matrix, per-class table, mistakes, config,
    environment and timing; several runs get a comparison table and overlaid curves."""

    def verb():
        from trainkit.report import run_report

        print(run_report(run_dirs, out))

    _run(verb, ctx)


@app.command()
def inspect(
    ctx: typer.Context,
    target: str = typer.Argument(
        ..., metavar="DATA_CONFIG_OR_FOLDER", help="A YAML config or an image folder."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    strict: bool = typer.Option(
        False, "--strict", help="Exit 1 on leakage across splits or unreadable files."
    ),
    save: str | None = typer.Option(
        None, "--save", metavar="DIR", help="Write inspect.json and samples.png (a grid per class) into DIR."
    ),
    workers: int | None = typer.Option(None, "--workers", min=1, help="Decoding processes (first run)."),
) -> None:
    """Look at the data before training: class counts, sizes and modes, unreadable files, exact
    duplicates across and within splits, a suggested image_size and its memory."""

    def verb():
        from trainkit.inspect import run_inspect

        return run_inspect(target, as_json, strict, save, workers)

    _run(verb, ctx)


@app.command()
def export(
    ctx: typer.Context,
    checkpoint: str = typer.Argument(..., help="A checkpoint file (e.g. runs/x/checkpoints/best.pt)."),
    fmt: str = typer.Option(..., "--format", "-f", help="onnx | torchscript | safetensors | trainkit"),
    output: str | None = typer.Option(
        None, "-o", "--output", help="Output file; default: next to the checkpoint (best.onnx, ...)."
    ),
    opset: int | None = typer.Option(None, "--opset", help="ONNX opset version (default 20; 18 and up)."),
    with_preprocess: bool = typer.Option(
        False, "--with-preprocess", help="Bake normalisation in: the model takes uint8 N×C×H×W images."
    ),
    images: list[str] | None = typer.Option(
        None,
        "--images",
        help="Image file, folder or glob for the parity check (repeatable; default: the checkpoint's "
        "validation data).",
    ),
    num_images: int | None = typer.Option(
        None, "--num-images", "-n", help="Images in the parity check (default 64)."
    ),
    tolerance: float | None = typer.Option(
        None, "--tolerance", help="Max abs logit difference allowed (default 1e-4)."
    ),
) -> None:
    """Export a checkpoint, load the file back with its own runtime and check it gives the same
    logits as the original (exit 1 above --tolerance, the file kept)."""

    def verb():
        from trainkit.export import report, run_export

        given = {"opset": opset, "num_images": num_images, "tolerance": tolerance}
        result = run_export(
            checkpoint,
            fmt,
            output,
            with_preprocess=with_preprocess,
            image_paths=images,
            **{key: value for key, value in given.items() if value is not None},
        )
        return report(result, fmt, checkpoint)

    _run(verb, ctx)


@app.command()
def config(
    ctx: typer.Context,
    args: list[str] = typer.Argument(
        ..., metavar="CONFIG [KEY=VALUE]...", help="YAML config, then overrides."
    ),
    trust_code: bool = _trust_code_option(),
) -> None:
    """Print the fully resolved config (defaults included) as YAML."""
    config_path, overrides, others = _split_args(args)
    if others:
        _usage(f"unexpected argument '{others[0]}' (overrides are key=value or ~key)")

    def verb():
        from trainkit.config import dump_config, load_config
        from trainkit.train import check_config

        resolved = load_config(config_path, overrides)
        check_config(resolved, trust_code)
        sys.stdout.write(dump_config(resolved))

    _run(verb, ctx)


@app.command()
def cache(
    ctx: typer.Context,
    action: str = typer.Argument(..., metavar="list|clean", help="list: sizes and places; clean: delete."),
    root: str | None = typer.Argument(
        None, help="A dataset folder (or a data.cache_dir); default: every cache in the user cache folder."
    ),
) -> None:
    """The decoded-image caches: where they are and how big (list), or remove them (clean)."""
    if action not in ("list", "clean"):
        _usage(f"unknown cache action '{action}'; choices: list, clean")

    def verb():
        from trainkit.data.cache import run_cache

        return run_cache(action, root)

    _run(verb, ctx)


def _usage(message: str) -> None:
    from trainkit.text import escape

    print(f"error: {escape(message)}", file=sys.stderr)
    raise typer.Exit(2)


def main() -> None:
    import signal
    import time

    started = time.perf_counter()
    signal.signal(signal.SIGINT, _interrupt_once)
    app(obj={"owns_process": True, "started": started})


if __name__ == "__main__":
    main()
