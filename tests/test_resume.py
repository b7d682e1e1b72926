"""Never lose a run: exact resume after SIGTERM, signals, SIGKILL during saves, failed saves,
non-finite losses.

Runs that are signalled or killed happen in a forked child process: a real, separate process
(its own signal handlers, its own exit code) that starts in milliseconds because torch is
already imported. The resumed half of a run is another such process.
"""

from __future__ import annotations

import csv
import errno
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

# Optimizers import torch._dynamo on first use (~2 s); imported once here, every forked child
# starts training at once.
import torch._dynamo  # noqa: E402, F401
from conftest import last_weights, load, write_config
from typer.testing import CliRunner

import trainkit.cli  # noqa: E402, F401
import trainkit.data.pipeline  # noqa: E402, F401
import trainkit.train  # noqa: E402, F401
import trainkit.trainer  # noqa: E402, F401
from trainkit.checkpoint import load_checkpoint

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")

# Everything that makes a resume hard: shuffling, crop + flip, dropout, one-cycle lr and
# momentum, accumulation. 256 images / 32 = 8 micro-batches = 4 optimizer steps per epoch.
HARD = {
    "data": {"augment": {"crop_padding": 2, "hflip": True}},
    "model": {"dropout": 0.2},
    "sched": {"name": "onecycle"},
    "train": {"epochs": 3, "grad_accum_steps": 2},
    "log": {"tensorboard": False},
}
STEPS = 12
MOMENTS = {"step_1": 1, "epoch_boundary": 4, "mid_epoch": 6, "last_step": 12}


def endless_big_checkpoint_config(tmp_path):
    """A run that saves a 14 MB checkpoint every 2 steps and never ends by itself: for killing
    and interrupting it mid-save."""
    return write_config(
        tmp_path,
        {
            "model": {"hidden_sizes": [1024, 1024]},
            "train": {"epochs": 10_000},
            "data": {"synthetic": {"train_size": 64, "test_size": 32}},
            "log": {"tensorboard": False, "progress": "none"},
        },
    )


def in_child(args: list, hook=None, kill_when=None, timeout: float = 60) -> tuple[int, str]:
    """Run `trainkit ARGS` in a forked child; → (exit code or -signal, stdout + stderr).
    `kill_when()` is polled while the child runs: once it is true the child gets a SIGKILL."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 70
        try:
            os.close(read)
            torch.set_num_threads(1)  # as DataLoader workers do after a fork
            if hook is not None:
                hook()
            # the child is a trainkit process of its own: it handles SIGINT/SIGTERM as main() does
            result = CliRunner().invoke(
                __import__("trainkit.cli", fromlist=["app"]).app,
                [str(a) for a in args],
                obj={"owns_process": True},
            )
            os.write(write, (result.stdout + result.stderr).encode())
            code = result.exit_code
        finally:
            os._exit(code)
    os.close(write)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"child {args} did not finish in {timeout} s")
        if kill_when is not None and kill_when():
            os.kill(pid, signal.SIGKILL)
            kill_when = None
        time.sleep(0.0005 if kill_when is not None else 0.01)
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    os.close(read)
    code = os.waitstatus_to_exitcode(status)
    return code, b"".join(chunks).decode(errors="replace")


def signal_at(step: int, signum: int = signal.SIGTERM, times: int = 1):
    """A hook that makes the child signal itself right after optimizer step `step`."""

    def hook():
        from trainkit.trainer import Trainer

        original = Trainer.train_step

        def patched(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            if self.state.global_step == step and not patched.sent:
                patched.sent = True
                for _ in range(times):
                    os.kill(os.getpid(), signum)
            return out

        patched.sent = False
        Trainer.train_step = patched

    return hook


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Uninterrupted runs, one per data path (each in its own process)."""
    root = tmp_path_factory.mktemp("resume")
    config = write_config(root, HARD)
    weights = {}
    for cache in ("memory", "none"):
        code, out = in_child(["train", config, f"data.cache={cache}", f"run.name=ref_{cache}"])
        assert code == 0, out
        weights[cache] = last_weights(root, f"ref_{cache}")
    return root, config, weights


def interrupt_and_resume(root, config, cache, name, step, sabotage=None) -> tuple[int, str]:
    common = ["train", config, f"data.cache={cache}", f"run.name={name}"]
    code, out = in_child(common, hook=signal_at(step))
    assert code == 143, out
    assert f"step {step}; continue with --resume" in out
    assert load(root / "runs" / name / "checkpoints" / "last.pt")["global_step"] == step
    return in_child([*common, "--resume"], hook=sabotage)


def metric_rows(run: Path) -> list[dict]:
    """metrics.csv without its timing columns (which no two runs share)."""
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    return [{k: v for k, v in row.items() if k not in ("images_per_s", "epoch_seconds")} for row in rows]


@pytest.mark.parametrize("cache", ["memory", "none"])
@pytest.mark.parametrize("moment", sorted(MOMENTS))
def test_sigterm_then_resume_is_exact(references, cache, moment):
    root, config, weights = references
    name = f"{moment}_{cache}"
    code, out = interrupt_and_resume(root, config, cache, name, MOMENTS[moment])
    assert code == 0, out
    state = load(root / "runs" / name / "checkpoints" / "last.pt")
    assert state["global_step"] == STEPS and state["epoch"] == 3
    for key, value in state["model"].items():
        assert torch.equal(value, weights[cache][key]), key
    # the interrupted epoch's row too: the checkpoint carried the epoch's partial sums (the row
    # covered only the batches after the resume)
    assert metric_rows(root / "runs" / name) == metric_rows(root / "runs" / f"ref_{cache}")


def _skip_rng():

    trainkit.trainer.set_rng_state = lambda state: None


def _skip_scheduler():
    from trainkit.optim import LRSchedule

    LRSchedule.load_state_dict = lambda self, state: None


def _skip_optimizer():
    torch.optim.SGD.load_state_dict = lambda self, state: None


def _skip_data_position():
    from trainkit.trainer import Trainer

    original = Trainer.load_state

    def load_state(self, state, *args, **kwargs):
        original(self, state, *args, **kwargs)
        self.state.batch_in_epoch = 0

    Trainer.load_state = load_state


@pytest.mark.parametrize(
    "sabotage",
    [_skip_rng, _skip_scheduler, _skip_optimizer, _skip_data_position],
    ids=["rng", "scheduler", "optimizer", "data_position"],
)
def test_exact_resume_has_teeth(references, sabotage):
    """Leaving any one piece of saved state out of the resume breaks the equality above."""
    root, config, weights = references
    name = f"teeth_{sabotage.__name__}"
    code, out = interrupt_and_resume(root, config, "memory", name, MOMENTS["mid_epoch"], sabotage)
    if code != 0:  # e.g. a one-cycle schedule stepped past its end: a loud failure is fine too
        return
    state = load(root / "runs" / name / "checkpoints" / "last.pt")
    assert any(not torch.equal(value, weights["memory"][key]) for key, value in state["model"].items())


def test_sigint_saves_and_exits_130(references):
    root, config, _ = references
    code, out = in_child(["train", config, "run.name=sigint"], hook=signal_at(6, signal.SIGINT))
    assert code == 130, out
    assert "SIGINT: saving at the next step boundary" in out and "continue with --resume" in out
    assert load(root / "runs" / "sigint" / "checkpoints" / "last.pt")["global_step"] == 6


def ctrl_c_during_save(times: int):
    """A hook: during the first checkpoint write, `times` SIGINTs arrive (the write goes on in
    torch.save's pickler, where a KeyboardInterrupt used to break the zip file off)."""

    def hook():
        import trainkit.checkpoint

        original = trainkit.checkpoint.torch.save

        def save(obj, handle, *args, **kwargs):
            if not save.sent:
                save.sent = True
                for _ in range(times):
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(0.01)
            return original(obj, handle, *args, **kwargs)

        save.sent = False
        trainkit.checkpoint.torch.save = save

    return hook


@pytest.mark.parametrize("times", [2, 5])
def test_any_number_of_ctrl_c_during_a_save_exits_130_with_the_save_intact(references, times):
    """Ctrl-C twice (or more) while last.pt is written: the write completes, then the run leaves
    with 130 (the second Ctrl-C broke the write off: no epoch-1 last.pt, or torch's
    'RuntimeError: [enforce fail at inline_container.cc…]' and exit 1)."""
    root, config, _ = references
    name = f"ctrl_c_{times}"
    code, out = in_child(["train", config, f"run.name={name}"], hook=ctrl_c_during_save(times))
    assert code == 130, out
    assert "Error" not in out and out.strip().splitlines()[-1] == "stopped by SIGINT", out
    assert load(root / "runs" / name / "checkpoints" / "last.pt")["global_step"] == 4  # epoch 1, whole


def test_second_ctrl_c_leaves_at_once(references):
    root, config, _ = references
    code, out = in_child(["train", config, "run.name=twice"], hook=signal_at(6, signal.SIGINT, times=2))
    assert code == 130, out
    assert "continue with --resume" not in out  # no save at step 6: the epoch-1 checkpoint stays
    assert load(root / "runs" / "twice" / "checkpoints" / "last.pt")["global_step"] == 4


def _temp_files(directory: Path) -> list[Path]:
    """A save's temp files: hidden names in the checkpoint folder, whatever their pattern."""
    return [p for p in directory.iterdir() if p.name.startswith(".")] if directory.is_dir() else []


def _kill_on_event(checkpoints: Path, rng: random.Random):
    """A kill_when() that fires on an observed event, not after a time: either as soon as a
    save's temp file appears (mid-save), or a random 0-50 ms after last.pt was replaced."""
    last = checkpoints / "last.pt"

    def stamp():
        try:
            stat = last.stat()
            return stat.st_ino, stat.st_mtime_ns
        except FileNotFoundError:
            return None

    before, mid_save, fired_at = stamp(), rng.random() < 0.5, []

    def kill_when() -> bool:
        if fired_at:
            return time.monotonic() >= fired_at[0]
        if mid_save and _temp_files(checkpoints):
            return True
        if not mid_save and stamp() != before:
            fired_at.append(time.monotonic() + rng.uniform(0, 0.05))
        return False

    return kill_when


def test_sigkill_at_random_moments_never_breaks_last_pt(tmp_path):
    """SIGKILL at least 24 times, at observed moments of a run whose time goes mostly into saving
    (a 14 MB checkpoint, 2 steps per epoch): mid-save, or shortly after a save. last.pt always
    loads and is never older than before; temp files of killed saves are gone once the run
    starts again."""
    config = endless_big_checkpoint_config(tmp_path)
    checkpoints = tmp_path / "runs" / "tiny" / "checkpoints"
    rng = random.Random(0)
    last_step, mid_save_kills, trials = -1, 0, 0
    while trials < 24 or mid_save_kills == 0:
        assert trials < 96, (trials, mid_save_kills)
        trials += 1
        args = ["train", config] + (["--resume"] if (checkpoints / "last.pt").exists() else [])
        code, out = in_child(args, kill_when=_kill_on_event(checkpoints, rng))
        assert code == -signal.SIGKILL, out
        mid_save_kills += bool(_temp_files(checkpoints))
        if (checkpoints / "last.pt").exists():
            state = load_checkpoint(checkpoints / "last.pt")  # never torn
            assert state["global_step"] >= last_step  # the old one or a newer one
            last_step = state["global_step"]
            if (checkpoints / "best.pt").exists():
                load_checkpoint(checkpoints / "best.pt")
    print(f"SIGKILL trials {trials}, mid-save {mid_save_kills}, last step {last_step}")
    assert last_step > 0 and mid_save_kills >= 1, (last_step, mid_save_kills)
    # a normal start (resume, two more epochs) removes the stale temp files
    epochs = load(checkpoints / "last.pt")["epoch"] + 2
    code, out = in_child(["train", config, "--resume", f"train.epochs={epochs}"])
    assert code == 0, out
    assert not _temp_files(checkpoints)


def _fail_writes_in(directory: Path, error: int):
    """Make saving into `directory` fail like a read-only directory or a full disk would."""

    def hook():
        import builtins

        real_open = builtins.open

        def guarded_open(file, mode="r", *args, **kwargs):
            path = Path(os.fsdecode(file)) if isinstance(file, (str, bytes, os.PathLike)) else None
            if path is not None and path.parent == directory and any(c in mode for c in "wax+"):
                if error == errno.ENOSPC:  # a full disk: the write starts, then fails partway
                    handle = real_open(file, mode, *args, **kwargs)
                    handle.write(b"partial")
                    handle.close()
                raise OSError(error, os.strerror(error), str(path))
            return real_open(file, mode, *args, **kwargs)

        builtins.open = guarded_open

    return hook


@pytest.mark.parametrize("error", [errno.EROFS, errno.ENOSPC], ids=["read_only", "disk_full"])
def test_a_failed_save_exits_non_zero_and_keeps_the_old_checkpoint(tmp_path, error):
    config = write_config(tmp_path, {"log": {"tensorboard": False}})
    code, out = in_child(["train", config])
    assert code == 0, out
    checkpoints = tmp_path / "runs" / "tiny" / "checkpoints"
    before = (checkpoints / "last.pt").read_bytes()
    if error == errno.EROFS and os.geteuid() != 0:  # a real read-only directory where it binds
        checkpoints.chmod(0o555)
        hook = None
    else:  # root writes anyway: fail the writes the way the OS would
        hook = _fail_writes_in(checkpoints, error)
    try:
        code, out = in_child(["train", config, "--resume", "train.epochs=3"], hook=hook)
    finally:
        checkpoints.chmod(0o755)
    assert code == 1, out
    assert "could not save checkpoint" in out and "saved" not in out.replace("could not save", "")
    assert (checkpoints / "last.pt").read_bytes() == before
    assert not _temp_files(checkpoints)


def test_non_finite_loss_stops_without_a_checkpoint(cli, tmp_path, monkeypatch):
    config = write_config(tmp_path, {"train": {"epochs": 2}})
    _nan_loss_on_call(monkeypatch, 3)
    result = cli("train", config)
    assert result.exit_code == 1, result
    assert "non-finite loss (nan) at epoch 1, step 3" in result.stderr  # the 3rd step
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "runs" / "tiny" / "checkpoints" / "last.pt").exists()


def test_ctrl_c_after_an_unchecked_non_finite_loss_saves_nothing(tmp_path):
    # the losses are checked a chunk of steps at a time: a NaN at step 3 has not been looked
    # at when a SIGINT after step 5 asks for a save; that save must find it first
    config = write_config(tmp_path, {"train": {"epochs": 2}, "log": {"tensorboard": False}})

    def hook():
        _nan_loss_on_call(pytest.MonkeyPatch(), 3)
        signal_at(5, signal.SIGINT)()

    code, out = in_child(["train", config], hook=hook)
    assert code == 1, out
    assert "non-finite loss (nan) at epoch 1, step 3" in out and "stopped without saving" in out
    assert not (tmp_path / "runs" / "tiny" / "checkpoints" / "last.pt").exists()


def test_non_finite_loss_skip_drops_the_whole_window(cli, tmp_path, monkeypatch):
    # the NaN is in the first micro-batch of an accumulation window: its gradients, not just
    # the stepping micro-batch's loss, must keep the step from happening
    config = write_config(tmp_path, {"train": {"epochs": 2, "grad_accum_steps": 2, "on_nonfinite": "skip"}})
    _nan_loss_on_call(monkeypatch, 3)
    result = cli("train", config)
    assert result.exit_code == 0, result
    assert "non-finite loss at epoch 1 step 2; step skipped" in result.stderr
    state = load(tmp_path / "runs" / "tiny" / "checkpoints" / "last.pt")
    assert all(torch.isfinite(value).all() for value in state["model"].values())
    assert state["global_step"] == 7  # 8 windows, one skipped


def _nan_loss_on_call(monkeypatch, call: int) -> None:
    import trainkit.optim

    original = trainkit.optim.build_loss

    def build_loss(*args, **kwargs):
        loss = original(*args, **kwargs)
        calls = {"n": 0}

        class NanOnce(torch.nn.Module):
            def forward(self, logits, labels):
                value = loss(logits, labels)
                if self.training:
                    calls["n"] += 1
                    if calls["n"] == call:
                        return value * float("nan")
                return value

        return NanOnce()

    monkeypatch.setattr(trainkit.optim, "build_loss", build_loss)


def test_own_checkpoints_load_under_forced_weights_only(cli, tmp_path):
    """TORCH_FORCE_WEIGHTS_ONLY_LOAD=1, an empty allowlist, plain torch.load: it still loads."""
    assert cli("train", write_config(tmp_path)).exit_code == 0
    path = tmp_path / "runs" / "tiny" / "checkpoints" / "last.pt"
    import subprocess

    code = (
        "import torch, torch.serialization as s; s.clear_safe_globals(); "
        f"state = torch.load({str(path)!r}); print(sorted(state)[:3])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1"},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    for verb in (["eval", path], ["predict", _png(tmp_path), "-c", path]):
        done = subprocess.run(
            [sys.executable, "-m", "trainkit", *map(str, verb)],
            capture_output=True,
            text=True,
            env={**os.environ, "TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1"},
            timeout=120,
        )
        assert done.returncode == 0, done.stderr


def _png(directory: Path) -> Path:
    from PIL import Image

    path = directory / "one.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(path)
    return path


def test_ctrl_c_storm_on_the_real_command_exits_130(tmp_path):
    """`trainkit` itself (main()), four Ctrl-C 20 ms apart from the moment a save is seen in
    progress: exit 130, the stop line last, last.pt whole. A Ctrl-C landing after the run had
    restored Python's handler ended the process by SIGINT (exit -2)."""
    import subprocess

    config = endless_big_checkpoint_config(tmp_path)
    checkpoints = tmp_path / "runs" / "tiny" / "checkpoints"
    process = subprocess.Popen(
        [sys.executable, "-m", "trainkit", "train", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not ((checkpoints / "last.pt").exists() and _temp_files(checkpoints)):  # a save after the first
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.0005)
    for _ in range(4):
        process.send_signal(signal.SIGINT)
        time.sleep(0.02)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, (process.returncode, err)
    known = ("warning: SIGINT: saving at the next step boundary", "stopped by SIGINT", "interrupted")
    assert all(line in known for line in err.strip().splitlines()), err  # no error, no traceback
    load_checkpoint(checkpoints / "last.pt")
