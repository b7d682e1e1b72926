"""Side-by-side training benchmark: trainkit vs the tutorial loop vs Lightning vs the compute limits.

    python benchmarks/bench.py                         # synthetic CIFAR-shaped data (offline)
    python benchmarks/bench.py --data /path/cifar10    # an ImageFolder tree (train/ and test/)
    python benchmarks/bench.py --model resnet18 --only trainkit compute_limit gather_limit

All contestants train the same model (--model: LeNet by default) on the same images in one run,
each in its own process (so peak memory is its own): (a) `trainkit train` with
configs/cifar10.yaml, (b) the classic tutorial loop (batch 4, per-image PIL ToTensor + Normalize,
DataLoader with 2 workers, SGD lr 0.001 momentum 0.9), (c) PyTorch Lightning's Trainer with the
same per-image DataLoader pipeline at --batch-size, (d) the compute limit: the same train step on
one in-memory, preprocessed batch, (e) the gather limit: that step plus the cheapest possible
gather of a random batch from a uint8 (N, C, H, W) tensor and its conversion to a normalised
float batch, which any loop over in-memory data must pay. With --data it also measures time to
--target test accuracy and the decoded cache's start-up gain, and it always times CLI start-up.
Lightning comes from the `bench` extra: pip install -e ".[bench]".
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # the tutorial's normalization


# ----------------------------------------------------------------------------- shared pieces


# --model: the registry name, the image shape it is benchmarked at, and the trainkit overrides
# that make `trainkit train configs/cifar10.yaml` train that model on that shape.
MODELS = {
    "lenet": {"name": "lenet", "channels": 3, "size": 32, "overrides": []},
    # 32 px picks the small AlexNet form (3x3 convs) by itself
    "alexnet": {"name": "alexnet", "channels": 3, "size": 32, "overrides": []},
    # MNIST-size, without augmentation as configs/mnist_mlp.yaml
    "mlp": {
        "name": "mlp",
        "channels": 1,
        "size": 28,
        "overrides": ["data.augment.crop_padding=0", "data.augment.hflip=false"],
    },
    "resnet18": {"name": "torchvision.resnet18", "channels": 3, "size": 64, "overrides": []},
}


def build_bench_model(args):
    from trainkit.models import build_model

    model = MODELS[args.model]
    return build_model(
        {
            "name": model["name"],
            "num_classes": 10,
            "in_channels": model["channels"],
            "input_size": model["size"],
        }
    )


def speed_options(args):
    """The precision and memory format trainkit trains this model with (train.precision and
    train.channels_last from --trainkit-args, else `auto` resolved by trainkit's own rule), so
    that the limits run the very step trainkit runs."""
    import torch

    from trainkit.config import TrainConfig
    from trainkit.runtime import resolve_speed_options

    chosen = {}
    for item in args.trainkit_args.split():
        key, _, value = item.partition("=")
        if key == "train.precision":
            chosen["precision"] = value
        elif key == "train.channels_last":
            chosen["channels_last"] = (
                value if value == "auto" else value.lower() in ("true", "1", "yes", "on")
            )
    device = torch.device("cuda" if args.device.startswith("cuda") else args.device)
    return resolve_speed_options(TrainConfig(**chosen), MODELS[args.model]["name"], device)[0]


def limit_optimizer(model):
    """configs/cifar10.yaml's SGD with the implementation trainkit picks (the fused kernel where
    torch has one): every limit runs the same update as trainkit, not torch's slower default."""
    import torch

    from trainkit.optim import fast_implementation

    kwargs = {"lr": 0.01, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}
    implementation = fast_implementation(torch.optim.SGD, kwargs, model)
    return torch.optim.SGD(model.parameters(), **kwargs, **implementation)


def limit_step(args, model, optimizer):
    """step(x, y): forward, loss, backward, optimizer step, with trainkit's options."""
    import torch

    options = speed_options(args)
    if options.channels_last:  # the batch stays (B, C, H, W) as in trainkit: only the model changes
        model.to(memory_format=torch.channels_last)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(options.precision)
    device_type = "cuda" if args.device.startswith("cuda") else "cpu"
    return train_step(model, optimizer, device_type, dtype)


def train_step(forward, optimizer, device_type: str = "cpu", dtype=None):
    """step(x, y): forward (under autocast to `dtype` when given), cross-entropy, backward,
    optimizer step: the one step every limit and option measurement times."""
    from contextlib import nullcontext

    import torch

    def step(x, y):
        with torch.autocast(device_type, dtype=dtype) if dtype else nullcontext():
            logits = forward(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def normalization(args) -> tuple[tuple[float, ...], tuple[float, ...]]:
    channels = MODELS[args.model]["channels"]
    return MEAN[:channels], STD[:channels]


def peak_memory_mb() -> dict:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_mb": round(own, 1), "peak_workers_mb": round(children, 1)}


class ArrayImages:
    """Per-image PIL dataset over uint8 arrays, as torchvision's CIFAR10 class does."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        from PIL import Image

        pixels = self.images[index].permute(1, 2, 0).numpy()  # (H, W, C)
        image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
        return self.transform(image), int(self.labels[index])


def per_image_datasets(args):
    """(train, test) datasets with the tutorial's per-image pipeline."""
    import torchvision.transforms as T

    model = MODELS[args.model]
    steps = [T.Grayscale()] if model["channels"] == 1 else []
    steps += [T.Resize((model["size"], model["size"]))] if model["size"] != 32 else []
    transform = T.Compose(steps + [T.ToTensor(), T.Normalize(*normalization(args))])
    if args.data:
        from torchvision.datasets import ImageFolder

        return (
            ImageFolder(os.path.join(args.data, "train"), transform),
            ImageFolder(os.path.join(args.data, "test"), transform),
        )
    from trainkit.data.synthetic import make_synthetic

    train = make_synthetic(args.synthetic_size, "train", model["size"], model["channels"])
    test = make_synthetic(2000, "test", model["size"], model["channels"])
    transform = T.Compose([T.ToTensor(), T.Normalize(*normalization(args))])  # already sized
    return ArrayImages(*train, transform), ArrayImages(*test, transform)


def test_accuracy(model, test_set, device) -> float:
    import torch
    from torch.utils.data import DataLoader

    model.eval()
    correct = total = 0
    with torch.inference_mode():
        for x, y in DataLoader(test_set, batch_size=1000, num_workers=2):
            correct += int((model(x.to(device)).argmax(1).cpu() == y).sum())
            total += len(y)
    model.train()
    return correct / total


# ----------------------------------------------------------------------------- contestants


def run_tutorial(args) -> dict:
    """The classic loop. Throughput over --seconds; with --data, epochs until --target."""
    import torch
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    train, test = per_image_datasets(args)
    model = build_bench_model(args).to(args.device)
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    loader = DataLoader(train, batch_size=4, shuffle=True, num_workers=2)
    seen, train_seconds, result = 0, 0.0, {}
    budget = args.max_seconds if args.data else args.seconds
    for epoch in range(100):
        began = time.perf_counter()
        for x, y in loader:
            x, y = x.to(args.device), y.to(args.device)
            optimizer.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
            seen += len(y)
            if not args.data and time.perf_counter() - began > budget:
                break
            if args.data and train_seconds + time.perf_counter() - began > budget:
                break
        train_seconds += time.perf_counter() - began
        result["images_per_s"] = seen / train_seconds
        if not args.data:
            break
        accuracy = test_accuracy(model, test, args.device)
        result.update(epochs=epoch + 1, test_accuracy=accuracy)
        if accuracy >= args.target:
            result["seconds_to_target"] = train_seconds
            break
        if train_seconds >= budget:
            break
    return result


def run_lightning(args) -> dict:
    import pytorch_lightning as pl
    import torch
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    train, _ = per_image_datasets(args)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = build_bench_model(args)

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    class Clock(pl.Callback):
        def __init__(self):
            self.start, self.seen = None, 0

        def on_train_batch_end(self, trainer, module, outputs, batch, index):
            if self.start is None and index == 5:  # after warm-up (workers started)
                self.start, self.seen = time.perf_counter(), 0
            elif self.start is not None:
                self.seen += len(batch[1])
                if time.perf_counter() - self.start > args.seconds:
                    trainer.should_stop = True

    clock = Clock()
    loader = DataLoader(
        train, batch_size=args.batch_size, shuffle=True, num_workers=2, persistent_workers=True
    )
    accelerator = "gpu" if args.device.startswith("cuda") else "cpu"
    trainer = pl.Trainer(
        max_epochs=100,
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
    )
    trainer.fit(Module(), loader)
    return {"images_per_s": clock.seen / (time.perf_counter() - clock.start)}


def run_gather_limit(args) -> dict:
    """The compute limit's step plus the cheapest possible data path: each step gathers a
    random batch (one shuffle per epoch) from the whole split as a uint8 (N, C, H, W) tensor
    with index_select, then converts it to float and normalises it, with no augmentation.
    Throughput does not depend on pixel values, so with --data the tensor is the synthetic
    task at the data's size (CIFAR-10: 50,000 images)."""
    import torch

    from trainkit.data.synthetic import make_synthetic

    torch.manual_seed(0)
    shape = MODELS[args.model]
    size = 50_000 if args.data else args.synthetic_size
    images, labels = make_synthetic(size, "train", shape["size"], shape["channels"])
    images, labels = images.to(args.device), labels.to(args.device)  # (N, C, H, W) uint8, (N,)
    mean, std = normalization(args)
    shift = torch.tensor(mean, device=args.device).view(1, -1, 1, 1) * 255
    scale = 1 / (torch.tensor(std, device=args.device).view(1, -1, 1, 1) * 255)
    model = build_bench_model(args).to(args.device)
    optimizer = limit_optimizer(model)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    batches = size // args.batch_size

    def batches_forever():
        while True:
            order = torch.randperm(size, device=args.device)
            for i in range(batches):
                yield order[i * args.batch_size : (i + 1) * args.batch_size]

    train_step = limit_step(args, model, optimizer)

    def step(index):
        x = images.index_select(0, index).float().sub_(shift).mul_(scale)  # (B, C, H, W)
        train_step(x, labels.index_select(0, index))

    indices = batches_forever()
    for _ in range(20):
        step(next(indices))
    sync()
    steps, began = 0, time.perf_counter()
    while time.perf_counter() - began < args.seconds:
        step(next(indices))
        steps += 1
    sync()
    return {"images_per_s": steps * args.batch_size / (time.perf_counter() - began)}


def run_compute_limit(args) -> dict:
    import torch

    torch.manual_seed(0)
    model = build_bench_model(args).to(args.device)
    optimizer = limit_optimizer(model)
    train, _ = per_image_datasets(args)  # one real batch of the same images, preprocessed
    pairs = [train[i] for i in range(args.batch_size)]
    x = torch.stack([image for image, _ in pairs]).to(args.device)
    y = torch.tensor([label for _, label in pairs]).to(args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    step = limit_step(args, model, optimizer)
    for _ in range(20):
        step(x, y)
    sync()
    steps, began = 0, time.perf_counter()
    while time.perf_counter() - began < args.seconds:
        step(x, y)
        steps += 1
    sync()
    return {"images_per_s": steps * args.batch_size / (time.perf_counter() - began)}


def trainkit_command(args, out_dir: Path, extra: list[str]) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "trainkit",
        "train",
        str(ROOT / "configs" / "cifar10.yaml"),
        f"run.out_dir={out_dir}",
        "log.progress=plain",
        "log.tensorboard=false",
        f"data.batch_size={args.batch_size}",
        f"train.device={args.device}",
        f"model.name={MODELS[args.model]['name']}",
        *MODELS[args.model]["overrides"],
    ]
    if args.data:
        command += ["data.name=imagefolder", f"data.root={args.data}"]
        if args.model != "lenet":  # the model's shape, as the other contestants resize
            model = MODELS[args.model]
            command += [f"data.image_size={model['size']}", f"data.channels={model['channels']}"]
    else:
        command += [
            "data.name=synthetic",
            f"data.synthetic.train_size={args.synthetic_size}",
            "data.synthetic.test_size=2000",
            f"data.synthetic.image_size={MODELS[args.model]['size']}",
            f"data.synthetic.channels={MODELS[args.model]['channels']}",
        ]
    return command + extra + args.trainkit_args.split()


def run_trainkit(args) -> dict:
    """The real CLI (its own process) with configs/cifar10.yaml; figures from metrics.csv."""
    out = Path(tempfile.mkdtemp(prefix="bench-trainkit-"))
    extra = [f"train.epochs={args.trainkit_epochs or (15 if args.data else 3)}"]
    done = subprocess.run(trainkit_command(args, out, extra), capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr.strip().splitlines()[-1])
    rows = list(csv.DictReader(open(next(out.glob("*/metrics.csv")))))
    warm = rows[1:] or rows  # the first epoch includes warm-up
    result = {
        "images_per_s": statistics.mean(float(r["images_per_s"]) for r in warm),
        "checkpoint": str(next(out.glob("*/checkpoints/best.pt"))),
    }
    if args.data:
        elapsed = 0.0
        for row in rows:
            elapsed += float(row["epoch_seconds"])
            if "seconds_to_target" not in result and float(row["val_accuracy"]) >= args.target:
                result.update(seconds_to_target=elapsed, epochs_to_target=int(row["epoch"]))
        result.update(test_accuracy=float(rows[-1]["val_accuracy"]), epochs=len(rows), train_seconds=elapsed)
    result.update(
        peak_memory_mb_child=round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    )
    return result


# ----------------------------------------------------------------------------- eval and predict


def prediction_folder(args) -> Path:
    """--data: its test/ folder (CIFAR-10: 10,000 JPEGs); else 10,000 synthetic PNGs, made once."""
    if args.data:
        return Path(args.data) / "test"
    from PIL import Image

    from trainkit.data.synthetic import make_synthetic

    shape = MODELS[args.model]
    folder = Path(tempfile.gettempdir()) / f"bench-predict-{shape['channels']}x{shape['size']}-10000"
    if not (folder / "done").exists():
        folder.mkdir(exist_ok=True)
        images, labels = make_synthetic(10_000, "test", shape["size"], shape["channels"])
        for i, (pixels, label) in enumerate(zip(images, labels)):
            array = pixels.permute(1, 2, 0).numpy()  # (H, W, C)
            Image.fromarray(array[:, :, 0] if shape["channels"] == 1 else array).save(
                folder / f"{i:05d}_{label}.png"
            )
        (folder / "done").write_text("")
    return folder


def image_paths(folder: Path) -> list[Path]:
    """The folder's images, each read once first: both contestants decode from the page cache,
    whichever runs first (a cold disk is not what either of them is measured on)."""
    from trainkit.data.preprocess import image_files

    paths = [Path(path) for path, _, _ in image_files(str(folder))]
    for path in paths:
        path.read_bytes()
    return paths


def run_eval(args) -> dict:
    """`trainkit eval` as the Python API runs it (torch imported, a second call timed): load the
    checkpoint and its split (decoded cache / regenerated), then score it."""
    import trainkit

    trainkit.evaluate(args.checkpoint, device=args.device)  # warm: first loads, caches
    began = time.perf_counter()
    result = trainkit.evaluate(args.checkpoint, device=args.device)
    seconds = time.perf_counter() - began
    return {"images_per_s": result["num_samples"] / seconds, "images": result["num_samples"]}


def run_inference_limit(args) -> dict:
    """The model's forward alone on in-memory, preprocessed batches of the eval batch size."""
    import torch

    model = build_bench_model(args).to(args.device).eval()
    shape = MODELS[args.model]
    x = torch.randn(1024, shape["channels"], shape["size"], shape["size"], device=args.device)
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        steps, began = 0, time.perf_counter()
        while time.perf_counter() - began < args.seconds:
            model(x).argmax(1).tolist()
            steps += 1
    return {"images_per_s": steps * 1024 / (time.perf_counter() - began)}


def run_predict(args) -> dict:
    """`trainkit predict FOLDER -c CKPT --out preds.csv` (the real command), its marginal rate:
    (N - 1) images / (its wall time - the same command's on one image)."""
    folder = prediction_folder(args)
    one = image_paths(folder)[0]
    out = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    base = [sys.executable, "-m", "trainkit", "predict", "-c", args.checkpoint, "--device", args.device]
    single = median_seconds(base + [str(one), "--out", str(out / "one.csv")], 3)
    began = time.perf_counter()
    done = subprocess.run(base + [str(folder), "--out", str(out / "all.csv")], capture_output=True, text=True)
    seconds = time.perf_counter() - began
    if done.returncode:
        raise RuntimeError(done.stderr.strip().splitlines()[-1])
    count = sum(1 for _ in open(out / "all.csv")) - 1
    return {"images_per_s": (count - 1) / (seconds - single), "images": count, "one_image_s": single}


def run_decode_limit(args) -> dict:
    """The floor under predict in one process: PIL decodes each file (Image.open + convert, as
    any loader must), the batch is stacked, normalised and run through the model; nothing else."""
    import numpy as np
    import torch
    from PIL import Image

    paths = image_paths(prediction_folder(args))
    model = build_bench_model(args).to(args.device).eval()
    shape = MODELS[args.model]
    mode = "L" if shape["channels"] == 1 else "RGB"
    began = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(paths), 256):
            arrays = []
            for path in paths[start : start + 256]:
                with Image.open(path) as image:
                    image = image.convert(mode)
                    if image.size != (shape["size"], shape["size"]):
                        image = image.resize((shape["size"], shape["size"]), Image.BILINEAR)
                    arrays.append(np.asarray(image))
            batch = torch.from_numpy(np.stack(arrays)).to(args.device)  # (b, H, W[, C]) uint8
            batch = batch.view(len(arrays), shape["size"], shape["size"], -1).permute(0, 3, 1, 2)
            model(batch.float().div_(255).sub_(0.5).div_(0.5)).softmax(1).topk(1)
    return {"images_per_s": len(paths) / (time.perf_counter() - began)}


CONTESTANTS = {
    "trainkit": run_trainkit,
    "tutorial": run_tutorial,
    "lightning": run_lightning,
    "compute_limit": run_compute_limit,
    "gather_limit": run_gather_limit,
    "eval": run_eval,
    "inference_limit": run_inference_limit,
    "predict": run_predict,
    "decode_limit": run_decode_limit,
}
NEEDS_CHECKPOINT = {"eval", "predict"}


# ----------------------------------------------------------------------------- start-up


def median_seconds(command: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        subprocess.run(command, capture_output=True, check=False)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def startup_figures(checkpoint: str) -> dict:
    from PIL import Image

    image = Path(tempfile.mkdtemp()) / "one.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    trainkit = [sys.executable, "-m", "trainkit"]
    help_s = median_seconds([str(Path(sys.executable).parent / "trainkit"), "--help"], 5)
    predict_s = median_seconds(trainkit + ["predict", str(image), "-c", checkpoint], 5)
    imports_s = median_seconds([sys.executable, "-c", "import torch, torchvision"], 5)
    return {
        "help_s": help_s,
        "predict_s": predict_s,
        "import_torch_torchvision_s": imports_s,
        "predict_over_import": predict_s / imports_s,
    }


FLOOR = """
import torch
model = torch.nn.Linear(2, 2)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
model(torch.randn(4, 2)).sum().backward()
optimizer.step()
print("first training step", flush=True)
"""


def seconds_to_first_step(command: list[str]) -> tuple[float, str]:
    """Wall seconds from launch to the "first training step" line, and the output before it."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    began, seen = time.perf_counter(), []
    for line in process.stdout:
        if line.startswith("first training step"):
            seconds = time.perf_counter() - began
            process.kill()
            process.wait()
            return seconds, "".join(seen)
        seen.append(line)
    process.wait()
    raise SystemExit(f"no first training step in: {command}")


def cache_figures(args) -> dict:
    """Time to the first training step: first run (decodes) vs second run (decoded cache).

    Also the floor under both: a bare script that imports torch and takes one torch.optim step
    (torch 2.15 imports torch._dynamo when an optimizer is built), and trainkit's own figure for
    the data preparation alone ("ready in" on its data line).
    """
    cache_dir = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    runs = []
    for _ in range(2):
        out = Path(tempfile.mkdtemp(prefix="bench-first-"))
        command = trainkit_command(args, out, ["train.epochs=1", f"data.cache_dir={cache_dir}"])
        seconds, output = seconds_to_first_step(command)
        ready = re.search(r"ready in ([0-9.]+) s", output)
        runs.append((seconds, float(ready.group(1)) if ready else float("nan")))
    floor, _ = seconds_to_first_step([sys.executable, "-c", FLOOR])
    (first, first_data), (second, second_data) = runs
    return {
        "first_step_first_run_s": first,
        "first_step_second_run_s": second,
        "cache_speedup": first / second,
        "data_ready_first_run_s": first_data,
        "data_ready_second_run_s": second_data,
        "data_speedup": first_data / second_data,
        "torch_optim_floor_s": floor,
        "speedup_bound": first / floor,
    }


# ----------------------------------------------------------------------------- driver


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    result = CONTESTANTS[args.worker](args)
    result.update(peak_memory_mb())
    print("RESULT " + json.dumps(result), flush=True)


RATIOS = [  # (numerator, denominator, what it says)
    ("trainkit", "tutorial", ""),
    ("trainkit", "lightning", ""),
    ("trainkit", "compute_limit", "the fixed-batch limit"),
    ("trainkit", "gather_limit", "the honest limit: any in-memory loop pays the gather"),
    ("gather_limit", "compute_limit", "what any in-memory loop pays for its data"),
    ("eval", "inference_limit", "forward alone on in-memory batches"),
    ("predict", "decode_limit", "PIL decode + forward in one process"),
]


def worker_command(args, name: str, checkpoint: str | None) -> list[str]:
    command = [sys.executable, __file__, "--worker", name, "--model", args.model]
    for flag in ("batch_size", "seconds", "target", "max_seconds", "synthetic_size", "threads", "device"):
        command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    command += [f"--trainkit-args={args.trainkit_args}"]
    command += ["--trainkit-epochs", str(args.trainkit_epochs)] if args.trainkit_epochs else []
    command += ["--data", args.data] if args.data else []
    command += ["--checkpoint", checkpoint] if checkpoint else []
    return command


def run_worker(args, name: str, checkpoint: str | None) -> dict | None:
    done = subprocess.run(worker_command(args, name, checkpoint), capture_output=True, text=True)
    line = next((out for out in done.stdout.splitlines() if out.startswith("RESULT ")), None)
    if line is None:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"  {name} failed: {tail}", file=sys.stderr)
        return None
    return json.loads(line[len("RESULT ") :])


def checkpoint_for(args, results: dict) -> str:
    """eval and predict score a trainkit checkpoint: --checkpoint, this run's, or a 1-epoch one."""
    if args.checkpoint:
        return args.checkpoint
    if results.get("trainkit"):
        return results["trainkit"][0]["checkpoint"]
    out = Path(tempfile.mkdtemp(prefix="bench-checkpoint-"))
    subprocess.run(trainkit_command(args, out, ["train.epochs=1"]), capture_output=True, check=True)
    return str(next(out.glob("*/checkpoints/best.pt")))


def median_result(runs: list[dict]) -> dict:
    """Each numeric figure's median over the rounds (the other fields from the first round)."""
    merged = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            merged[key] = statistics.median(r[key] for r in runs if key in r)
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="ImageFolder root with train/ and test/ (default: synthetic)")
    parser.add_argument(
        "--model", choices=list(MODELS), default="lenet", help="the model every contestant trains"
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=20, help="throughput window per contestant")
    parser.add_argument("--rounds", type=int, default=1, help="run the contestants in turn this many times")
    parser.add_argument("--target", type=float, default=0.54, help="test accuracy for time-to-target")
    parser.add_argument(
        "--max-seconds", type=float, default=400, help="cap for the tutorial's time to target"
    )
    parser.add_argument("--trainkit-epochs", type=int, help="default: 15 with --data, else 3")
    parser.add_argument("--trainkit-args", default="", help="extra overrides, e.g. 'train.compile=true'")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (every contestant)")
    parser.add_argument("--synthetic-size", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--only", nargs="*", choices=list(CONTESTANTS), default=list(CONTESTANTS))
    parser.add_argument("--checkpoint", help="eval/predict: score this checkpoint (default: trainkit's)")
    parser.add_argument("--no-startup", action="store_true", help="skip the CLI start-up and cache timings")
    parser.add_argument("--worker", choices=list(CONTESTANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    results: dict[str, list[dict]] = {}
    checkpoint = None
    for round_index in range(args.rounds):
        for name in args.only:
            if name in NEEDS_CHECKPOINT and checkpoint is None:
                checkpoint = checkpoint_for(args, results)
            print(f"round {round_index + 1}/{args.rounds}: running {name}…", file=sys.stderr, flush=True)
            result = run_worker(args, name, checkpoint if name in NEEDS_CHECKPOINT else None)
            if result is not None:
                results.setdefault(name, []).append(result)
    report(args, results)


def report(args, results: dict[str, list[dict]]) -> None:
    model = MODELS[args.model]
    options = speed_options(args)
    print(
        f"\n{model['name']} at {model['channels']}x{model['size']}x{model['size']}, batch {args.batch_size} "
        f"(tutorial: batch 4), device {args.device}, {args.threads} threads, "
        f"{'bf16' if options.precision == 'bf16' else 'float32'}"
        f"{', channels_last' if options.channels_last else ''} (trainkit and the limits), "
        f"data: {args.data or f'synthetic {args.synthetic_size} images'}, {args.rounds} round(s), "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n"
    )
    medians = {name: median_result(runs) for name, runs in results.items()}
    print(f"{'contestant':<16}{'images/s':>10}{'peak MB':>10}{'to target':>12}{'final acc':>11}")
    for name, r in medians.items():
        peak = r.get("peak_memory_mb_child") or r["peak_mb"]
        target = f"{r['seconds_to_target']:.1f} s" if "seconds_to_target" in r else "-"
        accuracy = f"{100 * r['test_accuracy']:.2f}%" if "test_accuracy" in r else "-"
        print(f"{name:<16}{r['images_per_s']:>10,.0f}{peak:>10,.0f}{target:>12}{accuracy:>11}")
    print()
    for top, bottom, meaning in RATIOS:
        if top in results and bottom in results:
            pairs = zip(results[top], results[bottom])
            ratio = statistics.median(a["images_per_s"] / b["images_per_s"] for a, b in pairs)
            note = f"  ({meaning})" if meaning else ""
            print(f"{top} / {bottom:<16} {ratio:6.2f} x{note}  (median of per-round ratios)")
    trainkit = medians.get("trainkit")
    if trainkit and "seconds_to_target" in trainkit and "tutorial" in medians:
        tutorial = medians["tutorial"].get("seconds_to_target")
        if tutorial:
            ratio = trainkit["seconds_to_target"] / tutorial
            print(f"time to {100 * args.target:.0f}%: trainkit / tutorial {ratio:6.3f}")
    if args.no_startup or not trainkit:
        return
    startup_report(args, trainkit)


def startup_report(args, trainkit: dict) -> None:
    startup = startup_figures(trainkit["checkpoint"])
    print(
        f"\nstart-up: trainkit --help {startup['help_s']:.2f} s; trainkit predict one.png "
        f"{startup['predict_s']:.2f} s; python -c 'import torch, torchvision' "
        f"{startup['import_torch_torchvision_s']:.2f} s; predict / import "
        f"{startup['predict_over_import']:.2f}"
    )
    if args.data:
        cache = cache_figures(args)
        print(
            f"first training step: first run {cache['first_step_first_run_s']:.1f} s, second "
            f"run {cache['first_step_second_run_s']:.1f} s ({cache['cache_speedup']:.1f}x sooner); "
            f"data ready in {cache['data_ready_first_run_s']:.1f} s vs "
            f"{cache['data_ready_second_run_s']:.2f} s ({cache['data_speedup']:.0f}x)"
        )
        print(
            f"floor: import torch + one torch.optim step {cache['torch_optim_floor_s']:.1f} s, "
            f"so no torch.optim trainer can be more than {cache['speedup_bound']:.1f}x sooner"
        )


if __name__ == "__main__":
    main()
