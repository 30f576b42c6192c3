"""Models by name: timm creation, checkpoint loading and timm-style key adaptation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from vitslim.core.files import atomic_path
from vitslim.core.limits import MAX_IMAGE_SIDE

from .errors import PruningError
from .plan import ModelSpec
from .timm_adapter import check_supported

WEIGHTS_FILE = "weights.safetensors"


def parse_model_kwargs(items: list[str] | None) -> dict:
    """['img_size=32', 'num_classes=10'] -> {'img_size': 32, 'num_classes': 10} (values parsed as YAML)."""
    import yaml

    kwargs = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PruningError(f"model kwarg {item!r} is not KEY=VALUE (e.g. img_size=224)")
        try:
            kwargs[key.strip()] = yaml.safe_load(value)
        except (yaml.YAMLError, RecursionError) as error:  # e.g. a !!python tag, which safe_load refuses
            reason = str(error).splitlines()[0] if isinstance(error, yaml.YAMLError) else "nested too deep"
            raise PruningError(
                f"model kwarg {key.strip()!r}: its value is not plain YAML ({reason}): give a number, text or a list"
            ) from None
    return kwargs


def create_model(spec: ModelSpec, pretrained: bool = False) -> nn.Module:
    """A timm ViT from its spec, in eval mode, checked to be one vitslim can slim."""
    import timm

    if not timm.is_model(spec.name):
        raise PruningError(f"unknown timm model {spec.name!r}: see timm.list_models('*vit*') or '*deit*'")
    sides = spec.kwargs.get("img_size", 0)
    sides = sides if isinstance(sides, (list, tuple)) else [sides]
    if any(isinstance(side, int) and side > MAX_IMAGE_SIDE for side in sides):
        raise PruningError(
            f"img_size {spec.kwargs['img_size']} is larger than {MAX_IMAGE_SIDE} pixels a side: give a smaller one"
        )
    try:
        model = timm.create_model(spec.name, pretrained=pretrained, **dict(spec.kwargs))
    except TypeError as error:
        raise PruningError(f"model {spec.name!r} rejects its kwargs {dict(spec.kwargs)} ({error})") from None
    except (OSError, RuntimeError) as error:
        if pretrained:
            raise PruningError(
                f"could not fetch pretrained weights for {spec.name!r} (no network or no such weights: {type(error).__name__}); "
                "download them elsewhere and pass --checkpoint FILE"
            ) from None
        raise
    check_supported(model)
    model.vitslim_spec = spec  # what the model was made from, so that a dense plan can name it
    return model.eval()


def _unwrap(state: Mapping) -> dict[str, torch.Tensor]:
    """Take the weights out of a training checkpoint ({'model': ...}, {'state_dict': ...}, DDP's 'module.')."""
    for key in ("model", "state_dict", "model_ema"):
        if key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if tensors and all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or a torch checkpoint (loaded with weights_only=True)."""
    path = Path(path)
    if path.is_dir():
        raise PruningError(f"checkpoint {path} is a directory: pass a .safetensors or .pth file")
    if not path.is_file():
        raise PruningError(f"checkpoint {path} does not exist: pass a .safetensors or .pth file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt files raise many different types
        raise PruningError(
            f"checkpoint {path} is unreadable or corrupt ({type(error).__name__}): re-download or re-save it"
        ) from None
    if not isinstance(state, Mapping):
        raise PruningError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    return _unwrap(state)


def adapt_checkpoint(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Pure filter: unwrap, then timm's own key/shape adaptation (pos-embed resampling, old layouts)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    return checkpoint_filter_fn(_unwrap(dict(state_dict)), model)


def checkpoint_mismatches(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> list[str]:
    """Every way `state_dict` fails to fit `model`: missing and unexpected keys, wrong shapes."""
    expected = model.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state_dict]
    problems += [f"unexpected {k}" for k in state_dict if k not in expected]
    problems += [
        f"{k}: {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    return problems


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> nn.Module:
    """Load adapted weights strictly, naming every mismatching key at once."""
    adapted = adapt_checkpoint(state_dict, model)
    problems = checkpoint_mismatches(adapted, model)
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise PruningError(
            f"{source} does not fit the model ({len(problems)} problems: {shown}): check --model and --model-kwargs"
        )
    model.load_state_dict(adapted, strict=True)
    return model


def model_from_checkpoint(
    spec: ModelSpec, checkpoint: str | os.PathLike | None = None, pretrained: bool = False
) -> nn.Module:
    """Create the model and, if given, load a checkpoint into it."""
    model = create_model(spec, pretrained=pretrained)
    if checkpoint is not None:
        load_weights(model, read_checkpoint(checkpoint), source=f"checkpoint {checkpoint}")
    return model


def save_weights(model: nn.Module, path: str | os.PathLike) -> Path:
    """The model's state dict as safetensors, written atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))
    return Path(path)
