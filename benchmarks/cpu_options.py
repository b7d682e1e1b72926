"""What train.channels_last, train.precision=bf16 and train.compile do to a training step, per model.

    python benchmarks/cpu_options.py                          # every model, every option, CPU
    python benchmarks/cpu_options.py --models lenet --rounds 12

For each model of bench.py's --model list it builds the model the way `trainkit train` does
(trainkit.models.build_model, SGD with Nesterov momentum and weight decay as configs/cifar10.yaml),
and times the train step on one in-memory batch (the compute limit) under each option: plain
float32, channels_last (the model; the batch stays NCHW, as in trainkit), bf16 autocast,
torch.compile, channels_last + compile and channels_last + bf16. The options take turns in
short windows (--rounds of --steps steps each) so that a burst of load on a shared machine hits
all of them; the table gives each option's median images/s and the median of its per-round ratio
to plain float32. Compilation happens before the first window and is reported separately.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import MODELS, limit_optimizer, train_step  # noqa: E402  (the models, their shapes, the step: one home)

OPTIONS = {
    "float32": {},
    "channels_last": {"channels_last": True},
    "bf16": {"bf16": True},
    "compile": {"compile": True},
    "channels_last+compile": {"channels_last": True, "compile": True},
    "channels_last+bf16": {"channels_last": True, "bf16": True},
}


def make_step(model_key: str, option: dict, batch_size: int):
    import torch

    from trainkit.models import build_model

    shape = MODELS[model_key]
    size, channels = shape["size"], shape["channels"]
    torch.manual_seed(0)
    model = build_model(
        {
            "name": shape["name"],
            "num_classes": 10,
            "in_channels": shape["channels"],
            "input_size": shape["size"],
        }
    )
    optimizer = limit_optimizer(model)
    x = torch.randn(batch_size, channels, size, size)  # (B, C, H, W)
    y = torch.randint(0, 10, (batch_size,))
    if option.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)  # the batch stays NCHW, as in trainkit
    forward = torch.compile(model) if option.get("compile") else model
    step = train_step(forward, optimizer, "cpu", torch.bfloat16 if option.get("bf16") else None)
    return lambda: step(x, y)


def measure(model_key: str, args) -> dict:
    steps, warmup = {}, {}
    for name in args.options:
        step = make_step(model_key, OPTIONS[name], args.batch_size)
        began = time.perf_counter()
        for _ in range(3):  # compiles here
            step()
        warmup[name] = time.perf_counter() - began
        steps[name] = step
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            began = time.perf_counter()
            for _ in range(args.steps):
                step()
            rates[name].append(args.steps * args.batch_size / (time.perf_counter() - began))
    base = rates.get("float32")
    return {
        name: {
            "images_per_s": statistics.median(values),
            "vs_float32": statistics.median(a / b for a, b in zip(values, base)) if base else float("nan"),
            "warmup_s": warmup[name],
        }
        for name, values in rates.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--options", nargs="*", choices=list(OPTIONS), default=list(OPTIONS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=0, help="steps per window (default: by model)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    if "float32" not in args.options:
        args.options.insert(0, "float32")

    import torch

    torch.set_num_threads(args.threads)
    print(
        f"CPU, {args.threads} threads, batch {args.batch_size}, {args.rounds} rounds, "
        f"torch {torch.__version__}, "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(f"{'model':<10}{'option':<24}{'images/s':>10}{'vs float32':>12}{'first 3 steps':>15}")
    default_steps = {"lenet": 25, "mlp": 60, "alexnet": 2, "resnet18": 2}
    for model_key in args.models:
        args_steps = args.steps or default_steps[model_key]
        run = argparse.Namespace(**{**vars(args), "steps": args_steps})
        for name, r in measure(model_key, run).items():
            print(
                f"{model_key:<10}{name:<24}{r['images_per_s']:>10,.0f}{r['vs_float32']:>11.2f}x"
                f"{r['warmup_s']:>14.1f}s"
            )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
