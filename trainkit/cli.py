"""The `trainkit` command: parse arguments, call one function per verb.

Heavy modules (torch, torchvision, pydantic) are imported inside the verbs, so `--help` is fast.
Errors become one line on stderr: exit 2 for config/usage mistakes, 1 for runtime failures;
`--debug` or TRAINKIT_DEBUG=1 shows the traceback.
"""

from __future__ import annotations

import os
import sys

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
    return os.environ.get("TRAINKIT_DEBUG", "") not in ("", "0", "false")


def _run(verb) -> None:
    """Call a verb; a non-zero int it returns, and known failures (as one line), become the
    exit code."""
    try:
        code = verb()
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise typer.Exit(130) from None
    except BrokenPipeError:  # `trainkit eval --json | head`: the reader left, nothing to report
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush stays quiet
        raise typer.Exit(141) from None  # 128 + SIGPIPE, as a shell pipeline reports it
    except Exception as error:  # noqa: BLE001 - the CLI boundary
        if _debug():
            raise
        from trainkit.errors import TrainkitError

        code = getattr(error, "exit_code", 1)
        if isinstance(error, TrainkitError) or hasattr(error, "signum"):
            message = str(error)
        else:
            message = f"{type(error).__name__}: {error}"
        first = message.strip().splitlines()[0] if message.strip() else type(error).__name__
        # a stop on request (checkpoint saved) is not an error
        print(first if hasattr(error, "signum") else f"error: {first}", file=sys.stderr)
        raise typer.Exit(code) from error
    if code:
        raise typer.Exit(code)


def _split_args(args: list[str]) -> tuple[str, list[str], list[str]]:
    """CONFIG, then key=value overrides; other words are returned separately."""
    config, rest = args[0], args[1:]
    overrides = [a for a in rest if "=" in a]
    others = [a for a in rest if "=" not in a]
    return config, overrides, others


@app.callback()
def _options(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
) -> None:
    if debug:
        os.environ["TRAINKIT_DEBUG"] = "1"


@app.command()
def train(
    args: list[str] = typer.Argument(
        ...,
        metavar="CONFIG [KEY=VALUE]... [CHECKPOINT]",
        help="YAML config, then overrides such as optim.lr=0.01.",
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue a run: from CHECKPOINT if given, else the run's newest checkpoints/last.pt.",
    ),
    nproc: int | None = typer.Option(
        None, "--nproc", min=1, help="Start N DDP processes on this machine (torch.distributed.run)."
    ),
) -> None:
    """Train a model; writes a run directory with checkpoints, metrics.csv and TensorBoard logs."""
    config_path, overrides, others = _split_args(args)
    if others and not resume:
        _usage(f"unexpected argument '{others[0]}' (overrides are key=value)")
    if len(others) > 1:
        _usage("give at most one checkpoint to --resume")

    def verb():
        from trainkit.config import load_config

        config = load_config(config_path, overrides)
        if nproc:
            from trainkit.launch import launch_local

            forwarded = ["train", config_path, *overrides, *others, "train.parallel=ddp"]
            return launch_local(nproc, forwarded + (["--resume"] if resume else []))
        from trainkit.train import run_train

        run_train(config, resume=resume, resume_path=others[0] if others else None)

    _run(verb)


@app.command("eval")
def evaluate(
    checkpoint: str = typer.Argument(..., help="A checkpoint file (e.g. runs/x/checkpoints/best.pt)."),
    overrides: list[str] | None = typer.Argument(
        None, metavar="[KEY=VALUE]...", help="Config overrides, e.g. data.root=/other/data."
    ),
    split: str = typer.Option("test", "--split", help="test | val | train"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
) -> None:
    """Loss, top-1, top-5 and per-class accuracy of a checkpoint on a data split."""
    bad = [o for o in overrides or [] if "=" not in o]
    if bad:
        _usage(f"unexpected argument '{bad[0]}' (overrides are key=value)")

    def verb():
        from trainkit.evaluate import print_metrics, run_eval

        print_metrics(run_eval(checkpoint, overrides or [], split, device), as_json)

    _run(verb)


@app.command()
def predict(
    inputs: list[str] = typer.Argument(..., help="Image files, folders or globs."),
    checkpoint: str | None = typer.Option(
        None, "-c", "--checkpoint", help="Checkpoint; default: the newest runs/**/checkpoints/best.pt."
    ),
    topk: int = typer.Option(1, "--topk", "-k", min=1, help="Classes to show per image."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
) -> None:
    """Classify images: one line per image with label and probability."""

    def verb():
        from trainkit.predict import run_predict

        return run_predict(inputs, checkpoint, topk, as_json, device)

    _run(verb)


@app.command()
def config(
    args: list[str] = typer.Argument(
        ..., metavar="CONFIG [KEY=VALUE]...", help="YAML config, then overrides."
    ),
) -> None:
    """Print the fully resolved config (defaults included) as YAML."""
    config_path, overrides, others = _split_args(args)
    if others:
        _usage(f"unexpected argument '{others[0]}' (overrides are key=value)")

    def verb():
        from trainkit.config import dump_config, load_config
        from trainkit.train import check_config

        resolved = load_config(config_path, overrides)
        check_config(resolved)
        sys.stdout.write(dump_config(resolved))

    _run(verb)


@app.command()
def cache(
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

    _run(verb)


def _usage(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(2)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
