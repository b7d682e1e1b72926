"""`trainkit export`: a checkpoint as ONNX, TorchScript, safetensors or a slim checkpoint, each
loaded back by its own runtime and checked against the original model before it is declared good.

Every format carries the same metadata (model spec, classes, preprocessing, input dtype), built in
one place (`export_metadata`) and read back, validated as data, by `read_onnx_model` and
`read_safetensors_bundle`. onnx, onnxruntime and onnxscript come from the `export` extra; they are
imported only where needed, so the other formats and the rest of trainkit work without them.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainkit.checkpoint import (
    REQUIRED_KEYS,
    atomic_write,
    build_model_from_checkpoint,
    load_checkpoint,
)
from trainkit.data.preprocess import Preprocess
from trainkit.errors import ConfigError, TrainkitError

FORMATS = ("onnx", "torchscript", "safetensors", "trainkit")
# Default file next to the checkpoint: best.pt -> best.onnx, best.torchscript, best.safetensors,
# best.slim.pt. TorchScript is not named .pt: trainkit refuses to load it as a checkpoint.
SUFFIXES = {
    "onnx": ".onnx",
    "torchscript": ".torchscript",
    "safetensors": ".safetensors",
    "trainkit": ".slim.pt",
}
EXPORT_VERSION = 1
DEFAULT_OPSET = 20  # torch's dynamo exporter's own default; onnxruntime >= 1.17 runs it
MIN_OPSET = 18  # the dynamo exporter emits opset 18 ops; lower ones need a lossy down-conversion
DEFAULT_TOLERANCE = 1e-4  # max |logit difference| for fp32
DEFAULT_PARITY_IMAGES = 64
MAX_PARITY_IMAGES = 4096
# Bounds on files read back as data (an .onnx handed to predict may come from anywhere).
MAX_ONNX_BYTES = 2**31 - 1  # protobuf's own limit for one message
MAX_METADATA_CHARS = 4_000_000
MAX_CLASSES = 100_000
MAX_CLASS_NAME_CHARS = 1_000
MAX_IMAGE_SIZE = 8192
INPUT_NAME, OUTPUT_NAME = "images", "logits"
INPUT_DTYPES = ("float32", "uint8")
# Checkpoint keys the slim checkpoint keeps: what eval and predict read, plus the run's record.
SLIM_KEYS = (*REQUIRED_KEYS, "epoch", "global_step", "best_metric", "best_epoch", "monitor", "metrics")
EXTRA_HINT = "pip install 'trainkit[export]'"


def require_export_extra(*modules: str) -> None:
    """One line naming what to install when an export runtime is missing."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise TrainkitError(
                f"the {name} package is needed for this; install it with: {EXTRA_HINT}"
            ) from error


# --------------------------------------------------------------------------- metadata


def export_metadata(state: dict[str, Any], input_dtype: str = "float32") -> dict[str, Any]:
    """The facts every exported file carries, as plain JSON-able data."""
    preprocess = Preprocess.from_dict(state["preprocess"])
    return {
        "trainkit_export": EXPORT_VERSION,
        "model_spec": dict(state["model_spec"]),
        "classes": [str(name) for name in state["classes"]],
        "preprocess": preprocess.to_dict(),
        "input_dtype": input_dtype,  # uint8: normalisation is inside the model
    }


def _fail(where: str, message: str) -> TrainkitError:
    return TrainkitError(f"{where}: {message}")


def check_metadata(meta: Any, where: str, num_outputs: int | None = None) -> dict[str, Any]:
    """Validate metadata read from a file (untrusted) → a clean dict, or one-line TrainkitError."""
    if not isinstance(meta, dict):
        raise _fail(where, "metadata is not a JSON object")
    version = meta.get("trainkit_export")
    if not isinstance(version, int) or isinstance(version, bool):
        raise _fail(where, "no trainkit export metadata (trainkit_export version)")
    if version > EXPORT_VERSION:
        raise _fail(where, f"export format {version} is newer than this trainkit reads ({EXPORT_VERSION})")
    classes = meta.get("classes")
    if (
        not isinstance(classes, list)
        or not classes
        or len(classes) > MAX_CLASSES
        or not all(isinstance(c, str) and 0 < len(c) <= MAX_CLASS_NAME_CHARS for c in classes)
    ):
        raise _fail(where, f"metadata 'classes' must be a list of 1..{MAX_CLASSES} non-empty strings")
    if num_outputs is not None and len(classes) != num_outputs:
        raise _fail(where, f"{len(classes)} classes in the metadata but the model has {num_outputs} outputs")
    raw = meta.get("preprocess")
    try:
        preprocess = Preprocess.from_dict(raw)
    except (TypeError, KeyError, ValueError) as error:
        raise _fail(where, f"metadata 'preprocess' is malformed ({type(error).__name__})") from error
    if preprocess.channels not in (1, 3) or not 1 <= preprocess.image_size <= MAX_IMAGE_SIZE:
        raise _fail(where, "metadata 'preprocess' has channels outside 1/3 or an image size out of range")
    stats = (*preprocess.mean, *preprocess.std)
    if (
        len(preprocess.mean) != preprocess.channels
        or len(preprocess.std) != preprocess.channels
        or not all(math.isfinite(v) for v in stats)
        or min(preprocess.std) <= 0
    ):
        raise _fail(where, "metadata 'preprocess' mean/std must be finite, one per channel, std > 0")
    if meta.get("input_dtype") not in INPUT_DTYPES:
        raise _fail(where, f"metadata 'input_dtype' must be one of {', '.join(INPUT_DTYPES)}")
    spec = meta.get("model_spec")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise _fail(where, "metadata 'model_spec' must be an object with a 'name'")
    return {
        "trainkit_export": version,
        "model_spec": spec,
        "classes": list(classes),
        "preprocess": preprocess.to_dict(),
        "input_dtype": meta["input_dtype"],
    }


# --------------------------------------------------------------------------- models


class WithPreprocess(nn.Module):
    """uint8 (N, C, H, W) in, logits out: the normalisation is part of the graph."""

    def __init__(self, model: nn.Module, preprocess: Preprocess):
        super().__init__()
        self.model = model
        scale = torch.tensor([1.0 / (255.0 * s) for s in preprocess.std]).view(1, -1, 1, 1)
        shift = torch.tensor([m / s for m, s in zip(preprocess.mean, preprocess.std)]).view(1, -1, 1, 1)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("shift", shift, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # the same arithmetic as Preprocess.normalize, so the two agree to the last bit
        return self.model(torch.addcmul(-self.shift, images.float(), self.scale))


def model_to_export(original: nn.Module, state: dict[str, Any], with_preprocess: bool) -> nn.Module:
    """The eval-mode model that goes into the file (CPU, fp32): a copy of the original, which
    stays untouched as the parity check's reference."""
    model = copy.deepcopy(original).float().eval()
    if with_preprocess:
        model = WithPreprocess(model, Preprocess.from_dict(state["preprocess"])).eval()
    return model


def _example_input(preprocess: Preprocess, batch: int, dtype: str) -> torch.Tensor:
    shape = (batch, preprocess.channels, preprocess.image_size, preprocess.image_size)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    return images if dtype == "uint8" else preprocess.normalize(images)


# --------------------------------------------------------------------------- writers


def check_output_path(path: Path) -> None:
    """Refuse to write through a symlink, into a missing folder, or over a folder."""
    if path.is_symlink():
        raise TrainkitError(f"{path}: is a symlink; refusing to write through it")
    if path.exists() and not path.is_file():
        raise TrainkitError(f"{path}: exists and is not a file")
    if not path.parent.is_dir():
        raise TrainkitError(f"{path.parent}: no such folder")


def write_bytes(path: Path, data: bytes) -> None:
    check_output_path(path)
    try:
        atomic_write(path, lambda handle: handle.write(data))
    except OSError as error:
        raise TrainkitError(f"could not write {path}: {error.strerror or error}") from error


def _onnx_bytes(model: nn.Module, example: torch.Tensor, meta: dict[str, Any], opset: int) -> bytes:
    require_export_extra("onnx", "onnxscript")
    if tuple(int(part) for part in torch.__version__.split(".")[:2]) < (2, 6):
        raise TrainkitError(
            f"ONNX export needs torch >= 2.6 (its dynamo exporter); this is {torch.__version__}"
        )
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                (example,),
                None,
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},),
                opset_version=opset,
                external_data=False,
                verbose=False,
            )
    except ImportError as error:
        raise TrainkitError(f"the ONNX exporter needs newer packages ({error}); {EXTRA_HINT}") from error
    except Exception as error:  # noqa: BLE001 - the exporter raises many types; one line for the user
        first = (str(error).strip().splitlines() or [""])[0][:300]
        raise TrainkitError(f"ONNX export failed: {type(error).__name__}: {first}") from error
    proto = program.model_proto
    proto.producer_name = "trainkit"
    del proto.metadata_props[:]
    for key, value in onnx_metadata_props(meta).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


def onnx_metadata_props(meta: dict[str, Any]) -> dict[str, str]:
    """One JSON value per key, so any ONNX runtime can read `classes` or `mean` on its own."""
    preprocess = meta["preprocess"]
    return {
        "trainkit_export": json.dumps(meta["trainkit_export"]),
        "classes": json.dumps(meta["classes"]),
        "mean": json.dumps(preprocess["mean"]),
        "std": json.dumps(preprocess["std"]),
        "image_size": json.dumps(preprocess["image_size"]),
        "channels": json.dumps(preprocess["channels"]),
        "model_spec": json.dumps(meta["model_spec"]),
        "input_dtype": json.dumps(meta["input_dtype"]),
    }


def _torchscript_bytes(model: nn.Module, example: torch.Tensor, meta: dict[str, Any]) -> bytes:
    with warnings.catch_warnings():  # torch >= 2.10 marks torch.jit as deprecated; it still works
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (example,), check_trace=False)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer, _extra_files={"trainkit.json": json.dumps(meta)})
    return buffer.getvalue()


def _plain_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    # contiguous copies: safetensors refuses shared or strided storage
    return {key: value.detach().contiguous().clone() for key, value in model.state_dict().items()}


def sidecar_path(path: str | Path) -> Path:
    """model.safetensors → model.json (model spec, classes, preprocessing)."""
    path = Path(path)
    return (
        path.with_name(path.name[: -len(".safetensors")] + ".json")
        if path.name.endswith(".safetensors")
        else path.with_name(path.name + ".json")
    )


def read_safetensors_bundle(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, metadata) from `model.safetensors` and its `model.json` sidecar; the one
    reader of this format, for `model.init` and for export's parity check. Nothing runs code:
    safetensors holds only tensors and the sidecar is JSON, validated here."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    sidecar = sidecar_path(path)
    for needed in (path, sidecar):
        if not needed.is_file():
            raise TrainkitError(
                f"{needed}: no such file (a safetensors export is the .safetensors and .json)"
            )
    if sidecar.stat().st_size > MAX_METADATA_CHARS:
        raise _fail(str(sidecar), "sidecar too large")
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise _fail(str(sidecar), f"not JSON ({type(error).__name__})") from error
    meta = check_metadata(meta, str(sidecar))
    try:
        weights = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise _fail(str(path), f"cannot read safetensors ({str(error).splitlines()[0][:200]})") from error
    return weights, meta


def build_model_from_bundle(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A fresh model with the safetensors bundle's weights, in eval mode."""
    from trainkit.models import build_model

    weights, meta = read_safetensors_bundle(path)
    model = build_model(dict(meta["model_spec"]))
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        raise _fail(str(path), f"weights do not fit the model: {str(error).splitlines()[0]}") from error
    return model.eval(), meta


def _slim_state(state: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    slim = {key: state[key] for key in SLIM_KEYS if key in state}
    slim["model"] = _plain_weights(model)
    return slim


# --------------------------------------------------------------------------- reading back


def read_onnx_model(path: str | Path) -> tuple[bytes, dict[str, Any]]:
    """(model bytes, validated metadata) of an .onnx file, read once and bounded: no external
    data (it would make the runtime read other files), one N×C×H×W input matching the metadata,
    one (N, classes) output."""
    require_export_extra("onnx")
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise TrainkitError(f"{path}: no such file")
    size = path.stat().st_size
    if size == 0 or size > MAX_ONNX_BYTES:
        raise _fail(str(path), f"{size} bytes: not a usable ONNX model")
    data = path.read_bytes()
    try:
        proto = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as error:
        raise _fail(str(path), f"not an ONNX model ({type(error).__name__})") from error
    graph = proto.graph
    from onnx.external_data_helper import _get_all_tensors  # initializers, attributes, subgraphs

    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in _get_all_tensors(proto)):
        raise _fail(str(path), "refers to external data files; refused")
    props = {}
    for entry in proto.metadata_props:
        if len(entry.value) > MAX_METADATA_CHARS:
            raise _fail(str(path), f"metadata '{entry.key[:40]}' too large")
        props[entry.key] = entry.value
    try:
        raw = {key: json.loads(props[key]) for key in onnx_metadata_props_keys() if key in props}
    except (ValueError, RecursionError) as error:
        raise _fail(str(path), "metadata is not JSON") from error
    if "trainkit_export" not in raw:
        raise _fail(str(path), "no trainkit metadata in the ONNX file (export it with `trainkit export`)")
    meta = {
        "trainkit_export": raw.get("trainkit_export"),
        "classes": raw.get("classes"),
        "model_spec": raw.get("model_spec"),
        "input_dtype": raw.get("input_dtype"),
        "preprocess": {k: raw.get(k) for k in ("channels", "image_size", "mean", "std")},
    }
    inputs = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise _fail(str(path), "expected one input and one output")
    out_dims = graph.output[0].type.tensor_type.shape.dim
    num_outputs = out_dims[-1].dim_value if len(out_dims) == 2 and out_dims[-1].dim_value else None
    meta = check_metadata(meta, str(path), num_outputs)
    preprocess = Preprocess.from_dict(meta["preprocess"])
    in_type = inputs[0].type.tensor_type
    want_type = onnx.TensorProto.UINT8 if meta["input_dtype"] == "uint8" else onnx.TensorProto.FLOAT
    dims = [d.dim_value if d.dim_value else None for d in in_type.shape.dim]
    want = [preprocess.channels, preprocess.image_size, preprocess.image_size]
    if in_type.elem_type != want_type or len(dims) != 4 or dims[1:] != want:
        raise _fail(
            str(path), f"the model's input is not N×{want[0]}×{want[1]}×{want[2]} {meta['input_dtype']}"
        )
    return data, meta


def onnx_metadata_props_keys() -> tuple[str, ...]:
    return (
        "trainkit_export",
        "classes",
        "mean",
        "std",
        "image_size",
        "channels",
        "model_spec",
        "input_dtype",
    )


@dataclass
class Classifier:
    """What predict and the parity check need: preprocessing, classes, and uint8 → logits."""

    preprocess: Preprocess
    classes: list[str]
    run: Callable[[torch.Tensor], torch.Tensor]  # uint8 (B, C, H, W) → float (B, K)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.run(images)


def onnx_classifier(path: str | Path, threads: int | None = None) -> Classifier:
    """An .onnx file run by onnxruntime on the CPU, preprocessing from the file's metadata."""
    data, meta = read_onnx_model(path)
    require_export_extra("onnxruntime")
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initializers are not the user's business
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise _fail(str(path), f"onnxruntime cannot load it ({str(error).splitlines()[0][:200]})") from error
    preprocess = Preprocess.from_dict(meta["preprocess"])
    classes = meta["classes"]
    uint8_input = meta["input_dtype"] == "uint8"

    def run(images: torch.Tensor) -> torch.Tensor:
        feed = images.cpu() if uint8_input else preprocess.normalize(images.cpu())
        (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: feed.numpy()})
        if logits.ndim != 2 or logits.shape != (images.shape[0], len(classes)):
            raise _fail(str(path), f"the model returned shape {tuple(logits.shape)}")
        return torch.from_numpy(logits)

    return Classifier(preprocess, classes, run)


def torch_classifier(model: nn.Module, preprocess: Preprocess, classes: list[str], uint8_input=False):
    device = next(iter(model.parameters()), torch.empty(0)).device

    def run(images: torch.Tensor) -> torch.Tensor:
        images = images.to(device)
        with torch.inference_mode():
            images = preprocess.center_crop(images)  # resize=crop: stored squares → the model's size
            return model(images if uint8_input else preprocess.normalize(images)).float()

    return Classifier(preprocess, classes, run)


def load_exported(fmt: str, path: Path) -> Classifier:
    """The exported file loaded back by its own runtime."""
    if fmt == "onnx":
        return onnx_classifier(path)
    if fmt == "torchscript":
        # our own file, just written: loading TorchScript is fine here (never as a checkpoint)
        extra = {"trainkit.json": ""}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        try:
            raw = json.loads(extra["trainkit.json"])
        except ValueError as error:
            raise _fail(str(path), "no trainkit metadata in the TorchScript archive") from error
        meta = check_metadata(raw, str(path))
        preprocess = Preprocess.from_dict(meta["preprocess"])
        return torch_classifier(module.eval(), preprocess, meta["classes"], meta["input_dtype"] == "uint8")
    if fmt == "safetensors":
        model, meta = build_model_from_bundle(path)
        return torch_classifier(model, Preprocess.from_dict(meta["preprocess"]), meta["classes"])
    state = load_checkpoint(path)
    model = build_model_from_checkpoint(state, path).eval()
    return torch_classifier(model, Preprocess.from_dict(state["preprocess"]), list(state["classes"]))


# --------------------------------------------------------------------------- parity images


def parity_images(
    state: dict[str, Any], image_paths: list[str] | None, count: int
) -> tuple[torch.Tensor, str]:
    """uint8 (N, C, H, W) images for the parity check and where they came from: the files
    given, else the checkpoint's own validation split when its data can be found, else
    generated ones (a fixed seed)."""
    preprocess = Preprocess.from_dict(state["preprocess"])
    if image_paths:
        from trainkit.data.preprocess import decode_image
        from trainkit.predict import expand_inputs

        paths, errors = expand_inputs(image_paths)
        if errors:
            raise TrainkitError(errors[0])
        if not paths:
            raise TrainkitError("--images: no images found")
        images = [decode_image(p, preprocess.channels, preprocess.image_size) for p in paths[:count]]
        return torch.stack(images), f"{len(images)} images from --images"
    found = _validation_images(state, preprocess, count)
    if found is not None:
        return found
    shape = (count, preprocess.channels, preprocess.image_size, preprocess.image_size)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    return images, f"{count} generated images (the checkpoint's data was not found)"


def _validation_images(state, preprocess: Preprocess, count: int) -> tuple[torch.Tensor, str] | None:
    from trainkit.config import config_from_dict
    from trainkit.data.datasets import build_splits

    if not state.get("config"):
        return None
    try:
        config = config_from_dict(state["config"], "checkpoint config")
        # never a download: the parity check reads what is on disk or falls back
        data_cfg = config.data.model_copy(
            update={"channels": preprocess.channels, "image_size": preprocess.image_size, "download": False}
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            splits = build_splits(data_cfg, config.run.seed)
        if list(splits.classes) != list(state["classes"]):
            return None  # not the data this model was trained on
        split = splits.val
        items = split.dataset()
        total = len(items)
        if total == 0:
            return None
        # spread over the split (it is sorted by class in folder datasets)
        picks = sorted({int(i * total / min(count, total)) for i in range(min(count, total))})
        images = []
        for index in picks:
            try:
                images.append(items[index][0])
            except TrainkitError:
                continue  # an unreadable file: the others still make the check
        if not images:
            return None
        return torch.stack(images), f"{len(images)} images from the checkpoint's validation data"
    except Exception:  # noqa: BLE001 - data gone, moved or offline: fall back to generated images
        return None


# --------------------------------------------------------------------------- the verb


@dataclass
class ExportResult:
    path: Path
    size_bytes: int
    max_abs_diff: float
    agree: int
    count: int
    source: str
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def default_output(checkpoint: Path, fmt: str) -> Path:
    stem = checkpoint.name[: -len(checkpoint.suffix)] if checkpoint.suffix else checkpoint.name
    return checkpoint.with_name(stem + SUFFIXES[fmt])


def compare(reference: Classifier, exported: Classifier, images: torch.Tensor) -> tuple[float, int]:
    """(max |logit difference|, images whose top-1 class agrees), in batches of 256."""
    worst, agree = 0.0, 0
    for start in range(0, images.shape[0], 256):
        batch = images[start : start + 256]
        a, b = reference(batch).double().cpu(), exported(batch).double().cpu()
        if a.shape != b.shape:
            return math.inf, 0
        difference = (a - b).abs().max().item()
        worst = math.inf if not math.isfinite(difference) else max(worst, difference)
        agree += int((a.argmax(1) == b.argmax(1)).sum())
    return worst, agree


def _checked_options(
    fmt: str, opset: int | None, with_preprocess: bool, num_images: int, tolerance: float
) -> int | None:
    """Every flag checked before anything is loaded or written → the opset to use (onnx only)."""
    if fmt not in FORMATS:
        from trainkit.errors import unknown_choice

        raise ConfigError("--format", unknown_choice("format", fmt, FORMATS))
    if with_preprocess and fmt not in ("onnx", "torchscript"):
        raise ConfigError("--with-preprocess", "applies to onnx and torchscript only")
    if opset is not None and fmt != "onnx":
        raise ConfigError("--opset", "applies to onnx only")
    if fmt == "onnx":
        require_export_extra("onnx", "onnxscript", "onnxruntime")
        import onnx

        opset = DEFAULT_OPSET if opset is None else opset
        if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
            raise ConfigError("--opset", f"must be {MIN_OPSET}..{onnx.defs.onnx_opset_version()}")
    if not 1 <= num_images <= MAX_PARITY_IMAGES:
        raise ConfigError("--num-images", f"must be 1..{MAX_PARITY_IMAGES}")
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        raise ConfigError("--tolerance", "must be a finite number >= 0")
    return opset


def _write_export(
    fmt: str, path: Path, model, state: dict[str, Any], meta: dict[str, Any], opset, preprocess: Preprocess
) -> None:
    if fmt == "onnx":
        write_bytes(path, _onnx_bytes(model, _example_input(preprocess, 2, meta["input_dtype"]), meta, opset))
    elif fmt == "torchscript":
        write_bytes(path, _torchscript_bytes(model, _example_input(preprocess, 2, meta["input_dtype"]), meta))
    elif fmt == "safetensors":
        from safetensors.torch import save

        weights = save(_plain_weights(model), metadata={"format": "pt"})
        write_bytes(sidecar_path(path), (json.dumps(meta, indent=2) + "\n").encode())
        write_bytes(path, weights)
    else:
        buffer = io.BytesIO()
        torch.save(_slim_state(state, model), buffer)
        write_bytes(path, buffer.getvalue())


def run_export(
    checkpoint: str,
    fmt: str,
    output: str | None = None,
    opset: int | None = None,
    with_preprocess: bool = False,
    image_paths: list[str] | None = None,
    num_images: int = DEFAULT_PARITY_IMAGES,
    tolerance: float = DEFAULT_TOLERANCE,
) -> ExportResult:
    """Write the export, load it back and compare it with the checkpoint's model."""
    opset = _checked_options(fmt, opset, with_preprocess, num_images, tolerance)
    source_path = Path(checkpoint)
    state = load_checkpoint(source_path)
    path = Path(output) if output else default_output(source_path, fmt)
    for written in [path, sidecar_path(path)] if fmt == "safetensors" else [path]:
        if written.resolve() == source_path.resolve():
            raise TrainkitError(f"{written}: is the checkpoint being exported; choose another -o")
        check_output_path(written)

    input_dtype = "uint8" if with_preprocess else "float32"
    meta = export_metadata(state, input_dtype)
    preprocess = Preprocess.from_dict(state["preprocess"])
    original = build_model_from_checkpoint(state, source_path).float().eval()
    reference = torch_classifier(original, preprocess, meta["classes"])
    model = model_to_export(original, state, with_preprocess)
    _write_export(fmt, path, model, state, meta, opset, preprocess)
    return check_parity(state, reference, fmt, path, image_paths, num_images, tolerance)


def check_parity(
    state: dict[str, Any],
    reference: Classifier,
    fmt: str,
    path: Path,
    image_paths: list[str] | None = None,
    num_images: int = DEFAULT_PARITY_IMAGES,
    tolerance: float = DEFAULT_TOLERANCE,
) -> ExportResult:
    """Load the exported file back with its own runtime and compare it with the reference."""
    images, source = parity_images(state, image_paths, num_images)
    worst, agree = compare(reference, load_exported(fmt, path), images)
    return ExportResult(path, path.stat().st_size, worst, agree, images.shape[0], source, tolerance)


def report(result: ExportResult, fmt: str, checkpoint: str) -> int:
    """Print what was written and the parity figures; → exit code."""
    size_mb = result.size_bytes / 1e6
    original_mb = Path(checkpoint).stat().st_size / 1e6
    print(f"wrote {result.path} ({fmt}, {size_mb:.2f} MB; checkpoint {original_mb:.2f} MB)")
    if fmt == "safetensors":
        print(f"wrote {sidecar_path(result.path)} (model spec, classes, preprocessing)")
    percent = 100.0 * result.agree / max(result.count, 1)
    print(
        f"parity on {result.source}: max abs logit difference {result.max_abs_diff:.3g}, "
        f"top-1 agreement {result.agree}/{result.count} ({percent:.1f}%)"
    )
    sys.stdout.flush()
    if not result.passed:
        raise TrainkitError(
            f"parity check failed: max abs logit difference {result.max_abs_diff:.3g} > tolerance "
            f"{result.tolerance:g}; the file is kept for inspection: {result.path}"
        )
    print(f"ok: within tolerance {result.tolerance:g}")
    return 0


def file_kind(path: str | Path) -> str:
    """'onnx' for an .onnx file, else 'checkpoint' (what predict's -c accepts)."""
    return "onnx" if os.fspath(path).lower().endswith(".onnx") else "checkpoint"
