from __future__ import annotations

import pytest
import torch
from conftest import TINY, tiny_vit
from safetensors.torch import save_file
from vitslim.pruning.errors import PruningError
from vitslim.pruning.models import (
    create_model,
    load_weights,
    model_from_checkpoint,
    parse_model_kwargs,
    read_checkpoint,
    save_weights,
)
from vitslim.pruning.plan import ModelSpec

SPEC = ModelSpec("deit_tiny_patch16_224", TINY)


def test_parse_model_kwargs():
    assert parse_model_kwargs(["img_size=32", "class_token=false", "global_pool=avg"]) == {
        "img_size": 32,
        "class_token": False,
        "global_pool": "avg",
    }
    with pytest.raises(PruningError, match="not KEY=VALUE"):
        parse_model_kwargs(["img_size"])


def test_unknown_and_unsupported_models():
    with pytest.raises(PruningError, match="unknown timm model 'deit_nano'"):
        create_model(ModelSpec("deit_nano"))
    with pytest.raises(PruningError, match="not a timm VisionTransformer"):
        create_model(ModelSpec("resnet18"))
    with pytest.raises(PruningError, match="rejects its kwargs"):
        create_model(ModelSpec("deit_tiny_patch16_224", {"no_such_kwarg": 1}))


@pytest.mark.parametrize("fmt", ["safetensors", "pth-wrapped", "pth-ddp"])
def test_checkpoint_formats_load(tmp_path, fmt):
    source = tiny_vit(seed=3)
    state = source.state_dict()
    if fmt == "safetensors":
        path = save_weights(source, tmp_path / "w.safetensors")
    elif fmt == "pth-wrapped":
        path = tmp_path / "w.pth"
        torch.save({"model": state, "epoch": 3}, path)
    else:
        path = tmp_path / "w.pth"
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    loaded = model_from_checkpoint(SPEC, path)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(images), source(images))


def test_bad_checkpoints_are_named(tmp_path):
    with pytest.raises(PruningError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.pth")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(PruningError, match="unreadable or corrupt"):
        read_checkpoint(corrupt)
    pickled = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 2), pickled)  # a pickled module is refused by weights_only
    with pytest.raises(PruningError, match="unreadable or corrupt"):
        read_checkpoint(pickled)


def test_checkpoint_for_another_shape_lists_every_mismatch(tmp_path):
    other = tiny_vit(embed_dim=48, num_heads=3)
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    model = tiny_vit()
    expected = sum(1 for k, v in model.state_dict().items() if other.state_dict()[k].shape != v.shape)
    with pytest.raises(PruningError, match=rf"does not fit the model \({expected} problems: ") as raised:
        load_weights(model, read_checkpoint(path))
    # every mismatching key is counted; the message shows the first few, in whatever order timm keeps them
    assert "vs model (32,)" in str(raised.value) and f"and {expected - 6} more" in str(raised.value)
