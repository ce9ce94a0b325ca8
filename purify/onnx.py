"""Deploying a student: export a purifier (and its classifier) to ONNX with its Gaussian noise as explicit graph
inputs, and run the file with ONNX Runtime as a seeded, purifier-like callable."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from core.errors import InputError
from core.io import atomic_write_json

from .purifier import Purifier, check_images

MAX_NFE = 8  # the graph unrolls every network evaluation: a 100-step teacher is 100 UNet copies of nodes
MIN_OPSET = 14
EXTRA = 'pip install -e ".[export]"'


def _need(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise InputError(f"ONNX export and inference need the {module} package: {EXTRA}") from None


class _Counter:
    """A noise source that counts the draws a purification makes (and returns zeros)."""

    def __init__(self):
        self.n = 0

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        self.n += 1
        return torch.zeros_like(like)


@torch.no_grad()
def noise_count(purifier: Purifier) -> int:
    """How many Gaussian tensors one purification draws: the diffusion to t_star, then each re-noising."""
    counter = _Counter()
    purifier.purify(torch.zeros(1, purifier.channels, *purifier.image_size), counter)
    return counter.n


class NoiseInputGraph(nn.Module):
    """purifier(x) with the noise given, in draw order, as inputs; followed by the classifier when there is one."""

    def __init__(self, purifier: Purifier, classifier: nn.Module | None = None):
        super().__init__()
        self.purifier, self.classifier = purifier, classifier

    def forward(self, x: torch.Tensor, *noises: torch.Tensor) -> torch.Tensor:
        it = iter(noises)
        out = self.purifier.purify(x.clamp(0, 1) * 2 - 1, lambda like: next(it))
        out = ((out + 1) / 2).clamp(0, 1)
        return self.classifier(out) if self.classifier is not None else out


def export_onnx(purifier: Purifier, path: str | Path, classifier: nn.Module | None = None, opset: int = 17,
                batch: int | str = "dynamic", max_nfe: int = MAX_NFE) -> dict:
    """Write `path` (ONNX: inputs `images` [N, C, H, W] in [0, 1] and `noise_0`..`noise_{k-1}`, output `purified`
    or `logits`) and `path`.json (what it is); returns that description. Refuses long purifiers (see MAX_NFE).
    The purifier and classifier are moved to the CPU to be traced."""
    _need("onnx")
    if not isinstance(purifier, Purifier):
        raise InputError(f"export_onnx wants a purifier (purify.load_purifier(...)), got {type(purifier).__name__}")
    if purifier.nfe > max_nfe:
        raise InputError(f"{purifier.label} takes {purifier.nfe} network evaluations: its ONNX graph would unroll "
                         f"{purifier.nfe} UNet passes (file and session start grow with it, and the point of a "
                         f"student is to avoid them); export a student of at most {max_nfe} steps, or raise max_nfe")
    if opset < MIN_OPSET:
        raise InputError(f"opset {opset} is too old: the UNet's attention (scaled_dot_product_attention) needs opset {MIN_OPSET} "
                         "or newer (the default is 17)")
    if batch != "dynamic" and (not isinstance(batch, int) or batch < 1):
        raise InputError(f"batch must be 'dynamic' or a positive integer, got {batch!r}")
    purifier = purifier.cpu().eval()
    shape = (purifier.channels, *purifier.image_size)
    if classifier is not None:
        classifier = classifier.cpu().eval()
        try:
            with torch.no_grad():
                classes = classifier(torch.zeros(1, *shape)).shape[-1]
        except RuntimeError as e:
            raise InputError(f"the classifier does not take the purifier's {shape[0]}x{shape[1]}x{shape[2]} images: "
                             f"{str(e).splitlines()[0]}") from None
    n = noise_count(purifier)
    example = 2 if batch == "dynamic" else batch
    x = torch.rand(example, *shape)
    noises = [torch.randn(example, *shape) for _ in range(n)]
    inputs = ["images"] + [f"noise_{i}" for i in range(n)]
    output = "logits" if classifier is not None else "purified"
    axes = {name: {0: "batch"} for name in [*inputs, output]} if batch == "dynamic" else None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on shape checks it folds into constants
        try:
            torch.onnx.export(NoiseInputGraph(purifier, classifier), (x, *noises), str(tmp), input_names=inputs,
                              output_names=[output], dynamic_axes=axes, opset_version=opset, dynamo=False)
        except Exception as e:  # noqa: BLE001 -- the exporter names the op it cannot write
            tmp.unlink(missing_ok=True)
            raise InputError(f"ONNX export at opset {opset} failed: {str(e).splitlines()[0]}") from None
    os.replace(tmp, path)
    meta = {"purifier": purifier.config() if hasattr(purifier, "config") else {"kind": purifier.kind},
            "label": purifier.label, "nfe": purifier.nfe, "noise_inputs": n, "input_shape": list(shape),
            "output": output, "classes": classes if classifier is not None else None, "opset": opset,
            "batch": batch, "bytes": path.stat().st_size}
    atomic_write_json(path.with_suffix(path.suffix + ".json"), meta)
    return meta


class OnnxPurifier:
    """An exported purifier run by ONNX Runtime, used like a purifier: [0, 1] NCHW in, purified images (or logits)
    out, its noise drawn from its own generator in the torch purifier's order, so the same seed gives the same
    output as `load_purifier(...).manual_seed(seed)` (to float rounding). Inference only: no gradients."""

    def __init__(self, path: str | Path, seed: int = 0, threads: int | None = None):
        ort = _need("onnxruntime")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX file {path} does not exist (write one with `python -m eval export`)")
        sidecar = path.with_suffix(path.suffix + ".json")
        self.meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        opts = ort.SessionOptions()
        self.threads = threads or torch.get_num_threads()
        opts.intra_op_num_threads = self.threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        if self.inputs[0] != "images":
            raise InputError(f"{path} is not a purifier exported by this toolkit (first input {self.inputs[0]!r})")
        self.nfe, self.label = self.meta.get("nfe", 0), f"{self.meta.get('label', path.stem)}-onnx"
        self.manual_seed(seed)

    def manual_seed(self, seed: int) -> "OnnxPurifier":
        self.generator = torch.Generator().manual_seed(int(seed))
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if "input_shape" in self.meta:
            c, h, w = self.meta["input_shape"]
            check_images(x, c, (h, w), who="OnnxPurifier")
        x = x.detach().float().cpu().contiguous()
        feed = {"images": x.numpy()}
        for name in self.inputs[1:]:
            feed[name] = torch.randn(x.shape, generator=self.generator).numpy()
        return torch.from_numpy(self.session.run(None, feed)[0])


def load_onnx_purifier(path: str | Path, seed: int = 0, threads: int | None = None) -> OnnxPurifier:
    """Open an exported purifier with ONNX Runtime (see OnnxPurifier)."""
    return OnnxPurifier(path, seed, threads)
