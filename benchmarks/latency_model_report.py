"""The latency-table section of BENCHMARKS.md and its plot, from results/latency_model_*.json and
results/latency_accuracy.json (benchmarks/latency_model.py, benchmarks/latency_accuracy.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from vitslim.pruning.latency import table_sizes, value_step

from vitslim.plots import save_png

PREDICTION_TARGET = 0.10  # predicted vs measured, every operating point
TARGET_TOLERANCE = 0.05  # a latency-targeted structure, measured, against its target
WHERES = (
    ("gpu", "PyTorch with CUDA graphs, fp16"),
    ("onnx_gpu", "onnxruntime-gpu (CUDA EP, CUDA graphs), fp16 ONNX"),
    ("cpu", "onnxruntime, fp32 ONNX"),
)


def _load(results: Path, where: str) -> Optional[dict]:
    """One where's results: latency_model_WHERE.json and the files of one batch each
    (latency_model_WHERE_B.json, one device call each), merged oldest first (by their measurement
    date; on one date, the files of one batch last): a batch's results are the latest run's, and
    the environment shown is the latest file's."""
    paths = sorted(results.glob(f"latency_model_{where}.json")) + sorted(results.glob(f"latency_model_{where}_*.json"))
    if not paths:
        return None
    parts = [json.loads(path.read_text()) for path in paths]
    parts = sorted(parts, key=lambda part: part["environment"]["date"])  # stable: on one date, in path order
    merged = parts[0]
    for part in parts[1:]:
        batches = {table["batch"] for table in part["tables"]}
        merged = {
            **part,
            "rows": [row for row in merged["rows"] if row["batch"] not in batches] + part["rows"],
            "tables": [t for t in merged["tables"] if t["batch"] not in batches] + part["tables"],
        }
    return merged


def _out_of_reach(row: dict) -> bool:
    """A latency-targeted row whose search found nothing that fits (a prune refuses it)."""
    return row["target_ms"] is not None and row["predicted_ms"] > row["target_ms"] * (1 + 1e-9)


def _baseline(data: dict) -> str:
    """What the table's timm_ms timed: tables measured before timm's own model was exported for
    onnxruntime recorded the dense ONNX there."""
    where = data["tables"][0]["where"]
    if where.get("baseline"):
        return where["baseline"]
    return "timm's model" if where["backend"] == "torch" else "the dense model as vitslim exports it"


# what each table_version predicts with (docs/latency.md); results measured with an older one stay
# as they were measured, named by it
TABLE_MODELS = {
    "1": "table_version 1: one width axis (every channel space at once), the dense model the only calibration point",
    "2": "table_version 2: attention and MLP widths apart with the Gather's step, the dense and few-tokens models as the calibration",
    "3": "table_version 3: as 2, with the Gather's step measured 8 input channels short (one channel short would time a misaligned fp16 GEMM on GPUs)",
    "3 + value step": "table_version 3 + value step: as 3, with the attention side also timed 8 value channels per head short, and "
    "narrower value heads taken as a step of their own (they leave the fused attention kernel)",
}


def _table_model_key(table: dict) -> str:
    """How a table's results were predicted: its table_version, and whether its grid holds the
    attention side's value step (added with the predictor's value-head step, in table_version 3;
    an older table without it is still read). A model whose value step falls on a grid width
    (32 channels per head: 3/4) holds it in every table of version 2 or 3; table_version 1 has one
    width axis and no attention side."""
    version = str(table.get("table_version", 1))
    step = value_step(table_sizes(table["geometry"]))
    holds_step = step is not None and any(
        math.isclose(row.get("attention_width", 1.0), step) for row in table["blocks"] if not row["static"]
    )
    return version + (" + value step" if holds_step else "")


def _table_model(data: dict) -> str:
    keys = sorted({_table_model_key(t) for t in data["tables"]})
    return "; ".join(TABLE_MODELS.get(key, f"table_version {key}") for key in keys)


def _batch_table(data: dict, batch: int) -> dict:
    """The table the results of `batch` were predicted with."""
    return next(t for t in data["tables"] if t["batch"] == batch)


def _card(data: dict, batch: int) -> str:
    """The machine a batch's table was measured on, in a word or two (results of one runtime may
    come from GPUs of several kinds, one device call each)."""
    where = _batch_table(data, batch)["where"]
    if where["device"] != "cuda":
        return f"this {data['environment']['host'].get('cores')}-core CPU"
    name = where.get("device_name") or "GPU"
    return name.removeprefix("NVIDIA ").split()[0]


def _met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def _environment(data: dict) -> str:
    env = data["environment"]
    host = env["host"]
    on_gpu = data["tables"][0]["where"]["device"] == "cuda"
    device = "" if on_gpu else f"{host.get('cpu')} ({host.get('cores')} cores); "
    return (
        f"{device}{env['runtime']}, {env['precision']}; torch {env['torch']}, timm {env['timm']}, "
        f"onnxruntime {env['onnxruntime']}, Python {env['python']} (the latest run's); tables measured in "
        + ", ".join(
            f"{t['seconds']:.0f} s (batch {t['batch']}, on {t['where'].get('measured_on', env['date'])}"
            + (f", {t['where'].get('device_name')}" if on_gpu else "")
            + ", "
            + _table_model_key(t).join(("table_version ", ""))
            + ("; whole models timed behind the table's quiet level" if "whole_models_quiet_gate" in t else "")
            + ")"
            for t in data["tables"]
        )
    )


def targets(loaded: dict, accuracy: Optional[dict]) -> list[str]:
    within, tolerance = f"{PREDICTION_TARGET:.0%}", f"{TARGET_TOLERANCE:.0%}"
    lines = ["| target | measured | verdict |", "|---|---|---|"]
    for where, title in WHERES:
        data = loaded.get(where)
        if data is None:
            lines.append(f"| predicted vs measured within {within} for every operating point ({title}) | not run | – |")
            continue
        for batch in sorted({row["batch"] for row in data["rows"]}):
            rows = [
                r
                for r in data["rows"]
                if r["batch"] == batch and r["kind"] == "operating point" and r["variant"] != "dense"
            ]
            worst = max(rows, key=lambda r: abs(r["prediction_error"]))
            version = _table_model_key(_batch_table(data, batch))
            machine = f"{_card(data, batch)}, {title}"
            lines.append(
                f"| predicted vs measured within {within} for every operating point ({machine}, batch {batch}, table_version "
                f"{version}; the dense model is a calibration point) | worst {worst['prediction_error']:+.1%} ({worst['variant']}) | "
                f"{_met(abs(worst['prediction_error']) <= PREDICTION_TARGET)} |"
            )
            targeted = [r for r in data["rows"] if r["batch"] == batch and r["kind"] == "latency target"]
            reached = [r for r in targeted if not _out_of_reach(r)]
            missed = [r["variant"] for r in targeted if _out_of_reach(r)]
            lines.append(
                f"| a latency-targeted structure meets its target within {tolerance} (measured at most {tolerance} over it; {machine}, batch {batch}) | "
                + ", ".join(f"{r['variant']}: {r['target_error']:+.1%}" for r in reached)
                + (f"; out of reach (refused by prune): {', '.join(missed)}" if missed else "")
                + f" | {_met(bool(reached) and max(r['target_error'] for r in reached) <= TARGET_TOLERANCE)} |"
            )
    if accuracy:
        lines.append(_accuracy_target(accuracy))
    else:
        lines.append(
            "| at equal measured latency, latency-targeted at least as accurate as MAC-targeted on digits (5 seeds) | not run | – |"
        )
    return lines


def _accuracy_target(accuracy: dict) -> str:
    """The accuracy target's row: met when the two arms measured at equal latency (mean speed-ups
    within the tolerance of each other; a slower arm could buy accuracy with time, and a much
    faster one says the table mispredicted, not which search is better) and the latency-targeted
    structures are at least as accurate on average."""
    env, rows = accuracy["environment"], accuracy["rows"]
    by_kind = {kind: [r for r in rows if r["kind"] == kind] for kind in ("MAC target", "latency target")}
    mean = {kind: sum(r["top1_onnx"] for r in values) / len(values) for kind, values in by_kind.items()}
    speedup = {kind: sum(r["measured_speedup"] for r in values) / len(values) for kind, values in by_kind.items()}
    seeds = len(by_kind["MAC target"])
    same = sum(
        _structure(mac) == _structure(latency) for mac, latency in zip(by_kind["MAC target"], by_kind["latency target"])
    )
    ratio = speedup["latency target"] / speedup["MAC target"]
    equal = abs(ratio - 1) <= env["tolerance"]
    return (
        f"| at equal measured latency, latency-targeted at least as accurate as MAC-targeted on digits ({seeds} seeds, "
        f"DGSSA + GLAD, this CPU, batch {env['batch']}, both to {env['target_speedup']:g}x timm's model) | top-1 "
        f"{mean['latency target']:.2f} % at {speedup['latency target']:.2f}x vs {mean['MAC target']:.2f} % at "
        f"{speedup['MAC target']:.2f}x (mean measured speed-ups, {ratio - 1:+.1%} apart: "
        f"{'equal' if equal else 'not equal'} within {env['tolerance']:.0%}; the same structure in {same} of {seeds} "
        f"seeds) | {_met(equal and mean['latency target'] >= mean['MAC target'])} |"
    )


def _structure(row: dict) -> tuple:
    """A digits run's structure: its static blocks and pyramid."""
    return row["static_blocks"], row["pyramid"]


def _rounding(row: dict) -> str:
    """VTP's rounding on a latency-targeted row: the one its search chose, or, in results from
    before VTP searched its rounding, the --round-to 8 it searched at alone."""
    if "round_to" in row:
        return f" (rounding {row['round_to']})"
    vtp_alone = row["kind"] == "latency target" and row["variant"].startswith("vtp for")
    return " (rounding 8; searched before VTP searched its rounding)" if vtp_alone else ""


def rows_table(data: dict) -> list[str]:
    lines = [
        f"Speed-ups are over {_baseline(data)} on the same runtime (the table's `timm_ms`, the baseline of `--target-speedup`).",
        "",
        "| batch | structure | % of dense MACs | predicted ms | measured ms | measured / predicted − 1 | speed-up (measured) "
        "| MAC-ideal | realised / ideal | target ms | measured / target − 1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(data["rows"], key=lambda r: (r["batch"], r["kind"] != "operating point")):
        target = "–" if row["target_ms"] is None else f"{row['target_ms']:.3f}"
        if _out_of_reach(row):
            target += " (out of reach: the search's fastest; a prune refuses it)"
        against = "–" if row["target_error"] is None else f"{row['target_error']:+.1%}"
        lines.append(
            f"| {row['batch']} | {row['variant']}{_rounding(row)} | {row['macs_fraction']:.1%} | {row['predicted_ms']:.3f} | {row['measured_ms']:.3f} | "
            f"{row['prediction_error']:+.1%} | {row['speedup']:.2f} | {1 / row['macs_fraction']:.2f} | "
            f"{row['speedup'] * row['macs_fraction']:.2f} | {target} | {against} |"
        )
    return lines


SHORT_WHERE = {"gpu": "torch CUDA graphs", "onnx_gpu": "onnxruntime-gpu", "cpu": "onnxruntime"}


def scatter_png(loaded: dict, path: Path) -> None:
    """measured / predicted - 1 against the MAC fraction: one colour per runtime and batch, circles
    for the operating points, stars for the latency-targeted structures, the ±10 % band shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    figure, axis = plt.subplots(figsize=(10, 5))
    axis.axhspan(-100 * PREDICTION_TARGET, 100 * PREDICTION_TARGET, color="0.92", zorder=0)
    axis.axhline(0, color="0.5", linewidth=0.8)
    handles, colours = [], iter(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    for where, _ in WHERES:
        data = loaded.get(where)
        if data is None:
            continue
        for batch in sorted({row["batch"] for row in data["rows"]}):
            colour = next(colours)
            for kind, marker, size in (("operating point", "o", 30), ("latency target", "*", 120)):
                rows = [r for r in data["rows"] if r["batch"] == batch and r["kind"] == kind]
                axis.scatter(
                    [r["macs_fraction"] * 100 for r in rows],
                    [r["prediction_error"] * 100 for r in rows],
                    marker=marker,
                    s=size,
                    color=colour,
                    edgecolors="black" if marker == "*" else "none",
                    linewidths=0.5,
                )
            version = _table_model_key(_batch_table(data, batch))
            label = f"{_card(data, batch)}, {SHORT_WHERE[where]}, batch {batch} (table_version {version})"
            handles.append(Line2D([], [], marker="o", linestyle="", color=colour, label=label))
    handles += [
        Line2D([], [], marker="o", linestyle="", color="0.4", label="the papers' operating points"),
        Line2D(
            [],
            [],
            marker="*",
            markersize=11,
            linestyle="",
            color="0.4",
            markeredgecolor="black",
            label="latency-targeted searches",
        ),
        Line2D([], [], marker="s", markersize=10, linestyle="", color="0.92", label="within ±10 %"),
    ]
    axis.set_xlabel("% of the dense model's MACs")
    axis.set_ylabel("measured / predicted − 1 (%)")
    axis.set_title("DeiT-S: whole models timed against the latency table's prediction")
    axis.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    save_png(figure, path)


def _composed_text(loaded: dict) -> str:
    """The composed search's words, where the results hold its rows (older results do not)."""
    composed = [data for data in loaded.values() if any(r["variant"].startswith("vtp+") for r in data["rows"])]
    if not composed:
        return ""
    ratios = sorted({data["composed_vtp_ratio"] for data in composed if "composed_vtp_ratio" in data})
    removed = f" that removed {', '.join(f'{r:.0%}' for r in ratios)} of the gated dims" if ratios else ""
    return (
        f", and Patch Slimming's token search from a VTP start{removed} (methods compose: the `vtp+patch-slim` rows),"
    )


def section(results: Path, relative: Path) -> list[str]:
    loaded = {where: data for where, _ in WHERES if (data := _load(results, where)) is not None}
    if not loaded:
        return []
    accuracy_path = results / "latency_accuracy.json"
    accuracy = json.loads(accuracy_path.read_text()) if accuracy_path.exists() else None
    scatter_png(loaded, results / "latency_model.png")
    text = [
        "## Latency tables: compressing to a latency, predicted against measured",
        "",
        "`python -m benchmarks.latency_model gpu|onnx_gpu|cpu` ([docs/latency.md](docs/latency.md)): DeiT-S with random "
        "weights; a latency table measured with `vitslim.latency_table.measure_table` at each batch; every operating point "
        "above built as the exporter builds it and timed whole, the same way (the median of 3 sessions, in passes over all "
        f"of them), beside the table's prediction; then each method's structure search{_composed_text(loaded)} run "
        "against the table for the speed-up over timm's model that its row names, on the benchmarks' synthetic token "
        "ranking, gate magnitudes and effective ranks, and the structure it finds timed. The dense model is a calibration "
        "point of the table (predicted as the table timed it), so its row's error is how far the machine's speed moved "
        "between the table and the whole models. "
        "Each runtime's section names the table_version its results were predicted with.",
        "",
        f"![measured against predicted]({relative}/latency_model.png)",
        "",
        "### Targets",
        "",
        *targets(loaded, accuracy),
        "",
    ]
    for where, title in WHERES:
        data = loaded.get(where)
        if data is None:
            continue
        text += [f"### {title}", "", _environment(data) + ".", "", f"Predicted with {_table_model(data)}.", ""]
        text += [*rows_table(data), ""]
    if accuracy:
        text += ["### Latency-targeted against MAC-targeted on digits", "", *accuracy_table(accuracy), ""]
    return text


def _settings(settings: dict) -> str:
    """A method's settings as the flags that give them ('--max-static-blocks 3 --pyramid auto ...')."""
    return " ".join(f"--{key.replace('_', '-')} {value}" for key, value in settings.items())


def accuracy_table(accuracy: dict) -> list[str]:
    env = accuracy["environment"]
    lines = [
        f"`python -m benchmarks.latency_accuracy` on {env['host']['cpu']} ({env['host']['cores']} cores), onnxruntime "
        f"{env['onnxruntime']}, batch {env['batch']}, measured {env['date']}: DGSSA + GLAD from the default run's dense model "
        f"({_settings(env['method_settings'])}) to {env['target_speedup']:g}x timm's model. Latency-targeted: "
        f"`--target-speedup {env['target_speedup']:g}` on a table of the digits model measured first. MAC-targeted: the "
        f"largest `--target-macs` of {env['mac_grid'][0]:.2f}, {env['mac_grid'][1]:.2f} … {env['mac_grid'][-1]:.2f} whose "
        "structure, exported, measures at least that speed-up (found on the clock, as a user steering by MACs would). "
        "Each fine-tuned the same way, exported and timed as a speed-up over timm's model timed beside it "
        f"(median of {env['timing_rounds']} rounds; this VM's speed drifts); top-1 of the ONNX on the digits validation split.",
        "",
        "| seed | steered by | static blocks | pyramid | % of dense MACs | MAC-ideal | predicted speed-up "
        "| measured speed-up (ms) | realised / ideal | top-1 (ONNX) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in accuracy["rows"]:
        steered = r["kind"] if r["target_macs"] is None else f"{r['kind']} ({r['target_macs']:.2f})"
        lines.append(
            f"| {r['seed']} | {steered} | {r['static_blocks']} | {r['pyramid']} | {r['macs_fraction']:.1%} | "
            f"{1 / r['macs_fraction']:.2f}x | {r['predicted_speedup']:.2f}x | {r['measured_speedup']:.2f}x "
            f"({r['measured_ms']:.3f}) | {r['measured_speedup'] * r['macs_fraction']:.2f} | {r['top1_onnx']:.2f} |"
        )
    return lines
