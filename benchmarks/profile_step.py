"""Where a steady-state trainkit training step spends its time (CPU, torch.profiler).

    python benchmarks/profile_step.py                      # LeNet, synthetic CIFAR-shaped data
    python benchmarks/profile_step.py --model mlp --epochs 3

Runs the real `trainkit train configs/cifar10.yaml` in this process on synthetic data, leaves
the first epoch as warm-up, and profiles the last one with a labelled range around each piece
of the step (wrapped from outside: trainkit is not changed). Prints ms per step and % of the
step for each piece; "unlabelled" is the step's time outside every range (the loop, Python
glue between the pieces). The step time is the profiled epoch's wall time / its steps;
the un-profiled epoch before it is printed beside it to show the profiler's own cost.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench import MODELS  # noqa: E402

# the pieces of a step, in the order they run; nested ones are indented in the print-out
PIECES = [
    ("gather", "batch gather (index_select of images + labels, positions)"),
    ("transform", "uint8 -> augmented, normalised float batch"),
    ("  crop_flip", "  of which crop + flip"),
    ("  normalise", "  of which uint8 -> float + normalise"),
    ("forward", "model forward"),
    ("loss", "loss (cross-entropy)"),
    ("backward", "backward"),
    ("optimizer", "optimizer step (SGD)"),
    ("zero_grad", "zero_grad"),
    ("schedule", "lr schedule step"),
    ("metrics", "running loss / accuracy (held; summed every 32 batches)"),
    ("check_loss", "non-finite loss check (a flag the sums set)"),
    ("step_end", "step_end callbacks (progress, running loss read)"),
]


def labelled(name, function):
    def wrapped(*args, **kwargs):
        with record_function(name):
            return function(*args, **kwargs)

    return wrapped


def instrument(profiled_epoch: int, results: dict) -> None:
    """Wrap trainkit's step pieces in labelled ranges and profile epoch `profiled_epoch`."""
    from trainkit import trainer as trainer_module
    from trainkit.data import augment, loader, preprocess

    source_epoch = loader.TensorSource.epoch

    def gathered(self, epoch, start=0):
        batches = source_epoch(self, epoch, start)
        while True:
            with record_function("gather"):
                batch = next(batches, None)
            if batch is None:
                return
            yield batch

    loader.TensorSource.epoch = gathered
    augment.BatchTransform.__call__ = labelled("transform", augment.BatchTransform.__call__)
    augment.crop_and_flip = labelled("crop_flip", augment.crop_and_flip)
    preprocess.Preprocess.normalize = labelled("normalise", preprocess.Preprocess.normalize)
    torch.Tensor.backward = labelled("backward", torch.Tensor.backward)
    Trainer = trainer_module.Trainer
    Trainer._check_loss = labelled("check_loss", Trainer._check_loss)
    Trainer._after_step = labelled("step_end", Trainer._after_step)
    trainer_module.EpochTotals.add = labelled("metrics", trainer_module.EpochTotals.add)
    run_epoch = Trainer.train_one_epoch

    def train_one_epoch(self, epoch):
        if not getattr(self, "_labelled", False):
            self._labelled = True
            self.model.forward = labelled("forward", self.model.forward)
            self.loss_fn = labelled("loss", self.loss_fn)
            self.scaler.step = labelled("optimizer", self.scaler.step)
            self.optimizer.zero_grad = labelled("zero_grad", self.optimizer.zero_grad)
            self.schedule.step = labelled("schedule", self.schedule.step)
        began = time.perf_counter()
        if epoch != profiled_epoch:
            row = run_epoch(self, epoch)
            results.setdefault("plain", []).append((time.perf_counter() - began, self.batches_per_epoch))
            return row
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            row = run_epoch(self, epoch)
        results["profiled"] = (time.perf_counter() - began, self.batches_per_epoch)
        results["profile"] = prof
        return row

    Trainer.train_one_epoch = train_one_epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=list(MODELS), default="lenet")
    parser.add_argument("--epochs", type=int, default=3, help="the last one is profiled")
    parser.add_argument("--synthetic-size", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--top-ops", type=int, default=15, help="also print the costliest torch ops")
    args = parser.parse_args()

    results: dict = {}
    instrument(args.epochs - 1, results)
    model = MODELS[args.model]
    out = tempfile.mkdtemp(prefix="profile-step-")
    command = [
        "train",
        str(ROOT / "configs" / "cifar10.yaml"),
        f"run.out_dir={out}",
        "log.progress=plain",
        "log.tensorboard=false",
        f"train.epochs={args.epochs}",
        f"data.batch_size={args.batch_size}",
        "data.name=synthetic",
        f"data.synthetic.train_size={args.synthetic_size}",
        "data.synthetic.test_size=1000",
        f"data.synthetic.image_size={model['size']}",
        f"data.synthetic.channels={model['channels']}",
        f"model.name={model['name']}",
        *model["overrides"],
    ]
    from trainkit.cli import app

    try:
        app(command, standalone_mode=False)
    except SystemExit as done:
        if done.code:
            raise
    seconds, steps = results["profiled"]
    step_ms = 1000 * seconds / steps
    plain_s, plain_steps = results["plain"][-1]
    totals = defaultdict(float)  # ms over the epoch, per label
    for event in results["profile"].key_averages():
        totals[event.key] += event.cpu_time_total / 1000
    print(
        f"\n{model['name']} {model['channels']}x{model['size']}x{model['size']}, batch "
        f"{args.batch_size}, {torch.get_num_threads()} threads, {steps} steps; profiled epoch "
        f"{step_ms:.3f} ms/step, un-profiled epoch before it {1000 * plain_s / plain_steps:.3f} ms/step"
    )
    print(f"{'piece':<58}{'ms/step':>9}{'% step':>8}")
    top_level = 0.0
    for label, text in PIECES:
        ms = totals.get(label.strip(), 0.0) / steps
        if not label.startswith(" "):
            top_level += ms
        print(f"{text:<58}{ms:>9.3f}{100 * ms / step_ms:>7.1f}%")
    rest = step_ms - top_level
    print(f"{'unlabelled (loop, Python glue)':<58}{rest:>9.3f}{100 * rest / step_ms:>7.1f}%")
    print(f"{'whole step':<58}{step_ms:>9.3f}{100.0:>7.1f}%")
    if args.top_ops:
        print("\ncostliest torch ops of the profiled epoch (self CPU time, ms/step):")
        ops = [e for e in results["profile"].key_averages() if e.key.startswith("aten::")]
        for event in sorted(ops, key=lambda e: -e.self_cpu_time_total)[: args.top_ops]:
            per_step = event.self_cpu_time_total / 1000 / steps
            print(f"  {event.key:<40}{per_step:>9.3f}  ({event.count / steps:.1f} calls/step)")


if __name__ == "__main__":
    main()
