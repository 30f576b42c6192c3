"""Does an fp16 graph need fp32 islands? The default run's trained models (digits), each exported
fp32, then converted to fp16 with every op in fp16 (what vitslim ships) and with LayerNorm and
Softmax kept in fp32 behind Casts (what it shipped before), all run in onnxruntime on this CPU
over the whole validation split and compared with the fp32 masked reference.

    make run && python -m benchmarks.fp16_islands      # -> results/fp16_islands.json, then --report
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import onnx
from vitslim.export.onnx_export import export_plan
from vitslim.export.passes import apply_passes
from vitslim.export.precision import fp16_from_fp32
from vitslim.pruning.run_dir import load_run

from vitslim.core.files import write_json_atomic
from vitslim.core.precision import compare_outputs
from vitslim.pipeline import data_for, run_data_source
from vitslim.quantization import onnx_logits, reference_logits, top1_of

from .__main__ import RESULTS

RUN = Path("runs/digits-vit")
ISLANDS = ("LayerNormalization", "Softmax")  # the ops the converter used to keep in fp32
# (column, attention form, fp32 ops): the shipped default, and the form that has a Softmax with and without islands
VARIANTS = (
    ("fp16 attention-op, no islands", "attention-op", ()),
    ("fp16 matmul-softmax, no islands", "matmul-softmax", ()),
    ("fp16 matmul-softmax, LayerNorm + Softmax in fp32", "matmul-softmax", ISLANDS),
)


def measure(run_dir: Path, work: Path) -> dict:
    plan, model = load_run(run_dir)
    data = data_for(model, run_data_source(run_dir))
    reference = reference_logits(model, plan, data.val)
    row = {"variant": run_dir.name, "images": len(reference)}
    for name, form, islands in VARIANTS:
        fp32_path = export_plan(model, plan, work / f"{run_dir.name}-{form}.onnx", attention=form).onnx_path
        path = work / f"{run_dir.name}-{form}-{len(islands)}.onnx"
        converted = apply_passes(fp16_from_fp32(onnx.load(str(fp32_path)), fp32_ops=islands), ("toposort",))
        onnx.save(converted, str(path))
        logits, labels = onnx_logits(path, data.val)
        parity = compare_outputs(reference, logits)
        row[name] = {
            "top1": top1_of(logits, labels),
            "agreement": parity.top1_agreement,
            "max_abs_diff": parity.max_abs_diff,
            "cosine": parity.cosine,
            "casts": sum(node.op_type == "Cast" for node in converted.graph.node),
        }
    row["fp32 reference top1"] = top1_of(reference, labels)
    return row


def main(run: Path = RUN) -> int:
    variants = sorted(p for p in run.iterdir() if (p / "plan.json").is_file()) if run.is_dir() else []
    if not variants:
        print(f"no run directories under {run}: run 'make run' first", file=sys.stderr)
        return 3
    with tempfile.TemporaryDirectory() as work:
        rows = [measure(variant, Path(work)) for variant in variants]
    for row in rows:
        print(row)
    write_json_atomic(
        RESULTS / "fp16_islands.json", {"run": str(run), "columns": [name for name, _, _ in VARIANTS], "rows": rows}
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
