"""Latency tables (pruning/latency.py): the predictor against a table built here, the reader's
checks, and each method's search honouring a latency target on such a table."""

from __future__ import annotations

import json
import math

import pytest
import tables
from conftest import tiny_vit
from hypothesis import given, settings
from plans import random_plans
from tables import FIXED_MS, block_ms
from vitslim.pruning.data import digits_splits
from vitslim.pruning.errors import PruningError
from vitslim.pruning.latency import (
    STEP_CHANNELS,
    LatencyBudget,
    LatencyTable,
    few_tokens_counts,
    read_latency_table,
    step_channels,
    table_from_dict,
    value_step,
    width_block,
    width_step,
    written_count,
)
from vitslim.pruning.methods import vtp as vtp_method
from vitslim.pruning.methods.dgssa_glad import DGSSAGladConfig, prune_dgssa_glad
from vitslim.pruning.methods.patch_slimming import PatchSlimConfig, prune_patch_slimming
from vitslim.pruning.methods.vtp import VTPConfig, prune_vtp
from vitslim.pruning.plan import BlockPlan, ModelSpec, SlimPlan, TokenCounts, dense_plan
from vitslim.pruning.timm_adapter import geometry_of

MODEL = tiny_vit(num_classes=10)
GEOMETRY = geometry_of(MODEL)  # 3 blocks, dim 32, 2 heads, 16 patches + the class token
BASE = dense_plan(ModelSpec("tiny"), 3)
DATA = digits_splits(3, (16, 16))


def _block_ms(block: BlockPlan, counts: TokenCounts, geometry=GEOMETRY) -> float:
    return block_ms(block, counts, geometry)


def mac_table(timm_ms: float = 1.0, geometry=GEOMETRY) -> dict:
    return tables.mac_table(geometry, timm_ms)


TABLE = table_from_dict(mac_table(), source="test")


def test_a_grid_point_is_predicted_as_measured():
    dense = TABLE.predict(BASE, GEOMETRY)
    full = _block_ms(BlockPlan(), TokenCounts(17, 17, 17))
    assert dense.blocks_ms == pytest.approx((full,) * 3)
    assert dense.total_ms == pytest.approx(FIXED_MS + 3 * full)
    # between grid points: piecewise linear in the tokens read, exact for a linear cost
    kept = tuple(range(8))  # the class token and 7 patches written
    plan = BASE.with_block(2, BlockPlan(kept_tokens=kept))
    assert TABLE.predict(plan, GEOMETRY).blocks_ms[2] == pytest.approx(
        _block_ms(BlockPlan(kept_tokens=kept), TokenCounts(17, 17, 8)), rel=0.02
    )


def test_two_whole_models_calibrate_the_blocks_timed_alone():
    """Blocks timed alone cost more than inside the model (a launch each, say) and their work a
    little less or more (caches, overlap): the dense and the few-tokens model timed whole give the
    offset and the scale, exact for both and carried over to every plan."""
    data = mac_table()
    dense_alone, few_alone = data["dense_ms"] - FIXED_MS, data["few_tokens_ms"] - FIXED_MS
    data["dense_ms"] = FIXED_MS + 0.9 * dense_alone - 3 * 0.004  # 0.9 of the work, 4 µs less per block
    data["few_tokens_ms"] = FIXED_MS + 0.9 * few_alone - 3 * 0.004
    table = table_from_dict(data)
    assert table.calibration(GEOMETRY) == pytest.approx((0.9, 0.004))
    assert table.predict(BASE, GEOMETRY).total_ms == pytest.approx(data["dense_ms"])
    plan = BASE.with_block(1, BlockPlan(kept_tokens=tuple(range(9))))
    alone = TABLE.predict(plan, GEOMETRY).total_ms - FIXED_MS
    assert table.predict(plan, GEOMETRY).total_ms == pytest.approx(FIXED_MS + 0.9 * alone - 3 * 0.004)


def test_a_block_smaller_than_both_calibration_models_keeps_the_few_tokens_blocks_ratio():
    """Below the few-tokens model's blocks the calibration's line is not extrapolated (profiled on a
    2-core CPU, benchmarks/results/calibration_profile.json, it gave a 13-token block about half
    the ratio to its time alone that it ran at): the ratio those blocks have is held, continuous
    where the line ends."""
    data = mac_table()
    dense_alone, few_alone = data["dense_ms"] - FIXED_MS, data["few_tokens_ms"] - FIXED_MS
    data["dense_ms"] = FIXED_MS + 1.2 * dense_alone - 3 * 0.01  # a large offset per block
    data["few_tokens_ms"] = FIXED_MS + 1.2 * few_alone - 3 * 0.01
    table = table_from_dict(data)
    assert table.calibration(GEOMETRY) == pytest.approx((1.2, 0.01))
    smallest = table.timed_alone_ms(BlockPlan(), GEOMETRY, few_tokens_counts(GEOMETRY)[1])[0]
    ratio = (1.2 * smallest - 0.01) / smallest
    assert table.inside_model_ms(smallest, GEOMETRY) == pytest.approx(smallest * ratio)
    assert table.inside_model_ms(2 * smallest, GEOMETRY) == pytest.approx(2.4 * smallest - 0.01)  # on the line
    plan = BASE.with_block(0, BlockPlan(kept_tokens=(0, 5)))  # blocks 1 and 2 read 2 tokens, fewer than 3
    alone = table.timed_alone_ms(BlockPlan(), GEOMETRY, TokenCounts(2, 2, 2))[0]
    assert alone < smallest
    assert table.predict(plan, GEOMETRY).blocks_ms[1] == pytest.approx(alone * ratio)
    assert alone * ratio > 1.2 * alone - 0.01  # the line would have predicted it faster


def test_whole_models_that_pin_no_plausible_scale_leave_the_dense_models_offset():
    data = mac_table()
    data["few_tokens_ms"] = data["dense_ms"] - 0.1 * (data["dense_ms"] - data["few_tokens_ms"])  # scale 0.1
    table = table_from_dict(data)
    assert table.calibration(GEOMETRY) == pytest.approx((1.0, 0.0))
    assert table.predict(BASE, GEOMETRY).total_ms == pytest.approx(data["dense_ms"])


def test_a_model_a_few_channels_wide_gets_a_readable_table():
    """dim 8: the step (7 of 8 input channels: STEP_CHANNELS fewer would leave none) sits at 0.875."""
    geometry = geometry_of(tiny_vit(embed_dim=8, num_heads=2))
    table = table_from_dict(mac_table(geometry=geometry))
    plan = dense_plan(ModelSpec("tiny"), geometry.depth)
    assert table.predict(plan, geometry).total_ms == pytest.approx(table.dense_ms)


GATHER_MS = 0.02  # what reading fewer input channels adds, in the table built below


def gather_table() -> dict:
    """mac_table, plus GATHER_MS on every point that reads fewer input channels on a side."""
    data = mac_table()
    for row in data["blocks"]:
        row["ms"] += GATHER_MS * sum(row[side] < 1 for side in ("attention_width", "mlp_width"))
    return data


@pytest.mark.parametrize(
    ("block", "gathers"),
    [
        (BlockPlan(hidden=tuple(range(40))), 0),  # narrower hidden units: weights sliced, no Gather
        (BlockPlan(proj_in=tuple(range(4)) + tuple(range(16, 20))), 0),  # narrower value heads
        (BlockPlan(fc1_in=tuple(range(20)), hidden=tuple(range(40))), 1),
        (BlockPlan(qkv_in=tuple(range(31))), 1),  # one channel fewer: the Gather, nearly no MACs
        (BlockPlan(fc1_in=tuple(range(32))), 1),  # every channel listed: the exporter still gathers
        (BlockPlan(qkv_in=tuple(range(12)), proj_in=tuple(range(4)) + tuple(range(16, 20)), fc1_in=(1, 2)), 2),
    ],
)
def test_each_side_follows_its_macs_and_pays_the_gather_only_when_it_reads_a_subset(block, gathers):
    """Width is two axes measured apart (attention, MLP) with a step just below 1: a block is
    predicted at its own MACs plus the Gathers it has, not the uniform-width block of equal MACs."""
    table = table_from_dict(gather_table())
    counts = TokenCounts(17, 17, 17)
    alone, _ = table.timed_alone_ms(block, GEOMETRY, counts)
    assert alone == pytest.approx(_block_ms(block, counts) + gathers * GATHER_MS, rel=0.03)


MISALIGNED_MS = 0.05  # what a GEMM over input channels not a multiple of 8 adds (fp16 on a GPU)


def test_the_step_is_aligned_so_a_gpu_slowdown_is_not_taken_for_the_gather():
    """On a GPU in fp16, a GEMM over a channel count that is not a multiple of 8 runs on a slower
    kernel. The step of a model 64 or more channels wide drops STEP_CHANNELS (8), so every point
    of the grid is aligned, and a plan rounded to 8 (VTP's --round-to) is predicted at its MACs
    plus its Gathers. A step of one channel would have timed the slowdown as the Gather and taken
    it off every block that gathers nothing (table_version 2)."""
    geometry = geometry_of(tiny_vit(embed_dim=64, num_heads=2))
    assert step_channels(geometry) == STEP_CHANNELS and width_step(geometry) == 1 - 8 / 64

    def gpu_ms(block: BlockPlan, counts: TokenCounts) -> float:
        inputs = [len(channels) for channels in (block.qkv_in, block.fc1_in) if channels is not None]
        return (
            _block_ms(block, counts, geometry)
            + GATHER_MS * len(inputs)
            + MISALIGNED_MS * sum(count % 8 != 0 for count in inputs)
        )

    data = mac_table(geometry=geometry)
    for row in data["blocks"]:
        read = row["read"]
        block = width_block(geometry, row["attention_width"], row["mlp_width"])
        row["ms"] = gpu_ms(block, TokenCounts(read, read, written_count(geometry, read, row["kept"])))
    table = table_from_dict(data)
    counts = TokenCounts(geometry.num_tokens, geometry.num_tokens, geometry.num_tokens)
    for block in (
        BlockPlan(hidden=tuple(range(96))),  # no Gather: at its MACs alone
        BlockPlan(qkv_in=tuple(range(40)), hidden=tuple(range(128))),
        BlockPlan(fc1_in=tuple(range(48)), proj_in=tuple(range(16)) + tuple(range(32, 48))),
    ):
        assert table.timed_alone_ms(block, geometry, counts)[0] == pytest.approx(gpu_ms(block, counts), rel=0.03)


VALUE_KERNEL_MS = (
    0.6  # what value heads narrower than the query heads add (a GPU attention kernel leaving its fused form)
)


def test_value_heads_narrower_than_the_query_heads_pay_their_own_step():
    """On a GPU, attention whose value heads are narrower than its query heads leaves its fused
    kernel (PyTorch) or pads them (the attention-op form): a cost no MAC count shows, paid by
    every narrower row of the attention side but not by the step (whole value heads). Taken as
    part of the MACs' curve, the time of VTP's widths (one step fewer per value head, between the
    3/4 row and the step) was predicted 6.5 % fast here. The predictor takes it as a step of its
    own, paid by blocks with narrower value heads only, on a table with the grid's value step and
    on one measured before it had that point."""
    geometry = geometry_of(tiny_vit(embed_dim=128, num_heads=2))  # 64 per head: the value step keeps 56
    assert value_step(geometry) == 1 - STEP_CHANNELS / 64

    def gpu_ms(block: BlockPlan, counts: TokenCounts) -> float:
        gathers = sum(channels is not None for channels in (block.qkv_in, block.fc1_in))
        narrow_values = block.proj_in is not None and len(block.proj_in) < geometry.attn_dim
        return _block_ms(block, counts, geometry) + GATHER_MS * gathers + VALUE_KERNEL_MS * narrow_values

    data = mac_table(geometry=geometry)
    for row in data["blocks"]:
        read = row["read"]
        block = width_block(geometry, row["attention_width"], row["mlp_width"])
        row["ms"] = gpu_ms(block, TokenCounts(read, read, written_count(geometry, read, row["kept"])))
    before = {**data, "blocks": [row for row in data["blocks"] if row["attention_width"] != value_step(geometry)]}
    counts = TokenCounts(geometry.num_tokens, geometry.num_tokens, geometry.num_tokens)
    for block in (
        BlockPlan(  # VTP's widths rounded to 8: 120 input channels, 56 values per head
            qkv_in=tuple(range(120)), proj_in=tuple(range(56)) + tuple(range(64, 120)), fc1_in=tuple(range(112))
        ),
        BlockPlan(qkv_in=tuple(range(96))),  # whole value heads: the Gather alone
        BlockPlan(proj_in=tuple(range(40)) + tuple(range(64, 104))),  # narrower value heads, no Gather
        BlockPlan(hidden=tuple(range(256))),  # narrower hidden units cost no step
    ):
        for table in (table_from_dict(data), table_from_dict(before)):
            assert table.timed_alone_ms(block, geometry, counts)[0] == pytest.approx(gpu_ms(block, counts), rel=0.01)


@pytest.mark.parametrize(
    ("block", "written"),
    [
        (BlockPlan(hidden=tuple(range(32))), 3),
        (BlockPlan(fc1_in=tuple(range(16)), hidden=tuple(range(32))), 2),
        (BlockPlan(qkv_in=tuple(range(16)), proj_in=tuple(range(8)) + tuple(range(16, 24))), 5),
        (BlockPlan(hidden=tuple(range(64))), 9),
    ],
)
def test_a_block_writing_fewer_tokens_saves_on_its_widths_at_the_tokens_it_writes(block, written):
    """Methods compose: a narrowed block that writes few tokens (a VTP block in a Patch Slimming
    plan) runs its MLP on those tokens only, so its widths save less than the widths' rows (timed
    writing every token) say. On a table that is MAC-linear the prediction is the block's cost;
    taking the widths' ratio as it was timed predicted these 4-35 % fast."""
    counts = TokenCounts(17, 17, written)
    assert TABLE.timed_alone_ms(block, GEOMETRY, counts)[0] == pytest.approx(_block_ms(block, counts), rel=0.01)


def test_every_grid_point_is_predicted_as_it_was_measured():
    """Each dynamic row of a table (with a Gather's cost in it) read back through the predictor:
    the kept rows at the fraction they wrote, the width rows through their side's curve."""
    data = gather_table()
    table = table_from_dict(data)
    for row in data["blocks"]:
        if row["static"]:
            continue
        read = row["read"]
        counts = TokenCounts(read, read, written_count(GEOMETRY, read, row["kept"]))
        block = width_block(GEOMETRY, row["attention_width"], row["mlp_width"])
        assert table.timed_alone_ms(block, GEOMETRY, counts)[0] == pytest.approx(row["ms"], rel=1e-6), row


@settings(max_examples=15, deadline=None)
@given(plan=random_plans(GEOMETRY))
def test_random_valid_plans_are_predicted_near_their_cost(plan):
    """On a table that is exactly MAC-linear, the separable prediction of any valid plan (tokens,
    widths, static attention and aggregation at once) stays near the plan's own cost."""
    from vitslim.pruning.plan import token_counts

    truth = FIXED_MS + sum(
        _block_ms(block, counts) + (0.0 if block.token_aggregation is None else 0.001)
        for block, counts in zip(plan.blocks, token_counts(plan, GEOMETRY))
    )
    predicted = TABLE.predict(plan, GEOMETRY).total_ms
    assert math.isfinite(predicted) and predicted > 0
    assert predicted == pytest.approx(truth, rel=0.25)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.update(table_version=1), "table_version"),
        (lambda t: t["blocks"][0].update(ms=float("nan")), "finite number"),
        (lambda t: t["blocks"][0].update(ms=-1.0), "must be > 0"),
        (lambda t: t["blocks"][0].update(read=10_000), "integer in"),
        (lambda t: t["blocks"][0].update(kept=1.5), r"in \[0, 1\]"),
        (lambda t: t["blocks"].pop(0), "no full static block|grid differs"),
        (lambda t: t["blocks"].append(dict(t["blocks"][0])), "twice"),
        (lambda t: t.update(batch=0), "batch"),
        (lambda t: t.update(timm_ms="fast"), "timm_ms"),
        (lambda t: t.update(geometry=[]), "geometry must be"),
        (lambda t: t.clear(), "table_version"),
        # validated, yet it would crash or mislead the predictor
        (lambda t: t["blocks"][0].update(read=0), "integer in"),
        (lambda t: t.update(blocks=[b for b in t["blocks"] if b["read"] != 17]), "must run from 2 to 17"),
        (lambda t: t.update(blocks=[b for b in t["blocks"] if b["kept"] != 0.0]), "kept grid"),
        (lambda t: t.update(blocks=[b for b in t["blocks"] if b["mlp_width"] == 1.0]), "mlp_width grid"),
        (
            lambda t: t.update(blocks=[b for b in t["blocks"] if b["attention_width"] in (0.5, 1.0)]),
            "attention_width grid",
        ),
        (
            lambda t: t.update(
                blocks=[b for b in t["blocks"] if b["attention_width"] < 0.9 or b["attention_width"] == 1]
            ),
            "the step of 1 input channel",
        ),
        # a point keeping as many input channels as the step: the step could not be told apart
        (lambda t: [b.update(mlp_width=0.97) for b in t["blocks"] if b["mlp_width"] == 0.75], "the step of 1 input"),
        (lambda t: t["geometry"].update(num_heads=0), r"num_heads must be an integer in \[1,"),
        (lambda t: t["aggregations"].append(dict(t["aggregations"][0])), "aggregation point twice"),
        (lambda t: t.update(dense_ms=t["fixed_ms"] / 2), "must each take longer"),
        (lambda t: t.update(few_tokens_ms=t["dense_ms"] * 2), "must each take longer"),
        (lambda t: t.pop("few_tokens_ms"), "few_tokens_ms"),
    ],
)
def test_a_damaged_table_is_one_line(edit, message, tmp_path):
    data = mac_table()
    edit(data)
    path = tmp_path / "table.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PruningError, match=message) as raised:
        read_latency_table(path)
    assert "\n" not in str(raised.value) and "vitslim latency-table" in str(raised.value)


def test_a_table_of_another_model_is_refused():
    data = mac_table()
    data["geometry"]["depth"] = 6
    with pytest.raises(PruningError, match="measured for depth = 6 but this model has 3"):
        table_from_dict(data).predict(BASE, GEOMETRY)


@pytest.mark.parametrize(
    ("config_type", "kwargs", "message"),
    [
        (PatchSlimConfig, {"target_ms": 1.0}, "needs the table"),
        (PatchSlimConfig, {"latency_table": "t.json", "target_ms": 1.0, "epsilon": 0.1}, "exactly one of"),
        (PatchSlimConfig, {"latency_table": "t.json", "target_ms": 1.0, "target_speedup": 2.0}, "not both"),
        (VTPConfig, {"latency_table": "t.json", "target_ms": 1.0, "prune_ratio": 0.3}, "not both"),
        (VTPConfig, {"latency_table": "t.json", "target_speedup": 0.0}, "must be > 0"),
        (
            DGSSAGladConfig,
            {"pyramid": "auto", "latency_table": "t.json", "target_ms": 1.0, "target_macs": 0.5},
            "not both",
        ),
        (DGSSAGladConfig, {"pyramid": "auto", "latency_table": "t.json", "target_ms": float("nan")}, "finite"),
    ],
)
def test_latency_settings_are_checked(config_type, kwargs, message):
    with pytest.raises(PruningError, match=message):
        config_type(**kwargs)


def _table_file(tmp_path) -> str:
    path = tmp_path / "table.json"
    path.write_text(json.dumps(mac_table()))
    return str(path)


def _predicted(plan) -> float:
    return TABLE.predict(plan, GEOMETRY).total_ms


def _patch_slim_to(table: str, target: float, search_iterations: int, step: int) -> PatchSlimConfig:
    """Patch Slimming searching for a latency target on `table`, fast: no block tuning, no fine-tuning."""
    return PatchSlimConfig(
        latency_table=table,
        target_ms=target,
        search_iterations=search_iterations,
        step=step,
        block_epochs=0,
        finetune_epochs=0,
        calibration_images=64,
        block_tuning_images=64,
        batch_size=32,
    )


def test_each_method_meets_a_latency_target(tmp_path):
    """The search of every method honours its target on a table built here; the report
    shows the prediction beside the target."""
    table = _table_file(tmp_path)
    dense_ms = _predicted(BASE)
    target = 0.8 * dense_ms

    def glad(**settings):
        config = DGSSAGladConfig(
            pyramid="auto",
            latency_table=table,
            target_ms=target,
            finetune_epochs=0,
            calibration_images=32,
            batch_size=32,
            **settings,
        )
        return prune_dgssa_glad(MODEL, DATA, config, BASE)

    runs = {
        "patch-slim": lambda: prune_patch_slimming(
            MODEL, DATA, _patch_slim_to(table, target, search_iterations=4, step=4), BASE
        ),
        "vtp": lambda: prune_vtp(
            MODEL,
            DATA,
            VTPConfig(latency_table=table, target_ms=target, sparsity_epochs=1, finetune_epochs=0, round_to=1),
            BASE,
        ),
        "dgssa-glad": glad,
        "dgssa-glad searching its static blocks": lambda: glad(max_static_blocks=2),
    }
    for method, run in runs.items():
        result = run()
        predicted = _predicted(result.plan)
        assert predicted <= target, (method, predicted, target)
        assert predicted < dense_ms
        latency = result.report["latency"]
        assert latency["predicted_ms"] == pytest.approx(predicted) and latency["target_ms"] == pytest.approx(target)
        search = result.report.get("structure_search", [])
        assert all(row["predicted_ms"] <= target for row in search)  # every candidate met the target too
        assert [row["predicted_ms"] for row in search if row["chosen"]] == (
            [pytest.approx(predicted)] if search else []
        )


def test_vtp_removes_the_least_that_meets_the_target(tmp_path):
    """A looser target keeps more of the gate magnitude (the method's accuracy proxy)."""
    table = _table_file(tmp_path)
    kept = {}
    for share in (0.9, 0.7):
        config = VTPConfig(
            latency_table=table, target_ms=share * _predicted(BASE), sparsity_epochs=0, finetune_epochs=0, round_to=1
        )
        result = prune_vtp(MODEL, DATA, config, BASE)
        assert _predicted(result.plan) <= share * _predicted(BASE)
        kept[share] = result.report["kept_gate_magnitude"]
    assert kept[0.9] > kept[0.7]


def test_vtp_searches_its_rounding_where_narrower_value_heads_cost_time(tmp_path, monkeypatch):
    """On a table where value heads narrower than the query heads cost a step of their own (a GPU),
    VTP's search rounds the value channels to whole heads (--round-to times 8: 16 per head here)
    and keeps more gate magnitude than the finest rounding alone; on a table where they cost only
    their MACs it keeps the finest rounding."""

    def table_file(value_heads_step_ms: float) -> str:
        data = mac_table()
        for row in data["blocks"]:
            block = width_block(GEOMETRY, row["attention_width"], row["mlp_width"])
            if block.proj_in is not None:
                row["ms"] += value_heads_step_ms
        path = tmp_path / f"table-{value_heads_step_ms}.json"
        path.write_text(json.dumps(data))
        return str(path)

    def vtp(table: str):
        target = 0.8 * _predicted(BASE)
        config = VTPConfig(latency_table=table, target_ms=target, sparsity_epochs=0, finetune_epochs=0, round_to=2)
        result = prune_vtp(MODEL, DATA, config, BASE)
        assert result.report["latency"]["predicted_ms"] <= target
        return result

    on_gpu, mac_only = vtp(table_file(0.05)), vtp(table_file(0.0))
    assert on_gpu.report["round_to"] == 16 and all(block.proj_in is None for block in on_gpu.plan.blocks)
    assert mac_only.report["round_to"] == 2 and any(block.proj_in is not None for block in mac_only.plan.blocks)
    monkeypatch.setattr(vtp_method, "ROUNDING_MULTIPLES", (1,))
    finest = vtp(table_file(0.05))
    assert finest.report["round_to"] == 2
    assert on_gpu.report["kept_gate_magnitude"] > finest.report["kept_gate_magnitude"]


def test_a_method_started_from_another_counts_the_start_toward_its_target(tmp_path):
    """Patch Slimming from a run that narrowed every block (as VTP's does) searches its tokens
    against the prediction of the whole plan: just under the start's own latency it cuts a few
    tokens, where from the dense model the same target takes far more."""
    table = _table_file(tmp_path)
    widths = SlimPlan(model=BASE.model, blocks=(width_block(GEOMETRY, 0.5, 0.5),) * 3, method="vtp")
    target = 0.97 * _predicted(widths)
    assert target < 0.8 * _predicted(BASE)
    config = _patch_slim_to(table, target, search_iterations=6, step=2)
    composed, alone = (prune_patch_slimming(MODEL, DATA, config, start) for start in (widths, BASE))
    for result in (composed, alone):
        assert _predicted(result.plan) <= target
        assert result.report["latency"]["predicted_ms"] == pytest.approx(_predicted(result.plan))
    assert all(block.qkv_in == width.qkv_in for block, width in zip(composed.plan.blocks, widths.blocks))
    assert sum(composed.report["kept_tokens"]) > sum(alone.report["kept_tokens"])


def test_a_target_the_start_already_meets_is_refused(tmp_path):
    """Nothing to cut: one line naming the start's prediction, not a search that removes nothing."""
    widths = SlimPlan(model=BASE.model, blocks=(width_block(GEOMETRY, 0.5, 0.5),) * 3, method="vtp")
    table = _table_file(tmp_path)
    for start, what in ((BASE, "the dense model"), (widths, "the vtp run it starts from")):
        settings = PatchSlimConfig(latency_table=table, target_ms=1.01 * _predicted(start))
        with pytest.raises(PruningError, match=f"{what} is already predicted at .* nothing to cut"):
            LatencyBudget.from_settings(settings, GEOMETRY, start)


def test_a_target_out_of_reach_is_refused(tmp_path):
    config = VTPConfig(latency_table=_table_file(tmp_path), target_ms=FIXED_MS, sparsity_epochs=0, finetune_epochs=0)
    with pytest.raises(
        PruningError, match="rounding to 8, 16, 32, 64.* cannot meet .* its fastest structure is predicted at"
    ):
        prune_vtp(MODEL, DATA, config, BASE)


def test_a_speedup_target_is_read_against_timm_on_the_table(tmp_path):
    budget = LatencyBudget.from_settings(
        VTPConfig(latency_table=_table_file(tmp_path), target_speedup=2.0), GEOMETRY, BASE
    )
    assert isinstance(budget.table, LatencyTable) and budget.target_ms == pytest.approx(0.5)


def test_a_table_read_from_a_file_carries_the_digest_of_its_bytes(tmp_path):
    from vitslim.core.files import sha256_of

    path = _table_file(tmp_path)
    table = read_latency_table(path)
    assert table.sha256 == sha256_of(path) and table.source == str(tmp_path.resolve() / "table.json")
    budget = LatencyBudget.from_settings(VTPConfig(latency_table=path), GEOMETRY, BASE)
    assert budget.target_ms is None and budget.report(BASE)["table_sha256"] == table.sha256


def test_a_resumed_vtp_finetuning_must_be_of_the_same_plan(tmp_path):
    """The masks of VTP's fine-tuning are hooks, not weights: a checkpoint of another plan (a table
    measured again, another ratio) is refused by name instead of resumed."""
    config = VTPConfig(prune_ratio=0.3, sparsity_epochs=0, finetune_epochs=2, round_to=1)
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    prune_vtp(MODEL, DATA, config, BASE, checkpoints=checkpoints)
    other = VTPConfig(prune_ratio=0.5, sparsity_epochs=0, finetune_epochs=2, round_to=1)
    with pytest.raises(PruningError, match="resume_key"):
        prune_vtp(MODEL, DATA, other, BASE, checkpoints=checkpoints)
