"""trainkit's training step vs the two compute limits, paired in short windows in one process.

    python benchmarks/paired.py                              # LeNet, synthetic CIFAR-shaped data
    python benchmarks/paired.py --model mlp --epochs 4 --window 50

bench.py runs each contestant in its own process, one after the other; on a shared machine the
speed a process gets drifts by more than the gaps being measured (seen here: the fixed-batch
limit measured 15 % *slower* than the gather limit, which does strictly more). This script runs
the real engine (`trainkit.train`, configs/cifar10.yaml with bench.py's overrides for --model) and,
every --window of its optimizer steps, a callback runs --window steps of each limit loop
(bench.py's compute_limit and gather_limit step, with trainkit's precision and memory format) in
the same process. Each window gives a ratio trainkit / limit taken seconds apart; the median of
those ratios is the figure. trainkit's windows are timed between its step_end events, so they
hold everything a step does (gather, augmentation, metrics, schedule, callbacks) and nothing of
the epoch's evaluation.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402  (the models, their shapes and the limit step: one home)


def limit_loops(args, size: int) -> dict:
    """name → run(steps) → images/s, for the fixed-batch and the gather limit."""
    import torch

    from trainkit.data.synthetic import make_synthetic

    shape = bench.MODELS[args.model]
    images, labels = make_synthetic(size, "train", shape["size"], shape["channels"])  # (N, C, H, W) uint8
    mean, std = bench.normalization(args)
    shift = torch.tensor(mean).view(1, -1, 1, 1) * 255
    scale = 1 / (torch.tensor(std).view(1, -1, 1, 1) * 255)
    batch = args.batch_size

    def make(fixed: bool):
        torch.manual_seed(0)
        model = bench.build_bench_model(args)
        optimizer = bench.limit_optimizer(model)
        step = bench.limit_step(args, model, optimizer)
        x_fixed = images[:batch].float().sub_(shift).mul_(scale)
        order = {"at": size, "perm": None}

        def run(steps: int) -> float:
            began = time.perf_counter()
            for _ in range(steps):
                if fixed:
                    step(x_fixed, labels[:batch])
                    continue
                if order["at"] + batch > size:  # one shuffle per epoch
                    order["perm"], order["at"] = torch.randperm(size), 0
                index = order["perm"][order["at"] : order["at"] + batch]
                order["at"] += batch
                step(
                    images.index_select(0, index).float().sub_(shift).mul_(scale),
                    labels.index_select(0, index),
                )
            return steps * batch / (time.perf_counter() - began)

        run(3)  # warm-up
        return run

    return {"compute_limit": make(fixed=True), "gather_limit": make(fixed=False)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=list(bench.MODELS), default="lenet")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--synthetic-size", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--window", type=int, default=25, help="optimizer steps per window")
    parser.add_argument("--threads", type=int, default=0, help="default: torch's")
    parser.add_argument("--trainkit-args", default="", help="extra overrides, as bench.py's")
    args = parser.parse_args()
    args.device, args.data = "cpu", None

    import torch

    import trainkit
    from trainkit.callbacks import Callback

    if args.threads:
        torch.set_num_threads(args.threads)
    loops = limit_loops(args, args.synthetic_size)
    rates: dict[str, list[float]] = {"trainkit": [], **{name: [] for name in loops}}

    class Pairing(Callback):
        def __init__(self):
            self.mark, self.steps = None, 0

        def on_epoch_start(self, trainer, epoch: int) -> None:
            self.mark, self.steps = None, 0  # a window never spans an evaluation

        def on_step_end(self, trainer, step) -> None:
            now = time.perf_counter()
            if step.global_step <= 10:  # warm-up
                return
            if self.mark is None:
                self.mark = now
                return
            self.steps += 1
            if self.steps == args.window:
                rates["trainkit"].append(args.window * args.batch_size / (now - self.mark))
                for name, run in loops.items():
                    rates[name].append(run(args.window))
                self.mark, self.steps = time.perf_counter(), 0

    out = Path(tempfile.mkdtemp(prefix="bench-paired-"))
    command = bench.trainkit_command(args, out, [f"train.epochs={args.epochs}"])
    overrides = command[command.index("train") + 2 :]  # after `python -m trainkit train CONFIG`
    overrides = [o for o in overrides if not o.startswith(("log.progress=", "train.device="))]
    overrides += ["log.progress=none", "log.plots=false"]
    trainkit.train(
        bench.ROOT / "configs" / "cifar10.yaml", overrides, callbacks=[Pairing()], handle_signals=False
    )

    options = bench.speed_options(args)
    print(
        f"{bench.MODELS[args.model]['name']}, batch {args.batch_size}, {torch.get_num_threads()} threads, "
        f"{'bf16' if options.precision == 'bf16' else 'float32'}"
        f"{', channels_last' if options.channels_last else ''}; {len(rates['trainkit'])} windows of "
        f"{args.window} steps"
    )
    print(f"{'':<15}{'images/s':>10}{'trainkit / it':>16}")
    for name, values in rates.items():
        ratio = statistics.median(a / b for a, b in zip(rates["trainkit"], values))
        print(f"{name:<15}{statistics.median(values):>10,.0f}{ratio:>15.3f}x")


if __name__ == "__main__":
    main()
