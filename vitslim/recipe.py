"""Recipes: the whole pipeline as a YAML file, and the built-in default (a small ViT on digits)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Optional

from vitslim.core.settings import check_value, setting
from vitslim.deploy.build import BUILD_OPTIONS, BuildSettings, build_settings_from_text
from vitslim.pruning.data import DIGITS
from vitslim.pruning.errors import PruningError
from vitslim.pruning.plan import ModelSpec
from vitslim.pruning.train import TrainConfig

DEFAULT_RECIPE_YAML = """\
# The built-in default: a 6-block ViT (64 wide, 2 heads, 4x4 patches) trained on scikit-learn's
# digits at 32x32 on the CPU, then exported to ONNX with parity checked. Training uses the digits
# default augmentation, small random affine jitter; every method's fine-tuning takes train's
# augmentation settings (augment, mixup, cutmix, label_smoothing) unless its own section sets them.
name: digits-vit
model:
  name: deit_tiny_patch16_224
  kwargs: {img_size: 32, patch_size: 4, embed_dim: 64, depth: 6, num_heads: 2, num_classes: 10}
data: digits
train: {epochs: 60, lr: 0.002, batch_size: 64, weight_decay: 0.05, label_smoothing: 0.1}
# Each method compresses the trained dense model; each result is exported and gets a summary row.
methods:
  vtp: {prune_ratio: 0.4, sparsity_epochs: 4, finetune_epochs: 10, distill_weight: 0.5}
  patch-slim: {epsilon: 0.02, finetune_epochs: 6, distill_weight: 0.5}
  dgssa-glad: {static_blocks: 2, pyramid: auto, target_macs: 0.5, finetune_epochs: 24, distill_weight: 0.5}
out_dir: runs
"""

_TOP_KEYS = {"name", "model", "data", "train", "methods", "deploy", "out_dir"}


@dataclass(frozen=True)
class DeploySettings:
    """How a recipe exports and builds every variant (the `deploy:` key)."""

    precision: str = setting(
        "fp32", "export precision: fp32, or fp16 (every op in fp16, inputs and outputs fp32; and so an fp16 engine)"
    )
    attention: str = setting(
        "attention-op",
        "how attention is exported: attention-op (ONNX Attention op; TensorRT >= 10.14, TensorRT-RTX, "
        "onnxruntime), matmul-softmax (any TensorRT, JetPack 6 included) or ort-mha (onnxruntime only)",
    )
    token_layout: str = setting(
        "gather", "token selection as a Gather per block, or one permutation then Slices ('slice')"
    )
    channel_layout: str = setting(
        "gather", "pruned LayerNorm-output channels as a Gather ('gather') or zero columns ('masked')"
    )
    engines: bool = setting(True, "build a TensorRT(-RTX) engine of every variant where one is installed")
    int8: bool = setting(
        True,
        "also quantize every fp32 variant to INT8 (vitslim quantize) and report fp16/int8 accuracy, parity and latency",
    )
    latency: bool = setting(
        True,
        "time every variant on this machine's CPU for the summary (onnxruntime, PyTorch, INT8 and timm's own model); "
        "off where timings mean nothing, e.g. a shared build machine",
    )

    def __post_init__(self) -> None:
        from vitslim.core.precision import PRECISIONS
        from vitslim.export.attention_form import ATTENTION_FORMS
        from vitslim.export.compact import CHANNEL_LAYOUTS
        from vitslim.export.token_layout import TOKEN_LAYOUTS

        for name, value, allowed in (
            ("precision", self.precision, PRECISIONS),
            ("token_layout", self.token_layout, TOKEN_LAYOUTS),
            ("channel_layout", self.channel_layout, CHANNEL_LAYOUTS),
            ("attention", self.attention, tuple(ATTENTION_FORMS)),
        ):
            if value not in allowed:
                raise PruningError(f"recipe deploy.{name} {value!r} is not one of {tuple(allowed)}")
        if self.engines and self.attention == "ort-mha":
            raise PruningError(
                "recipe deploy.attention ort-mha is for onnxruntime only (TensorRT cannot parse it): set deploy.engines: false, "
                "or use attention-op"
            )


_MODEL_KEYS = {"name", "kwargs", "checkpoint", "pretrained"}


@dataclass(frozen=True)
class Recipe:
    name: str
    model: ModelSpec
    data: str
    train: TrainConfig
    out_dir: Path
    checkpoint: Optional[str] = None
    pretrained: bool = False
    methods: tuple[tuple[str, Any], ...] = ()  # (method name, its config), in run order
    deploy: DeploySettings = DeploySettings()
    build: BuildSettings = BuildSettings()  # how every engine is built: the deploy keys of BuildSettings

    @property
    def run_root(self) -> Path:
        return self.out_dir / self.name

    def with_seed(self, seed: int) -> "Recipe":
        """The same recipe with `seed` for the dense training and every method."""
        methods = tuple((name, replace(config, seed=seed)) for name, config in self.methods)
        return replace(self, train=replace(self.train, seed=seed), methods=methods)


def _check_keys(where: str, given: dict, allowed: set) -> None:
    if not isinstance(given, dict):
        raise PruningError(f"recipe {where}: a mapping of key -> value, not {type(given).__name__}")
    unknown = sorted(set(given) - allowed, key=str)
    if unknown:
        raise PruningError(f"recipe {where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _settings(where: str, config_type: type, given) -> Any:
    """`config_type` from a recipe mapping, refusing unknown keys and values of the wrong type by name."""
    if not isinstance(given, dict):
        raise PruningError(f"recipe {where}: a mapping of setting -> value, not {type(given).__name__}")
    known = {f.name: f for f in fields(config_type)}
    _check_keys(where, given, set(known))
    for key, value in given.items():
        expected = check_value(known[key], value)
        if expected:
            hint = (
                " (quote it: YAML reads 1:8:32 as a base-60 number)"
                if expected.startswith("a string") and isinstance(value, int)
                else ""
            )
            raise PruningError(f"recipe {where}.{key}: {value!r} is not {expected}{hint}")
    return config_type(**given)


def composed_entry(name: str) -> tuple[Optional[str], str]:
    """A `methods` entry's name -> (the earlier entry it starts from, None for the dense model;
    the method it runs): 'vtp+patch-slim' runs Patch Slimming on the result of the entry 'vtp'."""
    start, _, method = name.rpartition("+")
    return start or None, method


def _method_configs(methods, train: TrainConfig, base: Optional[Path]) -> tuple[tuple[str, Any], ...]:
    """Each method's settings; its fine-tuning takes the train section's augmentation settings
    (augment, mixup, cutmix, label_smoothing) unless its own section sets them; a latency table
    is named relative to the recipe file. An entry 'A+B' composes: method B starts from the
    result of the earlier entry A, on the other axis (checked here, before anything runs)."""
    from vitslim.pruning.methods import get_method

    if not isinstance(methods, dict):
        raise PruningError("recipe methods: a mapping of method name -> settings, e.g. {vtp: {prune_ratio: 0.4}}")
    configs = []
    for name, settings in methods.items():
        if not isinstance(name, str) or "" in name.split("+"):
            raise PruningError(
                f"recipe methods: {name!r} is not a method name (a string such as vtp or vtp+patch-slim)"
            )
        if settings is not None and not isinstance(settings, dict):
            raise PruningError(f"recipe methods.{name}: a mapping of setting -> value, not {type(settings).__name__}")
        try:  # every method of the entry's chain, the one it runs last
            *chain, method = [get_method(part) for part in name.split("+")]
        except PruningError as error:
            raise PruningError(f"recipe methods.{name}: {error}") from None
        start = composed_entry(name)[0]
        if start is not None:
            _check_start(name, start, chain, method, [entry for entry, _ in configs])
        given = {**train.augmentation_settings(), **(settings or {})}
        if "latency_table" in given:
            given["latency_table"] = _beside(base, given["latency_table"])
        configs.append((name, _settings(f"methods.{name}", method.config_type, given)))
    return tuple(configs)


def check_listed_above(name: str, start: str, earlier: list[str]) -> None:
    """An entry 'START+METHOD' runs from START's result: START must be among the entries before it."""
    if start not in earlier:
        raise PruningError(
            f"recipe methods.{name}: starts from the entry {start!r}, which is not listed above it "
            f"(entries above: {', '.join(earlier) or 'none'}): list {start!r} first, entries run in order"
        )


def _check_start(name: str, start: str, chain: list, method, earlier: list[str]) -> None:
    """An entry 'START+METHOD' needs START listed above it, and METHOD on an axis that no method
    of START's chain decided (the check `pruning.methods.base.start` makes on the plan at run time)."""
    from vitslim.pruning.methods import METHODS

    check_listed_above(name, start, earlier)
    for other in chain:
        if set(other.decides) & set(method.decides):
            example = next(m.name for m in METHODS.values() if not set(m.decides) & set(method.decides))
            raise PruningError(
                f"recipe methods.{name}: {method.title} cannot start from {other.title}'s result (both decide "
                f"the same axis): start it from an entry of the other axis, e.g. {example}+{method.name}"
            )


def _beside(base: Optional[Path], value):
    """A path the recipe names, resolved against the recipe's folder (`base`) when relative; as
    given for the built-in recipe (no file) and for absolute paths."""
    if base is None or value is None or not isinstance(value, str) or Path(value).is_absolute():
        return value
    return str(base / value)


def recipe_from_dict(data: dict, base: Optional[Path] = None) -> Recipe:
    """The recipe in `data`; `base`: the folder of the recipe file, against which its relative
    paths (data, model.checkpoint, out_dir, a method's latency_table) are resolved (None: the current directory)."""
    if not isinstance(data, dict):
        raise PruningError("recipe must be a YAML mapping (see the built-in default in vitslim/recipe.py)")
    _check_keys("top level", data, _TOP_KEYS)
    model = data.get("model") or {}
    _check_keys("model", model, _MODEL_KEYS)
    if "name" not in model:
        raise PruningError("recipe model: 'name' (a timm model name) is required")
    if not isinstance(model, dict) or not isinstance(model.get("kwargs") or {}, dict):
        raise PruningError("recipe model: a mapping with name and kwargs (a mapping of timm keyword arguments)")
    train = _settings("train", TrainConfig, data.get("train") or {})
    return Recipe(
        name=str(data.get("name", "run")),
        model=ModelSpec(name=model["name"], kwargs=dict(model.get("kwargs") or {})),
        data=DIGITS if data.get("data", DIGITS) == DIGITS else _beside(base, str(data["data"])),
        train=train,
        out_dir=Path(_beside(base, str(data.get("out_dir", "runs")))),
        checkpoint=_beside(base, model.get("checkpoint")),
        pretrained=bool(model.get("pretrained", False)),
        methods=_method_configs(data.get("methods") or {}, train, base),
        **_deploy_and_build(data.get("deploy") or {}),
    )


def _deploy_and_build(given) -> dict:
    """The recipe's `deploy:` mapping, split: how variants are exported (DeploySettings) and how
    engines are built (BuildSettings' profiles and build options, declared once in deploy/build.py)."""
    if not isinstance(given, dict):
        raise PruningError(f"recipe deploy: a mapping of setting -> value, not {type(given).__name__}")
    build_keys = {"profiles", *BUILD_OPTIONS}
    own = {f.name for f in fields(DeploySettings)}
    _check_keys("deploy", given, own | build_keys)
    build = build_settings_from_text({k: v for k, v in given.items() if k in build_keys}, "recipe deploy")
    return {"deploy": _settings("deploy", DeploySettings, {k: v for k, v in given.items() if k in own}), "build": build}


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """'methods.vtp.finetune_epochs=1' -> data["methods"]["vtp"]["finetune_epochs"] = 1 (values are YAML)."""
    import copy

    import yaml

    if not isinstance(data, dict):
        return data  # recipe_from_dict names the problem
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PruningError(f"--set {item!r} is not KEY=VALUE (e.g. methods.vtp.finetune_epochs=1)")
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise PruningError(f"--set {item!r}: {part!r} is not a mapping in the recipe")
        node[leaf] = yaml.safe_load(value)
    return data


def refuse_aliases(text: str, where: str) -> None:
    """Refuse YAML anchors and aliases (&name / *name): a recipe never needs them, and nested
    aliases expand a few hundred bytes into gigabytes (a "billion laughs" file)."""
    import yaml

    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                raise PruningError(f"{where} uses a YAML alias (*{event.anchor}): write the values out instead")
    except yaml.YAMLError as error:
        raise PruningError(f"{where} is not valid YAML ({str(error).splitlines()[0]})") from None
    except RecursionError:
        raise PruningError(f"{where} nests deeper than Python can read: write it flat") from None


def load_recipe(path: Optional[str | Path], overrides: list[str] = ()) -> Recipe:
    """The recipe at `path` (the built-in default when None), with dotted `overrides` applied."""
    import yaml

    where = "the built-in recipe" if path is None else f"recipe {path}"
    if path is None:
        text = DEFAULT_RECIPE_YAML
    else:
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as error:
            raise PruningError(
                f"cannot read recipe {path} ({getattr(error, 'strerror', None) or type(error).__name__}): give a readable YAML file"
            ) from None
    refuse_aliases(text, where)
    given = " (with --set overrides)" if overrides else ""
    base = None if path is None else Path(path).resolve().parent
    try:
        return recipe_from_dict(apply_overrides(yaml.safe_load(text), list(overrides)), base)
    except yaml.YAMLError as error:
        raise PruningError(f"{where}{given} is not valid YAML ({str(error).splitlines()[0]})") from None
    except RecursionError:
        raise PruningError(f"{where}{given} nests deeper than Python can read: write it flat") from None
    except TypeError as error:
        raise PruningError(f"{where}: {error}") from None
