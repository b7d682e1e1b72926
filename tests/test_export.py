"""`trainkit export`: every format on LeNet, a 1-channel MLP and a torchvision model with
BatchNorm, each loaded back by its own runtime and checked for logit parity; predict from .onnx."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
import torch
from conftest import TINY, Result, deep_merge, write_config
from PIL import Image
from typer.testing import CliRunner

from trainkit.cli import app
from trainkit.data.synthetic import CLASSES
from trainkit.errors import TrainkitError
from trainkit.export import (
    FORMATS,
    SUFFIXES,
    parity_images,
    read_onnx_model,
    read_safetensors_bundle,
    sidecar_path,
)

MODELS = {
    "lenet": {"model": {"name": "lenet"}},
    "mlp_gray": {"model": {"name": "mlp", "hidden_sizes": [16]}, "data": {"channels": 1}},
    "resnet18": {"model": {"name": "torchvision.resnet18"}},
}
BAKED = ("--with-preprocess", "--opset", "18")  # LeNet's ONNX export takes uint8, at opset 18
SMALL = {
    "data": {"synthetic": {"train_size": 64, "test_size": 32, "image_size": 16}},
    "train": {"epochs": 1},
    "log": {"tensorboard": False},
}


def config_for(folder, model: str):
    """TINY made smaller, with the model section replaced (not merged) by the model's own."""
    base = {**deep_merge(TINY, SMALL), "model": MODELS[model]["model"]}
    return write_config(folder, {k: v for k, v in MODELS[model].items() if k != "model"}, base=base)


def invoke(*args) -> Result:
    return Result(CliRunner().invoke(app, [str(a) for a in args]))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """model name → its best.pt, each trained once for the module."""
    root = tmp_path_factory.mktemp("export")
    paths = {}
    for name in MODELS:
        folder = root / name
        folder.mkdir()
        config = config_for(folder, name)
        result = invoke("train", config)
        assert result.exit_code == 0, result
        paths[name] = folder / "runs" / "tiny" / "checkpoints" / "best.pt"
    return paths


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """exported(model, fmt, *options) → (CLI result, file): each export runs once per module."""
    root = tmp_path_factory.mktemp("exported")
    done = {}

    def get(model: str, fmt: str, *options: str):
        key = (model, fmt, *options)
        if key not in done:
            out = root / f"{model}-{len(done)}{SUFFIXES[fmt]}"
            done[key] = (
                invoke("export", trained[model], "--format", fmt, "-o", out, "-n", "16", *options),
                out,
            )
        return done[key]

    return get


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_format_is_written_and_equal(trained, exported, model, fmt):
    result, out = exported(model, fmt, *(BAKED if (model, fmt) == ("lenet", "onnx") else ()))
    assert result.exit_code == 0, result
    assert "16 images from the checkpoint's validation data" in result.stdout
    assert "top-1 agreement 16/16 (100.0%)" in result.stdout and "ok: within tolerance" in result.stdout
    difference = float(result.stdout.split("max abs logit difference ")[1].split(",")[0])
    assert difference <= 1e-4
    assert out.is_file() and not list(out.parent.glob(".*tmp*"))
    if fmt == "onnx":
        proto = onnx.load(str(out))
        props = {p.key: json.loads(p.value) for p in proto.metadata_props}
        assert props["classes"] == list(CLASSES)
        assert props["channels"] == (1 if model == "mlp_gray" else 3) and props["image_size"] == 16
        assert props["model_spec"]["name"] == MODELS[model]["model"]["name"]
        assert proto.opset_import[0].version == (18 if model == "lenet" else 20)
        assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch axis
    if fmt == "trainkit":
        slim = torch.load(out, weights_only=True)
        assert "optimizer" not in slim and "rng" not in slim and "scheduler" not in slim
        assert out.stat().st_size < trained[model].stat().st_size  # the momentum buffers are gone
        original = torch.load(trained[model], weights_only=True)
        assert all(torch.equal(slim["model"][k], original["model"][k]) for k in original["model"])


def test_onnx_with_preprocess_takes_uint8_and_opset_is_configurable(trained, exported, tmp_path):
    result, out = exported("lenet", "onnx", *BAKED)
    assert result.exit_code == 0, result
    assert "top-1 agreement 16/16" in result.stdout
    _, meta = read_onnx_model(out)
    assert meta["input_dtype"] == "uint8"
    proto = onnx.load(str(out))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert proto.opset_import[0].version == 18
    bad = invoke("export", trained["lenet"], "-f", "onnx", "--opset", "7", "-o", tmp_path / "x.onnx")
    assert bad.exit_code == 2 and "--opset" in bad.stderr


@pytest.mark.parametrize("fmt", ["torchscript", "safetensors", "trainkit"])
def test_a_perturbed_export_fails_parity_and_is_kept(trained, tmp_path, monkeypatch, fmt):
    import trainkit.export as export

    real = export.model_to_export

    def perturbed(*args, **kwargs):
        model = real(*args, **kwargs)  # a copy: the reference stays as trained
        with torch.no_grad():
            next(iter(model.parameters())).add_(1e-2)
        return model

    monkeypatch.setattr(export, "model_to_export", perturbed)
    out = tmp_path / f"bad.{fmt}"
    result = invoke("export", trained["mlp_gray"], "-f", fmt, "-o", out, "-n", "8")
    assert result.exit_code == 1, result
    assert "parity check failed" in result.stderr and str(out) in result.stderr
    assert result.stderr.count("\n") == 1
    assert out.is_file()  # kept for inspection


def test_a_tampered_onnx_file_fails_parity(trained, exported, tmp_path):
    from onnx import numpy_helper

    from trainkit.checkpoint import build_model_from_checkpoint, load_checkpoint
    from trainkit.data.preprocess import Preprocess
    from trainkit.export import check_parity, torch_classifier

    proto = onnx.load(str(exported("mlp_gray", "onnx")[1]))
    weight = max(proto.graph.initializer, key=lambda t: np.prod(t.dims))
    values = numpy_helper.to_array(weight) + np.float32(1e-3)
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    tampered = tmp_path / "tampered.onnx"
    tampered.write_bytes(proto.SerializeToString())
    state = load_checkpoint(trained["mlp_gray"])
    reference = torch_classifier(
        build_model_from_checkpoint(state).eval(), Preprocess.from_dict(state["preprocess"]), state["classes"]
    )
    result = check_parity(state, reference, "onnx", tampered, num_images=8)
    assert not result.passed and result.max_abs_diff > 1e-3
    assert check_parity(state, reference, "onnx", exported("mlp_gray", "onnx")[1], num_images=8).passed


def test_predict_from_onnx_equals_the_checkpoint(trained, exported, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        size = (12 + i, 20)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    plain = exported("resnet18", "onnx")[1]
    baked = exported("lenet", "onnx", *BAKED)[1]

    def records(checkpoint):
        result = invoke("predict", folder, "-c", checkpoint, "--json", "-k", "3")
        assert result.exit_code == 0, result
        return [json.loads(line) for line in result.stdout.splitlines()]

    for model, onnx_file in (("resnet18", plain), ("lenet", baked)):
        expected, got = records(trained[model]), records(onnx_file)
        assert len(expected) == 6
        assert [r["path"] for r in got] == [r["path"] for r in expected]
        for a, b in zip(got, expected):
            assert [t["label"] for t in a["topk"]] == [t["label"] for t in b["topk"]]
            assert a["prob"] == pytest.approx(b["prob"], abs=1e-5)
    text = invoke("predict", folder / "0.png", "-c", plain)
    assert text.exit_code == 0 and text.stdout.count("\t") == 2  # same plain format as a checkpoint


def _rewrite_metadata(source, target, **changes):
    proto = onnx.load(str(source))
    props = {p.key: p.value for p in proto.metadata_props}
    for key, value in changes.items():
        if value is None:
            props.pop(key, None)
        else:
            props[key] = value if isinstance(value, str) else json.dumps(value)
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    target.write_bytes(proto.SerializeToString())
    return target


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"classes": ["a", "b"]}, "2 classes in the metadata but the model has 10 outputs"),
        ({"classes": [1, 2, 3]}, "list of 1..100000 non-empty strings"),
        ({"classes": "{not json"}, "metadata is not JSON"),
        ({"std": [0.0]}, "std > 0"),
        ({"channels": 3}, "mean/std must be finite, one per channel"),
        ({"image_size": 10**9}, "image size out of range"),
        ({"trainkit_export": None}, "no trainkit metadata"),
        ({"input_dtype": '"uint8"'}, "input is not N×1×16×16 uint8"),
    ],
)
def test_hostile_onnx_metadata_is_refused(exported, tmp_path, changes, message):
    good = exported("mlp_gray", "onnx")[1]
    bad = _rewrite_metadata(good, tmp_path / "bad.onnx", **changes)
    with pytest.raises(TrainkitError, match=message):
        read_onnx_model(bad)
    result = invoke("predict", "x.png", "-c", bad)
    assert result.exit_code == 1 and message.split("(")[0][:20] in result.stderr


def test_onnx_with_external_data_is_refused(exported, tmp_path):
    proto = onnx.load(str(exported("mlp_gray", "onnx")[1]))
    outside = tmp_path / "model.onnx"
    onnx.save_model(proto, str(outside), save_as_external_data=True, location="weights.bin", size_threshold=0)
    with pytest.raises(TrainkitError, match="external data"):
        read_onnx_model(outside)


def test_broken_onnx_files_are_one_line_errors(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07garbage" * 10)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    for path in (junk, empty):
        result = invoke("predict", "x.png", "-c", path)
        assert result.exit_code == 1 and result.stderr.count("\n") == 1, result


def test_output_through_a_symlink_or_over_the_checkpoint_is_refused(trained, tmp_path):
    target = tmp_path / "elsewhere.onnx"
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)
    result = invoke("export", trained["mlp_gray"], "-f", "safetensors", "-o", link)
    assert result.exit_code == 1 and "symlink" in result.stderr
    assert not target.exists()
    same = invoke("export", trained["mlp_gray"], "-f", "trainkit", "-o", trained["mlp_gray"])
    assert same.exit_code == 1 and "is the checkpoint being exported" in same.stderr


@pytest.mark.parametrize("package", ["onnx", "onnxruntime", "onnxscript"])
def test_missing_runtime_names_the_extra(trained, tmp_path, monkeypatch, package):
    monkeypatch.setitem(sys.modules, package, None)  # import fails as if not installed
    result = invoke("export", trained["lenet"], "-f", "onnx", "-o", tmp_path / "m.onnx")
    assert result.exit_code == 1
    assert "pip install 'trainkit[export]'" in result.stderr and result.stderr.count("\n") == 1


def test_safetensors_bundle_reads_back_and_a_tampered_sidecar_is_refused(trained, tmp_path):
    out = tmp_path / "w.safetensors"
    assert invoke("export", trained["lenet"], "-f", "safetensors", "-o", out, "-n", "2").exit_code == 0
    weights, meta = read_safetensors_bundle(out)
    original = torch.load(trained["lenet"], weights_only=True)
    assert weights.keys() == original["model"].keys()
    assert meta["model_spec"] == original["model_spec"] and meta["classes"] == original["classes"]
    sidecar = sidecar_path(out)
    sidecar.write_text(json.dumps({**meta, "preprocess": {"channels": 3}}))
    with pytest.raises(TrainkitError, match="preprocess"):
        read_safetensors_bundle(out)
    sidecar.unlink()
    with pytest.raises(TrainkitError, match="no such file"):
        read_safetensors_bundle(out)


def test_slim_checkpoint_evaluates_the_same_and_refuses_resume(trained, tmp_path):
    slim = tmp_path / "slim.pt"
    assert invoke("export", trained["lenet"], "-f", "trainkit", "-o", slim, "-n", "2").exit_code == 0
    full = invoke("eval", trained["lenet"], "--json")
    small = invoke("eval", slim, "--json")
    assert small.exit_code == 0, small
    a, b = json.loads(full.stdout), json.loads(small.stdout)
    assert a["loss"] == b["loss"] and a["accuracy"] == b["accuracy"]
    config = config_for(tmp_path, "lenet")
    resumed = invoke("train", config, slim, "--resume")
    assert resumed.exit_code == 1 and "slim checkpoint" in resumed.stderr


def test_unknown_format_lists_the_choices(trained, tmp_path):
    result = invoke("export", trained["lenet"], "-f", "onx")
    assert result.exit_code == 2 and "did you mean 'onnx'" in result.stderr
    result = invoke("export", trained["lenet"], "-f", "safetensors", "--opset", "18")
    assert result.exit_code == 2 and "--opset: applies to onnx only" in result.stderr


def test_generated_images_when_the_data_is_gone(trained, tmp_path):
    state = torch.load(trained["lenet"], weights_only=True)
    state["config"]["data"].update(name="imagefolder", root=str(tmp_path / "gone"))
    images, source = parity_images(state, None, 8)
    assert images.shape == (8, 3, 16, 16) and images.dtype == torch.uint8
    assert source == "8 generated images (the checkpoint's data was not found)"
    state["config"]["data"].update(name="cifar10", root=str(tmp_path / "cifar"), download=True)
    assert "generated" in parity_images(state, None, 8)[1]
    assert not (tmp_path / "cifar").exists()  # a checkpoint's config never starts a download
    found, source = parity_images(torch.load(trained["lenet"], weights_only=True), None, 8)
    assert "validation data" in source and not torch.equal(found, images)
