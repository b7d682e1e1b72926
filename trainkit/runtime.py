"""Where and how a run executes: device choice, seeding and RNG state, DataParallel / DDP."""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
from torch import nn

from trainkit.errors import ConfigError, TrainkitError


@dataclass(frozen=True)
class Placement:
    device: torch.device
    parallel: str  # "none" | "dp" | "ddp"
    device_ids: list[int] | None = None  # DataParallel GPUs
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_main_process() -> bool:
    """Rank 0, or no launcher at all; before the process group exists, torchrun's RANK says."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def pick_device(name: str) -> torch.device:
    """--device of eval/predict: an unknown name is a usage error (exit 2), a device this
    machine lacks a runtime one (exit 1), each saying so rather than failing later."""
    text = name.strip().lower()
    if text == "auto":
        return _auto_device()
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise TrainkitError("MPS is not available on this machine (use --device cpu)")
        return torch.device("mps")
    if text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit()):
        if not torch.cuda.is_available():
            raise TrainkitError("CUDA is not available on this machine (use --device cpu)")
        if ":" in text and int(text[5:]) >= torch.cuda.device_count():
            raise TrainkitError(f"{text} does not exist ({torch.cuda.device_count()} GPUs)")
        return torch.device(text)
    raise ConfigError("--device", f"unknown device '{name}'; choices: auto, cpu, cuda, cuda:N, mps")


def _auto_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _check_cuda(index: int | None) -> None:
    if not torch.cuda.is_available():
        raise ConfigError("train.device", "CUDA is not available on this machine (try auto or cpu)")
    if index is not None and index >= torch.cuda.device_count():
        raise ConfigError("train.device", f"cuda:{index} does not exist ({torch.cuda.device_count()} GPUs)")


def first_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist: 'gpu[07-09,12],cpu1' → 'gpu07'."""
    depth, end = 0, len(nodelist)
    for i, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = i
            break
    first = nodelist[:end]
    if "[" not in first:
        return first
    prefix, rest = first.split("[", 1)
    ranges, suffix = rest.split("]", 1)
    return prefix + ranges.split(",")[0].split("-")[0] + suffix


def slurm_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """Tasks started by `srun` (one per GPU) become DDP ranks: SLURM's task ids mapped to the
    variables torch.distributed reads (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). Only
    under srun (SLURM_STEP_NUM_TASKS is set for job steps), and never over torchrun's: → {}.
    The environment itself is left alone."""
    tasks = int(environ.get("SLURM_STEP_NUM_TASKS", "1") or 1)
    if "RANK" in environ or tasks <= 1 or "SLURM_PROCID" not in environ:
        return {}
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or "127.0.0.1"
    port = str(20000 + int(environ.get("SLURM_JOB_ID", "0") or 0) % 20000)
    return {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": str(tasks),
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": environ.get("MASTER_ADDR") or first_host(nodelist),
        "MASTER_PORT": environ.get("MASTER_PORT") or port,
    }


def resolve_placement(device: Any, parallel: str) -> Placement:
    """Map train.device / train.parallel (and torchrun's or srun's environment) to a Placement."""
    slurm = slurm_environment(os.environ) if parallel in ("auto", "ddp") else {}
    environ = {**os.environ, **slurm}
    world = int(environ.get("WORLD_SIZE", "1"))
    if parallel == "ddp" or (parallel == "auto" and world > 1):
        return _ddp_placement(device, environ, from_slurm=bool(slurm))
    if isinstance(device, list) or parallel == "dp":
        ids = device if isinstance(device, list) else list(range(torch.cuda.device_count()))
        for index in ids:
            _check_cuda(index)
        if not ids:
            raise ConfigError("train.parallel", "dp needs CUDA GPUs")
        return Placement(torch.device(f"cuda:{ids[0]}"), "dp" if len(ids) > 1 else "none", ids)
    if device == "auto":
        return Placement(_auto_device(), "none")
    if device.startswith("cuda"):
        _check_cuda(int(device[5:]) if ":" in device else None)
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("train.device", "MPS is not available on this machine")
    return Placement(torch.device(device), "none")


def _ddp_placement(device: Any, environ: Mapping[str, str], from_slurm: bool) -> Placement:
    rank, world = int(environ.get("RANK", "0")), int(environ.get("WORLD_SIZE", "1"))
    local_rank = int(environ.get("LOCAL_RANK", "0"))
    if world <= 1 and "MASTER_ADDR" not in environ:
        raise ConfigError("train.parallel", "ddp needs a launcher: use --nproc N or torchrun")
    use_cuda = device != "cpu" and torch.cuda.is_available()
    target = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(target)
    if not torch.distributed.is_initialized():
        # Collectives that wait longer than this fail, so a rank lost on another node ends the
        # run instead of hanging it (on one node torchrun already stops the others at once).
        timeout = timedelta(seconds=float(environ.get("TRAINKIT_DIST_TIMEOUT", "60")))
        backend = "nccl" if use_cuda else "gloo"
        if from_slurm:  # the rendezvous named explicitly: the environment was not rewritten
            address = f"tcp://{environ['MASTER_ADDR']}:{environ['MASTER_PORT']}"
            torch.distributed.init_process_group(
                backend=backend, init_method=address, rank=rank, world_size=world, timeout=timeout
            )
        else:  # torchrun's env:// (and its agent's store)
            torch.distributed.init_process_group(backend=backend, timeout=timeout)
    return Placement(target, "ddp", None, rank, world, local_rank)


@contextmanager
def local_main_first(placement: Placement):
    """Local rank 0 of each node runs the block first (downloads, decoding into the tensor
    cache); the node's other ranks wait, then find the files ready instead of racing for them.
    The wait is a gloo barrier with a long timeout of its own: decoding may take many minutes."""
    if placement.parallel != "ddp":
        yield
        return
    seconds = float(os.environ.get("TRAINKIT_PREPARE_TIMEOUT", "7200"))
    group = torch.distributed.new_group(backend="gloo", timeout=timedelta(seconds=seconds))
    if placement.local_rank != 0:
        torch.distributed.barrier(group=group)
    yield
    if placement.local_rank == 0:
        torch.distributed.barrier(group=group)
    torch.distributed.destroy_process_group(group)


def shutdown_distributed() -> None:
    """Tear the process group down before exit: left to the interpreter's exit, gloo's threads
    can abort the process ("terminate called without an active exception") after a good run."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def wrap_model(model: nn.Module, placement: Placement) -> nn.Module:
    if placement.parallel == "dp":
        return nn.DataParallel(model, device_ids=placement.device_ids)
    if placement.parallel == "ddp":
        ids = [placement.device.index] if placement.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return getattr(model, "_orig_mod", model)  # torch.compile wrapper


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """All global RNG states as tensors and primitives (weights_only-loadable)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *map(float, np_state[2:])],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    version, seq, *rest = state["python"]
    random.setstate((version, tuple(seq), *rest))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# What `train.precision: auto` and `train.channels_last: auto` turn on, by model, when training on
# the CPU: only what was measured faster there by more than 10 % (benchmarks/cpu_options.py: a
# 2-core AMD EPYC with AVX-512 BF16, torch 2.14, batch 128; the step's images/s vs float32) at
# the same accuracy (benchmarks/README.md). Elsewhere, and for other models, auto means float32
# and the default memory format: nothing here was measured on GPUs yet.
CPU_SPEED_DEFAULTS: dict[str, dict[str, bool]] = {
    "lenet": {"channels_last": True},  # 1.16-1.34x; bf16 0.68-0.88x
    # bf16 was 1.78x faster but learned slower: 16.8 % vs 31.9 % validation accuracy after 4
    # epochs on a 10,000-image CIFAR-10 subset (train loss 2.28 vs 1.87), so float32 stays
    "alexnet": {"channels_last": True},  # 1.09-1.15x (a layout: what is learned is the same)
    "mlp": {"bf16": True},  # 1.31-1.41x; channels_last does nothing to Linear layers
    # bf16 1.58-1.70x; channels_last on top: 1.10-1.13x on one batch but 1.01-1.06x end to end
    "torchvision.resnet18": {"bf16": True},
}


def cpu_has_native_bf16() -> bool:
    """bf16 matrix instructions (AVX-512 BF16 / AMX): without them bf16 is emulated and slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_speed_options(train, model_name: str, device: torch.device, resumed: dict | None = None):
    """The train section with `auto` precision and channels_last made concrete for this model
    and device (a copy: the config itself keeps `auto`). One home of the rule. `resumed`: what
    the run being resumed chose (its checkpoint's "train_options"); a resume keeps that, as it
    keeps every other setting, even where this machine would choose otherwise (a CPU without
    bf16 instructions emulates it: slower, but the same arithmetic).
    → (the train section, a note for each `auto` kept against this machine's choice)."""
    measured = CPU_SPEED_DEFAULTS.get(model_name, {}) if device.type == "cpu" else {}
    chosen = {
        "precision": "bf16" if measured.get("bf16") and cpu_has_native_bf16() else "32",
        "channels_last": bool(measured.get("channels_last")),
    }
    update: dict[str, Any] = {}
    notes: list[str] = []
    for key, mine in chosen.items():
        if getattr(train, key) != "auto":
            continue
        kept = resumed.get(key) if isinstance(resumed, dict) else None  # from a checkpoint: any type
        valid = kept in ("32", "bf16", "fp16") if key == "precision" else isinstance(kept, bool)
        update[key] = kept if valid else mine
        if valid and kept != mine:
            notes.append(f"train.{key}: auto keeps {kept} from the run being resumed (here: {mine})")
    return (train.model_copy(update=update) if update else train), notes
