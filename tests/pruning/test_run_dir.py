"""The run directory format: plan.json is the completion marker (removed before anything is
rewritten, written last), info.json is checked when read."""

from __future__ import annotations

import pytest
from conftest import tiny_vit
from vitslim.pruning.errors import PruningError
from vitslim.pruning.plan import ModelSpec, dense_plan
from vitslim.pruning.run_dir import begin_run, load_run, read_info, save_run

SPEC = ModelSpec(
    "deit_tiny_patch16_224", dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=5)
)


def test_a_directory_being_rewritten_is_no_run_until_its_plan_is_written(tmp_path):
    model = tiny_vit()
    save_run(tmp_path / "run", dense_plan(SPEC, 3), model, info={"data": "digits"})
    assert load_run(tmp_path / "run")[0].method == "dense" and read_info(tmp_path / "run") == {"data": "digits"}
    begin_run(tmp_path / "run")  # what an interrupted rewrite leaves: new files, no plan
    with pytest.raises(PruningError, match="is not a run directory"):
        load_run(tmp_path / "run")
    save_run(tmp_path / "run", dense_plan(SPEC, 3), model)
    assert load_run(tmp_path / "run")[0].method == "dense"


@pytest.mark.parametrize("text", ["[1, 2]", '{"data": 3}', "{", "[" * 50_000])
def test_run_info_that_is_not_what_vitslim_writes_is_one_line(tmp_path, text):
    (tmp_path / "info.json").write_text(text)
    with pytest.raises(PruningError, match=f"run info {tmp_path}/info.json") as raised:
        read_info(tmp_path)
    assert "\n" not in str(raised.value)
    assert read_info(tmp_path / "elsewhere") == {}  # a run that wrote none
