"""ONNX Runtime inference: the predictor's forward pass exported once and run by ONNX Runtime on the CPU,
in float32 or with int8 weights.

    classifier = load_classifier("outputs/vit-xray", onnx=True, int8=True)   # cxr.predictor; classify() as usual

`load_classifier(..., onnx=True)` attaches an `OnnxFeatures` to the classifier and `cxr.predictor.classify` calls
it in place of `cxr.features.forward_features`; everything after (softmax, top labels, the chest X-ray
check) is the same code, reading the same three tensors.

What is exported: a wrapper that returns what `forward_features` returns without saliency (`logits`, `cls`,
`tokens`) from one input, `pixel_values`, with any batch size. It is traced by torch's TorchScript-based
exporter (`dynamo=False`: no onnxscript needed, and its graph ran faster). No Grad-CAM: that needs the PyTorch
model's gradients.

int8: `onnxruntime.quantization.quantize_dynamic` stores the weights of every MatMul (the Linear layers, as
torch's int8 path does; the patch-embedding convolution stays float32) as signed int8 with one scale per
matrix; activations are quantized per batch as they come. Each of these choices kept the logits and the chest
X-ray check closest to float32 where the alternatives did not: the measurements are in docs/onnx.md, and
`python -m benchmarks.speed` measures speed and top-1 agreement again.

Cache: the exported graph is written into the model folder on first use, `model.onnx` (float32) or
`model.int8.onnx`, and reused by later loads while the fingerprint stored in it matches the loaded model (its
config and every weight, the torch and onnxruntime versions, the quantization settings). A retrained or
recalibrated folder (`python calibrate.py` rewrites the weights) is therefore exported again. A Hub
model, or a folder this process cannot write, is exported into a temporary directory on every load instead,
deleted once the session has read it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import warnings
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic

from cxr.features import OnnxExportError, forward_features

OUTPUTS = (
    "logits",
    "cls",
    "tokens",
)  # the keys of forward_features(model, pixels) that classify and the OOD check read
ONNX_FILES = {False: "model.onnx", True: "model.int8.onnx"}  # int8 -> file name in the model folder
FINGERPRINT_KEY = "cxr_fingerprint"  # metadata entry of the exported graph
OPSET = 17
QUANTIZATION = dict(weight_type=QuantType.QInt8, per_channel=False, reduce_range=False, op_types_to_quantize=["MatMul"])


class _Features(torch.nn.Module):
    """`forward_features` without saliency as a module with a tuple of tensors out: what the exporter traces."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        outputs = forward_features(self.model, pixel_values)
        return tuple(outputs[name] for name in OUTPUTS)


class OnnxFeatures:
    """An ONNX Runtime session that returns the `forward_features` dict (without saliency) as torch tensors."""

    def __init__(self, session: ort.InferenceSession):
        self.session = session

    def __call__(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        arrays = self.session.run(list(OUTPUTS), {"pixel_values": pixel_values.float().cpu().numpy()})
        return {name: torch.from_numpy(array) for name, array in zip(OUTPUTS, arrays, strict=True)}


def load_onnx_features(model, image_size: int, int8: bool, folder: Path | None) -> OnnxFeatures:
    """The session for `model` (a float32 PyTorch model loaded from `folder`; None for a Hub model), from the
    folder's cached graph where it is current, else exported (and cached where the folder is writable)."""
    key = fingerprint(model, int8)
    if folder is None or not os.access(folder, os.W_OK):
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / ONNX_FILES[int8]
            export(model, image_size, int8, key, path)
            return OnnxFeatures(new_session(path))
    path = Path(folder) / ONNX_FILES[int8]
    if path.is_file():
        session = new_session(path)
        if session.get_modelmeta().custom_metadata_map.get(FINGERPRINT_KEY) == key:
            return OnnxFeatures(session)
    export(model, image_size, int8, key, path)
    return OnnxFeatures(new_session(path))


def fingerprint(model, int8: bool) -> str:
    """A hash of everything the exported graph depends on: config, weights, library versions, quantization."""
    digest = hashlib.sha256()
    digest.update(model.config.to_json_string().encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    digest.update(
        f"torch {torch.__version__}, onnxruntime {ort.__version__}, opset {OPSET}, int8 {int8}: {QUANTIZATION}".encode()
    )
    return digest.hexdigest()


def export(model, image_size: int, int8: bool, key: str, path: Path) -> None:
    """Write `model`'s graph (int8 weights if asked) to `path`, with `key` in its metadata."""
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".onnx-export-") as scratch:
        float32 = Path(scratch) / "float32.onnx"
        example = torch.zeros(2, 3, image_size, image_size)
        with warnings.catch_warnings():
            # The legacy exporter's deprecation notice, and tracer warnings about input-size checks, which are
            # constant here: the image processor always resizes to image_size.
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(
                    _Features(model),
                    (example,),
                    str(float32),
                    dynamo=False,
                    opset_version=OPSET,
                    input_names=["pixel_values"],
                    output_names=list(OUTPUTS),
                    dynamic_axes={name: {0: "batch"} for name in ("pixel_values", *OUTPUTS)},
                )
            except torch.onnx.errors.UnsupportedOperatorError as error:  # e.g. MobileViT V2's fold (Col2Im)
                raise OnnxExportError(
                    f"{type(model).__name__} cannot be exported to ONNX here: {str(error).splitlines()[0]} "
                    "Run it with PyTorch instead (without --onnx)."
                ) from error
        source = float32
        if int8:
            source = Path(scratch) / "int8.onnx"
            previous = logging.root.manager.disable
            # its advice to pre-process the graph first: tried, it changed neither speed nor error
            logging.disable(logging.WARNING)
            try:
                quantize_dynamic(float32, source, **QUANTIZATION)
            finally:
                logging.disable(previous)
        graph = onnx.load(str(source))
        onnx.helper.set_model_props(graph, {FINGERPRINT_KEY: key})
        finished = Path(scratch) / "finished.onnx"
        onnx.save(graph, str(finished))
        # atomic: another process loading the folder reads the old file or the new one, never half of one
        os.replace(finished, path)


def new_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    # As many threads as torch uses (the physical cores, or OMP_NUM_THREADS where set), so both backends get the same
    # share of the machine.
    options.intra_op_num_threads = torch.get_num_threads()
    # Idle threads sleep instead of spinning: spinning threads take turns away from each other on a busy machine
    # (docs/onnx.md).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
