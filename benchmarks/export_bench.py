"""CPU inference side by side: the trainkit checkpoint (PyTorch eager) vs ONNX Runtime vs TorchScript.

    python benchmarks/export_bench.py                               # random ResNet-18, 32x32, 10 classes
    python benchmarks/export_bench.py runs/x/checkpoints/best.pt    # a trained checkpoint
    python benchmarks/export_bench.py --model lenet --image-size 32 --threads 2 --seconds 2

Exports the checkpoint with `trainkit export` (ONNX and TorchScript, each parity-checked), then
times, in one process and with the same thread count for every runtime, what `trainkit predict`
does after decoding: uint8 images → normalise → model → logits. Latency is one image per call
(median and p90 over calls); throughput is batches of 64 (images/s). The runtimes take turns in
--rounds rounds so that a burst of load on a shared machine hits all of them; the best round of
each is reported. Needs the export extra: pip install -e ".[export]".
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trainkit.checkpoint import FORMAT_VERSION, save_checkpoint  # noqa: E402
from trainkit.data.preprocess import IMAGENET_STATS, Preprocess  # noqa: E402
from trainkit.export import load_exported, onnx_classifier, run_export  # noqa: E402
from trainkit.models import build_model  # noqa: E402
from trainkit.predict import load_classifier  # noqa: E402


def random_checkpoint(folder: Path, model: str, image_size: int, classes: int) -> Path:
    """A checkpoint with random weights: speed does not depend on the weights' values."""
    spec = {"name": model, "num_classes": classes, "in_channels": 3, "input_size": image_size}
    torch.manual_seed(0)
    network = build_model(spec).eval()
    preprocess = Preprocess(3, image_size, *IMAGENET_STATS)
    state = {
        "format_version": FORMAT_VERSION,
        "model": network.state_dict(),
        "model_spec": spec,
        "preprocess": preprocess.to_dict(),
        "classes": [f"class_{i}" for i in range(classes)],
        "config": {},  # no data to find: the parity check uses generated images
    }
    path = folder / "best.pt"
    save_checkpoint(state, path)
    return path


def time_calls(run, images: torch.Tensor, seconds: float) -> list[float]:
    """Seconds per call, calling for about `seconds` (after two warm-up calls)."""
    run(images)
    run(images)
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 3:
        start = time.perf_counter()
        run(images)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", help="a trainkit checkpoint (default: a random model)")
    parser.add_argument("--model", default="torchvision.resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=2.0, help="per runtime, per measure, per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.checkpoint:
            checkpoint = folder / "best.pt"
            checkpoint.write_bytes(Path(args.checkpoint).read_bytes())  # exports go next to it
        else:
            checkpoint = random_checkpoint(folder, args.model, args.image_size, args.classes)
        files = {"checkpoint": checkpoint}
        for fmt in ("onnx", "torchscript"):
            result = run_export(str(checkpoint), fmt, num_images=16)
            print(
                f"{fmt}: parity max abs logit difference {result.max_abs_diff:.3g}, "
                f"top-1 agreement {result.agree}/{result.count}",
                file=sys.stderr,
            )
            files[fmt] = result.path
        runtimes = {
            "checkpoint (PyTorch eager)": load_classifier(checkpoint, "cpu"),
            "ONNX Runtime": onnx_classifier(files["onnx"], threads=args.threads),
            "TorchScript": load_exported("torchscript", files["torchscript"]),
        }
        sizes = dict(zip(runtimes, (p.stat().st_size / 1e6 for p in files.values())))
        preprocess = next(iter(runtimes.values())).preprocess
        shape = (preprocess.channels, preprocess.image_size, preprocess.image_size)
        one = torch.randint(0, 256, (1, *shape), dtype=torch.uint8)
        batch = torch.randint(0, 256, (args.batch, *shape), dtype=torch.uint8)

        best: dict[str, dict[str, float]] = {name: {} for name in runtimes}
        for _ in range(args.rounds):
            for name, classifier in runtimes.items():
                with torch.inference_mode():
                    single = time_calls(classifier, one, args.seconds)
                    many = time_calls(classifier, batch, args.seconds)
                median = statistics.median(single)
                p90 = statistics.quantiles(single, n=10)[-1] if len(single) >= 10 else max(single)
                throughput = args.batch / statistics.median(many)
                record = best[name]
                if not record or median < record["median"]:
                    record.update(median=median, p90=p90)
                record["throughput"] = max(record.get("throughput", 0.0), throughput)

    spec = f"{args.checkpoint or args.model} at {shape[1]}x{shape[2]}"
    print(f"\n{spec}, CPU, {args.threads} threads, torch {torch.__version__}, best of {args.rounds} rounds\n")
    print(
        "| runtime | file MB | latency, 1 image (ms, median / p90) "
        f"| throughput, batch {args.batch} (images/s) |"
    )
    print("|---|---:|---:|---:|")
    base = best["checkpoint (PyTorch eager)"]
    for name, record in best.items():
        speedup = record["throughput"] / base["throughput"]
        print(
            f"| {name} | {sizes[name]:.1f} | {1e3 * record['median']:.2f} / {1e3 * record['p90']:.2f} | "
            f"{record['throughput']:,.0f} ({speedup:.2f}x) |"
        )


if __name__ == "__main__":
    main()
