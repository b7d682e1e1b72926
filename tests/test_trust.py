"""A run is its directory, input is bounded, output is data: the attacker's and the careless
user's cases (each one observed to fail before its fix)."""

from __future__ import annotations

import io
import json
import os
import resource
import shutil
import zipfile

import pytest
import torch
import yaml
from conftest import write_config
from PIL import Image
from typer.testing import CliRunner

from trainkit.checkpoint import (
    atomic_save,
    atomic_write_text,
    is_temp_file,
    load_checkpoint,
    open_append,
    stale_temp_files,
    temp_path_for,
)
from trainkit.cli import app
from trainkit.errors import TrainkitError

VICTIM_BYTES = b"precious user data\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One tiny trained run shared by the tests that only read it (copy it to change it)."""
    root = tmp_path_factory.mktemp("trained")
    config = write_config(root, {"train": {"epochs": 1}, "log": {"tensorboard": False}})
    result = CliRunner().invoke(app, ["train", str(config)])
    assert result.exit_code == 0, result.output
    return root / "runs" / "tiny"


@pytest.fixture
def best(run_dir):
    return run_dir / "checkpoints" / "best.pt"


def _victim(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(VICTIM_BYTES)
    return victim


def _tampered(best, tmp_path, name="tampered.pt", **changes):
    state = torch.load(best, map_location="cpu", weights_only=True)
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            state[section][field] = value
        else:
            state[section] = value
    path = tmp_path / name
    torch.save(state, path)
    return path


# --------------------------------------------------------------------------- 2. writes


def test_atomic_writes_never_follow_planted_links(tmp_path):
    victim = _victim(tmp_path)
    target_dir = tmp_path / "checkpoints"
    target_dir.mkdir()
    # the old predictable temp names (.<name>.tmp-<pid>) planted as links: now never used
    (target_dir / f".last.pt.tmp-{os.getpid()}").symlink_to(victim)
    atomic_save({"x": torch.zeros(2)}, target_dir / "last.pt")
    assert victim.read_bytes() == VICTIM_BYTES
    assert torch.load(target_dir / "last.pt", weights_only=True)["x"].shape == (2,)

    link = target_dir / "best.pt"
    link.symlink_to(victim)  # a final path that is a link trainkit did not create
    with pytest.raises(OSError, match="symbolic link"):
        atomic_save({"x": torch.zeros(2)}, link)
    with pytest.raises(OSError, match="symbolic link"):
        atomic_write_text(link, "text")
    assert victim.read_bytes() == VICTIM_BYTES and link.is_symlink()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "linked_dir").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(OSError, match="symbolic link"):
        atomic_write_text(tmp_path / "linked_dir" / "config.yaml", "text")
    assert list(elsewhere.iterdir()) == []
    assert [p for p in target_dir.iterdir() if is_temp_file(p)] == [
        target_dir / f".last.pt.tmp-{os.getpid()}"
    ]


def test_best_pt_links_follow_the_same_rule(tmp_path):
    from trainkit.checkpoint import link_or_copy

    victim = _victim(tmp_path)
    atomic_save({"x": torch.ones(2)}, tmp_path / "last.pt")
    (tmp_path / f".best.pt.tmp-{os.getpid()}").symlink_to(victim)  # the old guessable name
    link_or_copy(tmp_path / "last.pt", tmp_path / "best.pt")
    assert torch.load(tmp_path / "best.pt", weights_only=True)["x"].tolist() == [1.0, 1.0]
    (tmp_path / "epoch-1.pt").symlink_to(victim)
    with pytest.raises(TrainkitError, match="symbolic link"):
        link_or_copy(tmp_path / "last.pt", tmp_path / "epoch-1.pt")
    assert victim.read_bytes() == VICTIM_BYTES


def test_appends_refuse_links_fifos_and_hard_links(tmp_path):
    victim = _victim(tmp_path)
    (tmp_path / "metrics.csv").symlink_to(victim)
    with pytest.raises(OSError, match="symbolic link"):
        open_append(tmp_path / "metrics.csv")
    os.link(victim, tmp_path / "hard.csv")
    with pytest.raises(OSError, match="plain"):
        open_append(tmp_path / "hard.csv")
    os.mkfifo(tmp_path / "fifo.csv")
    with pytest.raises(OSError):
        open_append(tmp_path / "fifo.csv")  # returns at once, never blocks on the FIFO
    assert victim.read_bytes() == VICTIM_BYTES
    with open_append(tmp_path / "fresh.csv") as handle:
        handle.write("a,b\n")
    assert (tmp_path / "fresh.csv").read_text() == "a,b\n"


def test_temp_names_are_unguessable_and_recognised(tmp_path):
    names = {temp_path_for(tmp_path / "last.pt").name for _ in range(50)}
    assert len(names) == 50 and all(is_temp_file(name) for name in names)
    assert is_temp_file(".last.pt.tmp-1234")  # left by earlier versions
    assert not is_temp_file("last.pt") and not is_temp_file(".hidden") and not is_temp_file("x.tmp-1")
    stale = tmp_path / next(iter(names))
    stale.write_bytes(b"partial")
    (tmp_path / ".k.pt.tmp-99").symlink_to(tmp_path / "nowhere")  # a link is never "ours"
    assert stale_temp_files(tmp_path) == [stale]


def test_resume_into_a_run_with_planted_links_leaves_the_victim(run_dir, tmp_path):
    victim = _victim(tmp_path)
    run = tmp_path / "runs" / "tiny"
    shutil.copytree(run_dir, run)
    for name in ("config.yaml", "metrics.csv"):
        (run / name).unlink()
        (run / name).symlink_to(victim)
    config = write_config(tmp_path, {"train": {"epochs": 2}, "log": {"tensorboard": False}})
    result = CliRunner().invoke(app, ["train", str(config), str(run / "checkpoints" / "last.pt"), "--resume"])
    assert victim.read_bytes() == VICTIM_BYTES
    assert result.exit_code == 1 and "symbolic link" in result.stderr, result.output


@pytest.mark.parametrize("name", ["../escape", "/abs/run", "", ".", "..", "a/b", "nul\0byte", "x" * 201])
def test_run_name_is_one_path_component(cli, tmp_path, name):
    config = write_config(tmp_path)
    text = yaml.safe_load(config.read_text())
    text["run"]["name"] = name
    config.write_text(yaml.safe_dump(text))
    result = cli("train", config)
    assert result.exit_code == 2 and "run.name" in result.stderr, result
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "runs").exists() and not (tmp_path / "escape").exists()


def test_eval_never_writes_where_the_checkpoint_says(cli, best, tmp_path):
    data = tmp_path / "data"
    for split in ("train", "test"):
        for label, color in (("a", (250, 0, 0)), ("b", (0, 0, 250))):
            (data / split / label).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (16, 16), color).save(data / split / label / f"{i}.png")
    state = torch.load(best, map_location="cpu", weights_only=True)
    chosen = tmp_path / "chosen_by_the_author"
    state["config"]["data"].update(name="imagefolder", root=str(data), cache_dir=str(chosen), download=True)
    state["classes"] = ["a", "b"]
    torch.save(state, tmp_path / "authored.pt")
    result = cli("eval", tmp_path / "authored.pt", "--json")
    assert result.exit_code == 0, result
    assert not chosen.exists()


# --------------------------------------------------------------------------- 3. bounded input

# ~400 bytes that expand to 9**9 strings where free keyword arguments are allowed
BOMB = "\n".join(
    [
        "model:",
        "  name: torchvision.resnet18",
        '  a: &a ["x","x","x","x","x","x","x","x","x"]',
        *(f"  {n}: &{n} [{','.join([f'*{p}'] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi")),
    ]
)


@pytest.mark.parametrize(
    "text, words",
    [
        (BOMB, "expands to more than"),
        ("model: " + "[" * 1000 + "]" * 1000, "nested deeper"),
        ("run:\n" + "".join(f"{'  ' * (i + 1)}k{i}:\n" for i in range(100)), "nested deeper"),
        ("# " + "x" * (1 << 20) + "\n", "larger than"),
    ],
    ids=["alias-bomb", "deep-flow", "deep-block", "huge"],
)
def test_hostile_yaml_is_bounded(cli, tmp_path, text, words):
    (tmp_path / "hostile.yaml").write_text(text)
    for verb in ("config", "train"):
        result = cli(verb, tmp_path / "hostile.yaml")
        assert result.exit_code == 2 and words in result.stderr, result
        assert result.stderr.count("\n") == 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "override, path",
    [
        ("optim.lr=.inf", "optim.lr"),
        ("loss.weight=[1,.nan,1,1,1,1,1,1,1,1]", "loss.weight.1"),
        ("sched.warmup_epochs=.inf", "sched.warmup_epochs"),
        ("data.augment.brightness=.nan", "data.augment.brightness"),
    ],
)
def test_non_finite_numbers_are_config_errors(cli, tmp_path, override, path):
    result = cli("train", write_config(tmp_path), override)
    assert result.exit_code == 2 and f"{path}: must be a finite number" in result.stderr, result
    assert not (tmp_path / "runs").exists()


def test_checkpoint_spec_is_checked_before_allocating(best, tmp_path):
    spec = dict(torch.load(best, weights_only=True)["model_spec"], hidden_sizes=[20000, 20000])
    path = _tampered(best, tmp_path, model_spec=spec)
    from trainkit.checkpoint import build_model_from_checkpoint

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(TrainkitError, match=r"do not fit.*wrong shape: net\.1\.weight") as info:
        build_model_from_checkpoint(load_checkpoint(path), path)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 300  # 20000 x 20000 float weights alone are 1.6 GB
    assert "\n" not in str(info.value)


def test_state_dict_mismatch_names_the_keys(cli, best, tmp_path):
    state = torch.load(best, weights_only=True)
    weights = dict(state["model"])
    weights["extra.weight"] = weights.pop("net.3.bias")
    path = _tampered(best, tmp_path, model=weights)
    result = cli("eval", path)
    assert result.exit_code == 1 and result.stderr.count("error:") == 1, result
    assert "missing: net.3.bias" in result.stderr and "unexpected: extra.weight" in result.stderr


def test_zip_entries_that_expand_are_refused_unread(best, tmp_path):
    state = torch.load(best, weights_only=True)
    state["padding"] = torch.zeros(10 << 20)  # 40 MB of zeros: deflates to ~40 KB
    torch.save(state, tmp_path / "plain.pt")
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(tmp_path / "plain.pt") as source, zipfile.ZipFile(bomb, "w") as target:
        for entry in source.infolist():
            target.writestr(entry.filename, source.read(entry), compress_type=zipfile.ZIP_DEFLATED)
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(TrainkitError, match=r"entries expand to 42 MB from 0\.\d MB on disk"):
        load_checkpoint(bomb)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"format_version": "1"}, "'format_version' is not an integer"),
        ({"format_version": 0}, "not a valid format"),
        ({"classes": [1, 2]}, "'classes'"),
        ({"classes": [f"c{i}" for i in range(11)]}, "'classes'"),
        ({"classes": "abc"}, "'classes'"),
        ({"preprocess__mean": [float("nan")] * 3}, "'preprocess.mean'"),
        ({"preprocess__std": [0.2, 0.0, 0.2]}, "'preprocess.std'"),
        ({"preprocess__channels": 7}, "'preprocess.channels'"),
        ({"preprocess__image_size": 10**9}, "'preprocess.image_size'"),
        ({"model_spec__num_classes": "10"}, "'model_spec.num_classes'"),
        ({"model": {"w": "not a tensor"}}, "'model'"),
        ({"config": []}, "'config'"),
    ],
)
def test_every_checkpoint_field_is_validated(cli, best, tmp_path, change, words):
    path = _tampered(best, tmp_path, **change)
    for verb in (["eval", path], ["predict", best, "-c", path]):
        result = cli(*verb)
        assert result.exit_code == 1 and words in result.stderr, result
        assert result.stderr.count("\n") == 1


def test_json_never_contains_nan(cli, best, tmp_path):
    state = torch.load(best, weights_only=True)
    state["model"] = {k: torch.full_like(v, float("nan")) for k, v in state["model"].items()}
    torch.save(state, tmp_path / "nan.pt")
    result = cli("eval", tmp_path / "nan.pt", "--json")
    assert result.exit_code == 0, result
    metrics = json.loads(result.stdout, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    assert metrics["loss"] is None


def test_checkpoint_with_nan_config_is_a_config_error_not_a_crash(cli, best, tmp_path):
    state = torch.load(best, weights_only=True)
    state["config"]["loss"]["weight"] = [float("nan")] * 10
    torch.save(state, tmp_path / "nanloss.pt")
    result = cli("eval", tmp_path / "nanloss.pt")
    assert result.exit_code == 2 and "loss.weight.0: must be a finite number" in result.stderr, result


# --------------------------------------------------------------------------- 4. config mistakes


@pytest.mark.parametrize(
    "overrides, path",
    [
        (["loss.weight=[1,[2]]"], "loss.weight"),
        (["sched.name=multistep", "sched.milestones=5"], "sched.milestones"),
        (["sched.name=step", "sched.step_size=.inf"], "sched.step_size"),
        (["sched.name=step", "sched.step_size=abc"], "sched.step_size"),
        (["sched.warmup_epochs=.inf"], "sched.warmup_epochs"),
        (["loss.label_smoothing=abc"], "loss.label_smoothing"),
        (["model.name=torchvision.resnet18", "~model.hidden_sizes", "model.widen=2"], "model.widen"),
        (["model.name=mlp", "model.hidden_sizes=abc"], "model"),
    ],
)
def test_config_mistakes_exit_2_with_their_path(cli, tmp_path, overrides, path):
    for verb in ("config", "train"):
        result = cli(verb, write_config(tmp_path), *overrides)
        assert result.exit_code == 2 and f"error: {path}:" in result.stderr, result
        assert result.stderr.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_an_override_removes_a_key_to_switch_optimizers(cli, tmp_path):
    config = write_config(tmp_path)  # sgd with momentum
    assert cli("config", config, "optim.name=adam").exit_code == 2
    result = cli("config", config, "optim.name=adam", "~optim.momentum")
    assert result.exit_code == 0, result
    optim = yaml.safe_load(result.stdout)["optim"]
    assert optim == {"name": "adam", "lr": 0.05, "head_lr": None, "no_decay_norm_and_bias": False}
    missing = cli("config", config, "~optim.weight_decay")
    assert missing.exit_code == 2 and "optim.weight_decay: not set" in missing.stderr


def test_suggestions_include_the_sections_own_keys(cli, tmp_path):
    result = cli("config", write_config(tmp_path), "sched.name=cosine", "sched.warmup_epoch=1")
    assert result.exit_code == 2 and "did you mean 'warmup_epochs'?" in result.stderr, result
    result = cli("config", write_config(tmp_path), "model.hidden_size=[8]")
    assert "did you mean 'hidden_sizes'?" in result.stderr, result


# --------------------------------------------------------------------------- 5. CLI behaviour


@pytest.mark.parametrize("how", ["env", "flag"])
def test_debug_keeps_exit_codes(cli, tmp_path, monkeypatch, how):
    if how == "env":
        monkeypatch.setenv("TRAINKIT_DEBUG", "1")
        result = cli("config", write_config(tmp_path), "optim.lr=.inf")
    else:
        # the flag sets TRAINKIT_DEBUG for this process: recorded as unset first, so teardown
        # removes it (a delenv after the call would record "1" and restore it for later tests)
        monkeypatch.setenv("TRAINKIT_DEBUG", "0")
        result = cli("--debug", "config", write_config(tmp_path), "optim.lr=.inf")
    assert result.exit_code == 2 and "Traceback" in result.stderr, result


def test_debug_keeps_the_signal_exit_code(monkeypatch):
    import typer

    from trainkit.cli import _run
    from trainkit.errors import Interrupted

    monkeypatch.setenv("TRAINKIT_DEBUG", "yes")

    def stopped():
        raise Interrupted(15)

    with pytest.raises(typer.Exit) as info:
        _run(stopped, None)
    assert info.value.exit_code == 143


@pytest.mark.parametrize("value", ["False", "no", "off", "0", ""])
def test_debug_is_off_unless_asked(cli, tmp_path, monkeypatch, value):
    monkeypatch.setenv("TRAINKIT_DEBUG", value)
    result = cli("config", write_config(tmp_path), "optim.lr=.inf")
    assert result.exit_code == 2 and "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def test_names_are_data_not_markup(cli, run_dir, tmp_path):
    odd = tmp_path / "ev[" / "b]"
    shutil.copytree(run_dir, odd)
    result = cli("eval", tmp_path / "ev[" / "b]" / "checkpoints" / "best.pt")  # rich MarkupError before
    assert result.exit_code == 0 and "ev[/b]/checkpoints/best.pt" in result.stdout, result
    # class names such as '[red]' and escape codes: see the predict test below


def test_file_and_class_names_cannot_forge_prediction_lines(cli, best, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("good.png", "x.png\tdog\t0.9999\nfake.png"):
        Image.new("RGB", (16, 16), (200, 20, 20)).save(images / name, format="PNG")
    classes = ["\x1b]0;pwned\x07evil", "[red]"] + [f"c{i}" for i in range(8)]
    path = _tampered(best, tmp_path, classes=classes)
    result = cli("predict", images, "-c", path, "--topk", "10")
    assert result.exit_code == 0, result
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all(line.count("\t") == 3 for line in lines), lines
    assert "x.png\\tdog\\t0.9999\\nfake.png" in result.stdout
    assert "\x1b" not in result.stdout and "\\x1b]0;pwned\\x07evil" in result.stdout
    assert "[red]" in result.stdout


def test_predict_names_loops_and_fifos_and_goes_on(cli, best, tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(images / "sub" / "good.png")
    (images / "sub" / "loop").symlink_to(images, target_is_directory=True)
    (images / "self").symlink_to(images / "self")
    os.mkfifo(tmp_path / "fifo.png")

    from trainkit.predict import expand_inputs

    paths, errors = expand_inputs([str(tmp_path / "fifo.png"), str(images)])
    assert paths == [images / "sub" / "good.png"]
    assert any("fifo.png: not a regular file" in e for e in errors)
    assert any("symbolic link loop" in e for e in errors), errors

    result = cli("predict", images, "-c", best)
    assert result.exit_code == 1 and "good.png" in result.stdout, result
    assert "symbolic link loop" in result.stderr


def test_messages_blame_the_right_thing(cli, run_dir, best, tmp_path):
    import torch.backends.mps

    if not torch.backends.mps.is_available():
        result = cli("eval", best, "--device", "mps")
        assert result.exit_code == 1 and "MPS is not available" in result.stderr, result
    result = cli("predict", best, "-c", best, "--device", "foo")
    assert result.exit_code == 2 and "unknown device 'foo'" in result.stderr, result

    result = cli("eval", run_dir, "--json")  # a run directory means its best.pt
    assert result.exit_code == 0 and json.loads(result.stdout)["checkpoint"].endswith("best.pt"), result

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="JPEG")
    (tmp_path / "photo.jpg").write_bytes(buffer.getvalue())
    result = cli("eval", tmp_path / "photo.jpg")
    assert result.exit_code == 1, result
    assert result.stderr == f"error: {tmp_path / 'photo.jpg'}: not a torch checkpoint (a JPEG image)\n"


@pytest.mark.skipif(os.getuid() != 0, reason="planting another user's link needs root (lchown)")
def test_saves_never_pass_through_another_users_link(cli, tmp_path):
    """`eval --save shared/link/sub` created `sub` inside the link's target: a link planted by
    another user on the way is refused before anything is created; one's own links are followed."""
    assert cli("train", write_config(tmp_path)).exit_code == 0
    checkpoint = tmp_path / "runs" / "tiny" / "checkpoints" / "best.pt"
    target, shared = tmp_path / "victim", tmp_path / "shared"
    target.mkdir()
    shared.mkdir()
    (shared / "link").symlink_to(target)
    os.lchown(shared / "link", 4242, 4242)
    result = cli("eval", checkpoint, "--save", shared / "link" / "sub")
    assert result.exit_code == 1 and "symbolic link of another user" in result.stderr, result
    assert list(target.iterdir()) == []
    report = cli("report", tmp_path / "runs" / "tiny", "-o", shared / "link" / "r.html")
    assert report.exit_code != 0 and list(target.iterdir()) == [], report
    own = tmp_path / "mine"
    own.symlink_to(target)  # the user's own link: followed
    assert cli("eval", checkpoint, "--save", own / "sub").exit_code == 0
    assert (target / "sub" / "eval.json").is_file()


def test_a_folder_walk_names_special_files_and_does_not_walk_the_machine(cli, best, tmp_path):
    # A FIFO or a link to a device in a folder would block or never end a reader; a link to
    # / or /proc would walk the whole machine. Each is named (escaped) and skipped; a link to
    # any other folder (class folders linked into a shared store) is followed.
    images, store = tmp_path / "images", tmp_path / "store"
    (images / "inside").mkdir(parents=True)
    store.mkdir()
    Image.new("RGB", (16, 16)).save(images / "inside" / "good.png")
    Image.new("RGB", (16, 16)).save(store / "shared.png")
    os.mkfifo(images / "pipe\x1b[31m.png")
    (images / "zero.png").symlink_to("/dev/zero")
    (images / "machine").symlink_to("/", target_is_directory=True)
    (images / "kernel").symlink_to("/proc", target_is_directory=True)
    (images / "linked").symlink_to(store, target_is_directory=True)

    from trainkit.data.preprocess import image_files

    problems: list[str] = []
    found = [os.path.relpath(path, images) for path, _, _ in image_files(str(images), problems)]
    assert found == ["inside/good.png", "linked/shared.png"], found
    assert any("zero.png: not a regular file" in p for p in problems), problems
    assert any("pipe\x1b[31m.png: not a regular file" in p for p in problems), problems
    assert any("machine: a link to /, not followed" in p for p in problems), problems
    assert any("kernel: a link to /proc, not followed" in p for p in problems), problems

    result = cli("predict", images, "-c", best)
    assert result.exit_code == 1 and "good.png" in result.stdout and "shared.png" in result.stdout, result
    assert "pipe\\x1b[31m.png: not a regular file" in result.stderr and "\x1b" not in result.stderr
    assert "machine: a link to /, not followed" in result.stderr


def test_a_csv_row_naming_a_fifo_is_skipped_not_waited_on(tmp_path):
    # the header probe (size and channels unset) opened every sampled file with PIL: a FIFO
    # listed in the CSV blocked train and inspect forever
    import subprocess
    import sys

    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp_path / "b.png")
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "train.csv").write_text("path,label\nfifo.png,x\na.png,x\nb.png,y\n")
    config = write_config(
        tmp_path,
        {"data": {"name": "csv", "root": str(tmp_path), "train_csv": "train.csv", "skip_bad_images": True}},
    )
    done = subprocess.run(
        [sys.executable, "-m", "trainkit", "inspect", str(config)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "fifo.png is not a regular file" in done.stderr, done


def test_a_file_swapped_for_a_fifo_after_the_listing_is_an_error_not_a_hang(tmp_path):
    import subprocess
    import sys

    os.mkfifo(tmp_path / "late.png")
    code = (
        "from trainkit.data.preprocess import decode_image\n"
        "from trainkit.errors import TrainkitError\n"
        "try:\n    decode_image('late.png', 3, 16)\nexcept TrainkitError as e:\n    print(e)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.stdout.strip() == "late.png: not a regular file, skipped", done


def test_names_that_are_not_utf8_do_not_cost_the_csv(cli, best, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (16, 16)).save(images / "ok.png")
    Image.new("RGB", (16, 16)).save(os.path.join(os.fsencode(images), b"bad_\xff.png"))
    out, jsonl = tmp_path / "p.csv", tmp_path / "p.jsonl"
    for target in (out, jsonl):
        result = cli("predict", images, "-c", best, "--out", target)
        assert result.exit_code == 0, result
    rows = out.read_text(encoding="utf-8").splitlines()  # valid UTF-8
    assert len(rows) == 3 and any("bad_\\udcff.png" in row for row in rows), rows  # as on screen
    paths = [json.loads(line)["path"] for line in jsonl.read_text().splitlines()]
    assert os.path.join(os.fsencode(images), b"bad_\xff.png") in [os.fsencode(p) for p in paths]


def test_a_predict_summary_line_escapes_the_names_it_was_given(cli, best, tmp_path):
    image = tmp_path / "x.png"
    Image.new("RGB", (16, 16)).save(image)
    out = tmp_path / "\x1b[2Jred.csv"
    result = cli("predict", image, "-c", best, "--out", out)
    assert result.exit_code == 0 and out.exists(), result
    assert "\x1b" not in result.stderr and "\\x1b[2Jred.csv" in result.stderr


def test_decode_workers_die_with_their_parent(tmp_path):
    # a worker busy with a slow image kept decoding for ~45 s after its parent was killed,
    # holding the caller's pipes open; now the kernel kills it with the parent (Linux)
    import signal
    import subprocess
    import sys
    import time

    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    script = tmp_path / "parent.py"
    script.write_text(
        "import os, sys, time, torch\n"
        "from trainkit.data.workers import worker_options\n"
        "class Slow(torch.utils.data.Dataset):\n"
        "    def __len__(self): return 4\n"
        "    def __getitem__(self, i):\n"
        "        open(f'worker-{os.getpid()}', 'w').close()\n"
        "        time.sleep(3600)\n"
        "loader = torch.utils.data.DataLoader(Slow(), num_workers=1, **worker_options(1))\n"
        "next(iter(loader))\n"
    )
    parent = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path)
    try:
        while not list(tmp_path.glob("worker-*")):  # the worker is inside a slow item
            assert parent.poll() is None, "the parent ended before its worker started"
            time.sleep(0.05)
        worker = int(next(tmp_path.glob("worker-*")).name.split("-")[1])
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()

    def alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except FileNotFoundError:
            return False

    for _ in range(1200):  # up to a minute: without the fix it sleeps for an hour
        if not alive(worker):
            break
        time.sleep(0.05)
    outlived = alive(worker)
    if outlived:
        os.kill(worker, signal.SIGKILL)
    assert not outlived, "the worker outlived its parent"


def test_loader_workers_refuse_batches_that_do_not_fit_shared_memory(cli, tmp_path, monkeypatch):
    # a batch that does not fit /dev/shm made the worker drop it and training wait forever
    from trainkit.data import workers

    class Small:
        f_bavail, f_frsize = 16, 4096  # 64 kB free

    monkeypatch.setattr(workers.os, "statvfs", lambda path: Small())
    folder = tmp_path / "data"
    for split in ("train", "val"):
        for label in ("a", "b"):
            (folder / split / label).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(folder / split / label / f"{i}.png")
    config = write_config(
        tmp_path,
        {
            "data": {"name": "imagefolder", "root": str(folder), "cache": "none", "num_workers": 2},
            "train": {"epochs": 1},
        },
    )
    result = cli("train", config)
    assert result.exit_code != 0, result
    assert "data.num_workers: the batches in flight need" in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "need ~196.6 kB of shared memory and /dev/shm has 65.5 kB free" in errors[0]
