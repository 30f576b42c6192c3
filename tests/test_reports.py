"""Reports people read: every method's plot is declared once, block axes are integers, titles
name the model's real geometry."""

from __future__ import annotations

from conftest import tiny_vit
from vitslim.pruning.methods import METHODS
from vitslim.pruning.timm_adapter import geometry_of

from vitslim import plots
from vitslim.prune_report import METHOD_PLOTS, model_title, prune_report_markdown


def test_every_method_plot_belongs_to_a_registered_method():
    assert set(METHOD_PLOTS) <= set(METHODS) and set(METHOD_PLOTS) == {"vtp", "dgssa-glad", "patch-slim"}


def test_block_axes_are_labelled_with_whole_blocks():
    plt = plots._pyplot()
    figure, axis = plt.subplots()
    plots._block_axis(axis, [0, 1, 2, 3, 1], offset=0.25)
    assert [t.get_text() for t in axis.get_xticklabels()] == ["0", "1", "2", "3"]
    assert list(axis.get_xticks()) == [0.25, 1.25, 2.25, 3.25] and axis.get_xlabel() == "block"
    plt.close(figure)


def test_titles_name_the_geometry_the_model_was_built_with():
    title = model_title("deit_tiny_patch16_224", geometry_of(tiny_vit()))
    assert title == "deit_tiny_patch16_224 (depth 3, width 32, 2 heads, 16 patches)"


def test_each_plot_is_written(tmp_path):
    rows = [
        {"block": b, "macs": 1e6, "cosine": 0.5, "kl": 0.1, "effective_rank": 2.0, "top_energy": 0.5} for b in range(3)
    ]
    plots.block_macs_png({"dense": rows, "slim": rows}, tmp_path / "m.png", "t")
    plots.attention_analysis_png(rows, 1, tmp_path / "a.png", "t")
    plots.kept_dims_png([{"block": b, "hidden": 64} for b in range(3)], {"hidden": 128}, tmp_path / "k.png", "t")
    assert all((tmp_path / name).read_bytes().startswith(b"\x89PNG") for name in ("m.png", "a.png", "k.png"))


def test_the_prune_report_lists_the_searched_structures():
    search = [
        {"static_blocks": 0, "pyramid": [[1, 8]], "macs_fraction": 0.6, "predicted_ms": 1.5, "divergence": 0.2},
        {"static_blocks": 1, "pyramid": [[1, 4]], "macs_fraction": 0.5, "divergence": 2e-5, "chosen": True},
    ]
    search[0]["chosen"] = False
    report = {
        "model": {"name": "tiny"},
        "method": "dgssa-glad",
        **{"params_dense": 10, "params": 10, "macs_dense": 10, "macs": 5, "config": {}},
        "structure_search": search,
    }
    lines = prune_report_markdown(report).splitlines()
    assert "| 0 | [[1, 8]] | 60.0% | 1.5 | 0.2 |  |" in lines
    assert "| 1 | [[1, 4]] | 50.0% | – | 2e-05 | yes |" in lines  # no table: no prediction


def test_the_prune_report_names_the_ratio_and_rounding_vtp_chose():
    """With a latency target VTP chooses its rounding: the report says which, not only --round-to."""
    report = {
        "model": {"name": "tiny"},
        "method": "vtp",
        **{"params_dense": 10, "params": 8, "macs_dense": 10, "macs": 6, "config": {"round_to": 8}},
        **{"prune_ratio": 0.3125, "round_to": 32, "kept_gate_magnitude": 123.456},
    }
    assert "- Prune ratio 0.312, kept counts rounded to multiples of 32; gate magnitude kept: 123.5" in (
        prune_report_markdown(report).splitlines()
    )
