"""DDP on CPU (gloo, 2 processes): torchrun, --nproc, two nodes, accumulation, failures, signals.

Every run here is a real multi-process run through the CLI. The reference is one process with
the same global batch: DDP must reproduce its weights (the data order and the augmentation draw
are global; each rank takes its slice of every global batch).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import last_weights, load, max_weight_difference, write_config

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="gloo multi-process tests are POSIX-only")

# 9 global batches of 32 per epoch, the last of 1 image (so one rank's share is empty), eval
# batches of 64 over 129 images likewise; crop + flip augmentation
DDP = {
    "data": {
        "synthetic": {"train_size": 257, "test_size": 129},
        "eval_batch_size": 64,
        "augment": {"crop_padding": 2, "hflip": True},
    },
    "train": {"epochs": 2},
    "log": {"tensorboard": True},
}
TRAINKIT = [sys.executable, "-m", "trainkit"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
DEADLINE = 120  # seconds for any one multi-process command (they take ~10 s)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    environment.pop("TRAINKIT_DEBUG", None)
    return environment


def run(command: list, cwd: Path, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in command], cwd=cwd, env=env(**extra), capture_output=True, text=True, timeout=DEADLINE
    )


def together(commands: list[list], cwd: Path, environments: list[dict]) -> list[tuple[int, str, str]]:
    """Start the commands at once (one agent per node, one srun task per rank); wait for all.
    → [(exit code, stdout, stderr)]"""
    processes = [
        subprocess.Popen(
            [str(c) for c in command],
            cwd=cwd,
            env=environment,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for command, environment in zip(commands, environments)
    ]
    outputs = [process.communicate(timeout=DEADLINE) for process in processes]
    return [(process.returncode, *output) for process, output in zip(processes, outputs)]


def two_node_agents(config: Path, *overrides: str) -> list[list]:
    """Two torchrun agents, one process each, meeting at a c10d rendezvous on 127.0.0.1."""
    endpoint = f"127.0.0.1:{free_port()}"
    agent = [
        *TORCHRUN,
        "--nnodes",
        "2",
        "--nproc_per_node",
        "1",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        endpoint,
        "--rdzv_id",
        "trainkit-test",
        "--max_restarts",
        "0",
        "-m",
        "trainkit",
        "train",
        config,
        "train.parallel=ddp",
        *overrides,
    ]
    return [agent, agent]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, global batch 32: the weights every DDP variant must reproduce."""
    root = tmp_path_factory.mktemp("ddp")
    config = write_config(root, DDP)
    done = run([*TRAINKIT, "train", config, "run.name=single"], root)
    assert done.returncode == 0, done.stderr
    return root, config, last_weights(root, "single")


def assert_one_complete_run(root: Path, name: str, epochs: int = 2) -> None:
    runs = sorted(p.name for p in (root / "runs").iterdir() if p.name.startswith(name))
    assert runs == [name], runs  # one set of files, not one per rank
    run_dir = root / "runs" / name
    assert (run_dir / "config.yaml").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    assert len((run_dir / "metrics.csv").read_text().splitlines()) == epochs + 1
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    state = load(run_dir / "checkpoints" / "last.pt")
    assert not any(key.startswith("module.") for key in state["model"])


@pytest.mark.parametrize("cache", ["memory", "none"])  # the tensor path and the DataLoader path
def test_nproc_matches_one_process(reference, cache):
    root, config, single = reference
    name = f"nproc_{cache}"
    done = run([*TRAINKIT, "train", config, "--nproc", "2", f"data.cache={cache}", f"run.name={name}"], root)
    assert done.returncode == 0, done.stderr
    assert "x2 (ddp)" in done.stdout and done.stdout.count("run directory:") == 1
    assert ("in-memory tensors" if cache == "memory" else "DataLoader") in done.stdout
    assert_one_complete_run(root, name)
    assert max_weight_difference(single, last_weights(root, name)) < 1e-5
    # metrics are all-reduced over the ranks' shards: the same as one process's
    ours = load(root / "runs" / name / "checkpoints" / "last.pt")["metrics"]
    theirs = load(root / "runs" / "single" / "checkpoints" / "last.pt")["metrics"]
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_top5"):
        assert abs(ours[key] - theirs[key]) < 1e-5, key


def test_torchrun_matches_one_process(reference):
    root, config, single = reference
    done = run(
        [
            *TORCHRUN,
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            free_port(),
            "-m",
            "trainkit",
            "train",
            config,
            "run.name=torchrun",
        ],
        root,
    )
    assert done.returncode == 0, done.stderr  # train.parallel auto → ddp at world size 2
    assert_one_complete_run(root, "torchrun")
    assert max_weight_difference(single, last_weights(root, "torchrun")) < 1e-5


def test_accumulation_under_ddp_matches_the_larger_batch(reference):
    # 2 ranks × micro-batches of 16 (global 16) × 2 accumulation steps = global batch 32;
    # no_sync() skips the all-reduce of the first micro-batch of each window
    root, config, single = reference
    done = run(
        [
            *TRAINKIT,
            "train",
            config,
            "--nproc",
            "2",
            "data.batch_size=16",
            "train.grad_accum_steps=2",
            "run.name=accum",
        ],
        root,
    )
    assert done.returncode == 0, done.stderr
    assert max_weight_difference(single, last_weights(root, "accum")) < 1e-5


def test_two_nodes_on_localhost_train_together(reference):
    root, config, single = reference
    results = together(two_node_agents(config, "run.name=nodes"), root, [env(), env()])
    assert [code for code, *_ in results] == [0, 0], results
    assert_one_complete_run(root, "nodes")
    assert max_weight_difference(single, last_weights(root, "nodes")) < 1e-5


def test_srun_tasks_become_ranks(reference):
    """Two processes with the environment `srun --ntasks 2` gives its tasks, and no torchrun."""
    root, config, single = reference
    port = str(free_port())
    task = [*TRAINKIT, "train", config, "run.name=slurm"]
    results = together(
        [task, task],
        root,
        [
            env(
                SLURM_PROCID=str(rank),
                SLURM_LOCALID=str(rank),
                SLURM_STEP_NUM_TASKS="2",
                SLURM_STEP_NODELIST="localhost",
                SLURM_JOB_ID="4242",
                MASTER_PORT=port,
            )
            for rank in (0, 1)
        ],
    )
    assert [code for code, *_ in results] == [0, 0], results
    assert "x2 (ddp)" in results[0][1] and results[1][1] == ""  # only rank 0 reports
    assert_one_complete_run(root, "slurm")
    assert max_weight_difference(single, last_weights(root, "slurm")) < 1e-5


@pytest.mark.parametrize(
    "nodelist, host",
    [("node7", "node7"), ("gpu[07-09,12],cpu1", "gpu07"), ("a[3,5]-ib", "a3-ib"), ("x1,y[1-2]", "x1")],
)
def test_first_host_of_a_slurm_nodelist(nodelist, host):
    from trainkit.runtime import first_host, slurm_environment

    assert first_host(nodelist) == host
    environ = {
        "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_NUM_TASKS": "4",
        "SLURM_STEP_NODELIST": nodelist,
        "SLURM_JOB_ID": "123",
    }
    before = dict(environ)
    ranks = slurm_environment(environ)
    assert environ == before  # the environment is read, never rewritten
    assert (ranks["RANK"], ranks["WORLD_SIZE"], ranks["LOCAL_RANK"]) == ("3", "4", "1")
    assert ranks["MASTER_ADDR"] == host and ranks["MASTER_PORT"] == "20123"
    assert not slurm_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"})  # sbatch, no srun


# A rank that fails: sitecustomize (imported by every Python process on PYTHONPATH) makes
# rank 1 raise at its third step. Nothing in trainkit knows about it.
FAIL_ON_RANK_1 = """
import os
if os.environ.get("RANK") == "1":
    import trainkit.trainer as trainer

    original = trainer.Trainer.train_step

    def failing(self, *args, **kwargs):
        if self.state.global_step >= 2:
            raise RuntimeError("injected failure on rank 1")
        return original(self, *args, **kwargs)

    trainer.Trainer.train_step = failing
"""


@pytest.mark.parametrize("launcher", ["nproc", "two_nodes"])
def test_a_failing_rank_ends_every_process(reference, tmp_path, launcher):
    root, config, _ = reference
    (tmp_path / "sitecustomize.py").write_text(FAIL_ON_RANK_1)
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    began = time.perf_counter()
    if launcher == "nproc":
        done = run(
            [*TRAINKIT, "train", config, "--nproc", "2", "train.epochs=50", "run.name=fail"],
            root,
            PYTHONPATH=path,
        )
        codes, stderr = [done.returncode], done.stderr
        assert "DDP rank 1 failed first" in stderr
    else:  # the other node only learns through the process group: the harder case
        results = together(
            two_node_agents(config, "train.epochs=50", "run.name=fail2"), root, [env(PYTHONPATH=path)] * 2
        )
        codes, stderr = [code for code, *_ in results], "".join(err for *_, err in results)
    elapsed = time.perf_counter() - began
    assert all(code != 0 for code in codes), codes
    assert "injected failure on rank 1" in stderr
    assert elapsed < 60, elapsed


# A NaN loss whose gradients stay finite (an fp16 overflow on one rank's samples looks like
# this): rank 1 at its 5th training loss, rank 0 at its RANK_0_AT-th (0: never).
NAN_LOSS_ON_EACH_RANK = """
import os
if "RANK" in os.environ:
    import trainkit.optim as optim

    original = optim.build_loss
    at = 5 if os.environ["RANK"] == "1" else RANK_0_AT

    def build_loss(*args, **kwargs):
        import torch

        loss = original(*args, **kwargs)

        class NanOnce(torch.nn.Module):
            calls = 0

            def forward(self, logits, labels):
                value = loss(logits, labels)
                if self.training:
                    self.calls += 1
                    if self.calls == at:
                        return value + float("nan")  # the value only: d/dvalue stays 1
                return value

        return NanOnce()

    optim.build_loss = build_loss
"""


@pytest.mark.parametrize("rank_0_at", [0, 6])
def test_a_non_finite_loss_on_one_rank_stops_every_rank_before_a_save(reference, tmp_path, rank_0_at):
    """The losses are checked a chunk at a time; the ranks compare what they found before
    anything is saved, so rank 0 does not save the epoch (no evaluation due) unaware of rank 1's
    NaN, and every rank names the same, first, step."""
    root, config, _ = reference
    (tmp_path / "sitecustomize.py").write_text(NAN_LOSS_ON_EACH_RANK.replace("RANK_0_AT", str(rank_0_at)))
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    done = run(
        [*TRAINKIT, "train", config, "--nproc", "2", "train.eval_every=2", f"run.name=nan{rank_0_at}"],
        root,
        PYTHONPATH=path,
    )
    assert done.returncode == 1, done.stderr
    assert "non-finite loss (nan) at epoch 1, step 5" in done.stderr
    assert "step 6" not in done.stderr
    run_dir = root / "runs" / f"nan{rank_0_at}"
    assert not (run_dir / "checkpoints" / "last.pt").exists()
    metrics = run_dir / "metrics.csv"
    assert not metrics.exists() or len(metrics.read_text().splitlines()) <= 1  # a header, no row


SLOW_STEPS = """
import os, time
if "RANK" in os.environ:
    import trainkit.trainer as trainer

    original = trainer.Trainer.train_step

    def slow(self, *args, **kwargs):
        time.sleep(0.05)
        return original(self, *args, **kwargs)

    trainer.Trainer.train_step = slow
"""


def _worker_pids(launcher_pid: int) -> dict[int, int]:
    """rank → pid of the launcher's worker processes (read from /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            parent = int(next(line for line in status.splitlines() if line.startswith("PPid:")).split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, StopIteration, ValueError):
            continue
        rank = next((item[5:] for item in environ if item.startswith(b"RANK=")), None)
        if parent == launcher_pid and rank is not None:
            found[int(rank)] = int(entry.name)
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
@pytest.mark.parametrize("target", ["rank_1", "launcher"])
def test_sigterm_stops_all_ranks_and_resumes_at_another_world_size(reference, tmp_path, target):
    root, config, single = reference
    # global micro-batches of 8 × 4 accumulation steps = the reference's global batch of 32;
    # each step slowed to 50 ms so the signal lands mid-run
    (tmp_path / "sitecustomize.py").write_text(SLOW_STEPS)
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    common = ["data.batch_size=8", "train.grad_accum_steps=4"]
    launcher = subprocess.Popen(
        [str(c) for c in [*TRAINKIT, "train", config, "--nproc", "2", *common, f"run.name={target}"]],
        cwd=root,
        env=env(PYTHONPATH=path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in launcher.stdout:
        if line.startswith("first training step"):
            break
    pids = _worker_pids(launcher.pid)
    assert sorted(pids) == [0, 1], pids
    os.kill(pids[1] if target == "rank_1" else launcher.pid, signal.SIGTERM)
    began = time.perf_counter()
    launcher.communicate(timeout=DEADLINE)
    assert time.perf_counter() - began < 60
    assert launcher.returncode == 143, launcher.returncode
    state = load(root / "runs" / target / "checkpoints" / "last.pt")
    assert 0 < state["global_step"] < 18  # stopped partway, saved at a step boundary

    # resume in ONE process: same global batch and order, so it ends where the others do
    done = run([*TRAINKIT, "train", config, *common, f"run.name={target}", "--resume"], root)
    assert done.returncode == 0, done.stderr
    assert max_weight_difference(single, last_weights(root, target)) < 1e-5
