"""The other INT8 candidate of issue 15: NVIDIA Model Optimizer's ONNX post-training quantization,
on the same digits ONNX files and data as `vitslim quantize`, for the comparison in docs/int8.md
("INT8"). Model Optimizer brings torch and CuPy, so it is not a vitslim dependency; run this in a
virtual environment of its own:

    python3 -m venv /tmp/mo && /tmp/mo/bin/pip install "nvidia-modelopt[onnx]" onnxruntime scikit-learn
    /tmp/mo/bin/python benchmarks/modelopt_int8.py runs/digits-vit/dense.onnx runs/digits-vit/patch-slim.onnx

For each ONNX it writes NAME.modelopt.onnx beside it and prints fp32 and int8 top-1 on the 359
validation images, top-1 agreement with fp32, the Q/DQ count and which op types read dequantized
tensors. Build the outputs with `vitslim build` to see what TensorRT accepts.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from modelopt.onnx.quantization import quantize
from sklearn.datasets import load_digits

VAL_FRACTION, SPLIT_SEED = (
    0.2,
    0,
)  # vitslim.pruning.data's split, repeated here: that package needs timm, which this environment lacks


def digits(size: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train and validation images/labels exactly as vitslim prepares digits (32x32, mean/std 0.5)."""
    data = load_digits()
    pixels = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = (
        torch.nn.functional.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False).expand(
            -1, 3, -1, -1
        )
        - 0.5
    ) / 0.5
    order = torch.randperm(len(data.target), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    n_val = int(round(len(order) * VAL_FRACTION))
    train, val = sorted(order[n_val:]), sorted(order[:n_val])
    images = images.contiguous().numpy()
    return images[train], data.target[train], images[val], data.target[val]


def logits(path: Path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})[0]


def main() -> None:
    train_images, _, val_images, val_labels = digits()
    calibration = train_images[:256]
    for source in map(Path, sys.argv[1:]):
        out = source.with_suffix(".modelopt.onnx")
        quantize(
            onnx_path=str(source),
            quantize_mode="int8",
            calibration_data={"images": calibration},
            calibration_method="max",
            output_path=str(out),
            calibration_eps=["cpu"],
        )
        fp32, int8 = logits(source, val_images), logits(out, val_images)
        model = onnx.load(str(out))
        dequantized = {node.output[0] for node in model.graph.node if node.op_type == "DequantizeLinear"}
        readers = Counter(node.op_type for node in model.graph.node if any(name in dequantized for name in node.input))
        print(
            f"{source.name}: fp32 top-1 {100 * (fp32.argmax(1) == val_labels).mean():.2f}, int8 {100 * (int8.argmax(1) == val_labels).mean():.2f}, "
            f"agreement {(fp32.argmax(1) == int8.argmax(1)).mean():.1%}, {sum(n.op_type == 'QuantizeLinear' for n in model.graph.node)} QuantizeLinear, "
            f"DequantizeLinear read by {dict(readers)}, {out.stat().st_size / 1e6:.2f} MB"
        )


if __name__ == "__main__":
    main()
