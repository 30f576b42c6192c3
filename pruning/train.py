"""The one fine-tuning loop shared by every method: AdamW + warm-up/cosine schedule, optional logit
distillation from the dense teacher, bf16 autocast on CUDA, a progress bar, atomic checkpoints,
top-1 evaluation. Runs unchanged under `torchrun` (DDP; gloo on the CPU, NCCL on CUDA)."""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from vitslim.core.settings import refuse_non_finite, setting

from .checkpoints import generator_states, load_state, restore_generators, save_state, weights_digest
from .data import AFFINE, DEIT_AUGMENT, DataSplits, augmented_dataset, guarded_batches
from .errors import PruningError


@dataclass(frozen=True)
class AugmentationSettings:
    """How training images are augmented and labels mixed or smoothed, declared once: `train`'s
    TrainConfig and every method's settings (its fine-tuning) extend it, so the CLI's `train` and
    `prune`, recipes and the API offer the same four settings with the same defaults."""

    augment: str = setting(
        "auto",
        "training-image augmentation: a timm RandAugment policy (ImageFolder data), e.g. 'rand-m9-mstd0.5-inc1' (DeiT's); "
        "'affine' (small rotations, shifts, scalings of image tensors, any data); 'none'; 'auto': DeiT's on ImageFolder data, 'affine' on digits",
    )
    mixup: Optional[float] = setting(
        None,
        "Mixup alpha (timm.data.Mixup); 0 turns it off; default: DeiT's 0.8 with a RandAugment policy on ImageFolder data, else 0",
    )
    cutmix: Optional[float] = setting(
        None, "CutMix alpha; 0 turns it off; default: DeiT's 1.0 with a RandAugment policy on ImageFolder data, else 0"
    )
    label_smoothing: float = setting(0.0, "label smoothing of the task loss (DeiT: 0.1)")

    def __post_init__(self) -> None:
        refuse_non_finite(self, PruningError)
        if (self.mixup or 0) < 0 or (self.cutmix or 0) < 0 or not 0 <= self.label_smoothing < 1:
            raise PruningError("--mixup and --cutmix must be >= 0 and --label-smoothing in [0, 1)")

    def augmentation_settings(self) -> dict:
        """The four settings, for a TrainConfig of a method's fine-tuning phase."""
        return {field.name: getattr(self, field.name) for field in fields(AugmentationSettings)}


@dataclass(frozen=True)
class TrainConfig(AugmentationSettings):
    epochs: int = setting(30, "training epochs")
    lr: float = setting(1e-3, "peak learning rate (AdamW)")
    min_lr: float = setting(1e-5, "learning rate at the end of the cosine schedule")
    weight_decay: float = setting(0.05, "weight decay of the weight matrices (not of biases, norms, embeddings)")
    warmup_epochs: float = setting(1.0, "epochs of linear learning-rate warm-up")
    batch_size: int = setting(64, "batch size (per process under torchrun)")
    distill_weight: float = setting(0.0, "weight of the KL term toward a teacher's logits, in [0, 1]; 0 turns it off")
    distill_temperature: float = setting(1.0, "temperature of the distillation term")
    seed: int = setting(
        0, "random seed (initial weights, data order, augmentation; the same seed and loader worker count repeat a run)"
    )
    amp: bool = setting(True, "bf16 autocast (CUDA only)")
    num_workers: Optional[int] = setting(
        None,
        "data-loader worker processes; default: none for digits (tensors in memory), "
        "min(8, CPUs per process) for ImageFolder data (decoding and augmentation)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_workers is not None and self.num_workers < 0:
            raise PruningError(f"--num-workers {self.num_workers} must be >= 0")
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0:
            raise PruningError(
                f"training needs epochs >= 0, batch_size >= 1 and lr > 0 (got {self.epochs}, {self.batch_size}, {self.lr})"
            )
        if not 0.0 <= self.distill_weight <= 1.0:
            raise PruningError(f"distill_weight {self.distill_weight} must be in [0, 1]")


@dataclass(frozen=True)
class TrainResult:
    history: tuple[
        dict, ...
    ]  # per epoch: epoch, loss, lr, val_top1, seconds, steps, train_images_per_s (all processes)
    val_top1: float
    augmentation: Optional[dict] = None  # what was applied (TrainConfig's "auto" resolved)


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def distributed_context() -> DistributedContext:
    """Join the process group torchrun describes in the environment (a no-op in a single process)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return DistributedContext(
        rank=dist.get_rank() if dist.is_initialized() else 0, world_size=world_size, device=device
    )


def is_main_process() -> bool:
    """True outside DDP and on rank 0 inside it: the process that writes files and prints."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every process of the group (a no-op outside DDP): rank 0 writes, the others read after."""
    if dist.is_initialized():
        dist.barrier()


def cosine_lr_factor(step: int, total_steps: int, warmup_steps: int, min_factor: float) -> float:
    """Linear warm-up to 1, then cosine decay to `min_factor`, as a multiplier of the base LR."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on [B, classes] logits, scaled by T² as in Hinton et al."""
    return (
        F.kl_div(
            F.log_softmax(student_logits / temperature, dim=-1),
            F.log_softmax(teacher_logits / temperature, dim=-1),
            reduction="batchmean",
            log_target=True,
        )
        * temperature**2
    )


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def _logits(output) -> torch.Tensor:
    # Distilled DeiT returns (cls, dist) logits while training; their mean is its prediction.
    return (output[0] + output[1]) / 2 if isinstance(output, tuple) else output


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 256, device: Optional[torch.device] = None) -> float:
    """Top-1 accuracy in percent of `model` on `dataset`."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = total = 0
    for images, labels in guarded_batches(DataLoader(dataset, batch_size=batch_size), "validation"):
        predictions = _logits(model(images.to(device))).argmax(dim=-1).cpu()
        correct += int((predictions == labels).sum())
        total += len(labels)
    model.train(was_training)
    return 100.0 * correct / max(1, total)


def _train_loader(
    dataset: Dataset, config: TrainConfig, context: DistributedContext, files: bool
) -> tuple[DataLoader, Optional[DistributedSampler]]:
    workers = (
        config.num_workers
        if config.num_workers is not None
        else (min(8, (os.cpu_count() or 1) // context.world_size) if files else 0)
    )
    if context.world_size > 1:
        sampler = DistributedSampler(
            dataset, num_replicas=context.world_size, rank=context.rank, shuffle=True, seed=config.seed
        )
        return DataLoader(
            dataset, batch_size=config.batch_size, sampler=sampler, num_workers=workers, drop_last=True
        ), sampler
    generator = torch.Generator().manual_seed(config.seed)
    # Workers are started again each epoch (not persistent): each epoch then draws its workers'
    # seed and its order from the restored generators, so a resumed run repeats the same epochs.
    loader = DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=True,
        generator=generator,
        num_workers=workers,
        drop_last=len(dataset) > config.batch_size,
    )
    return loader, None


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices only: not on biases, norms, gates, nor on what the timm model
    lists in no_weight_decay() (position embedding, class/register tokens)."""
    skip = set()
    for name, module in model.named_modules():
        if hasattr(module, "no_weight_decay"):
            skip |= {f"{name}.{n}" if name else n for n in module.no_weight_decay()}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decayed = [p for n, p in trainable if p.ndim >= 2 and n not in skip]
    plain = [p for n, p in trainable if p.ndim < 2 or n in skip]
    return [{"params": decayed, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


@dataclass(frozen=True)
class Augmentation:
    """What the training loop applies, with "auto" resolved for the data at hand."""

    policy: Optional[str]  # a timm RandAugment policy, "affine", or None
    mixup: float
    cutmix: float
    label_smoothing: float

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_augmentation(config: TrainConfig, data: DataSplits) -> Augmentation:
    """DeiT's recipe (RandAugment, Mixup 0.8, CutMix 1.0) on ImageFolder data unless the settings
    say otherwise; small affine jitter on digits (in-memory tensors: no image files to RandAugment).
    Mixup and CutMix default on only with a timm policy on image files ('affine' and 'none': off)."""
    images = data.image_files
    policy = (
        (DEIT_AUGMENT if images else AFFINE)
        if config.augment == "auto"
        else (None if config.augment == "none" else config.augment)
    )
    # DeiT's Mixup/CutMix belong to DeiT's recipe: on by default only beside a timm policy on image
    # files; 'affine' and 'none' mean no mixing unless asked (a tiny model barely learns with it)
    deit_recipe = images and policy not in (None, AFFINE)
    mixup = config.mixup if config.mixup is not None else (0.8 if deit_recipe else 0.0)
    cutmix = config.cutmix if config.cutmix is not None else (1.0 if deit_recipe else 0.0)
    if (mixup or cutmix) and config.batch_size % 2:
        raise PruningError(
            f"Mixup/CutMix pair images within a batch: --batch-size {config.batch_size} must be even (or --mixup 0 --cutmix 0)"
        )
    return Augmentation(policy, mixup, cutmix, config.label_smoothing)


def _mixing(augmentation: Augmentation, num_classes: int):
    """timm's Mixup/CutMix (it folds the label smoothing into its soft targets), or None."""
    if not (augmentation.mixup or augmentation.cutmix):
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=augmentation.mixup,
        cutmix_alpha=augmentation.cutmix,
        label_smoothing=augmentation.label_smoothing,
        num_classes=num_classes,
    )


def _finite_everywhere(value: float, device: torch.device, context: DistributedContext) -> bool:
    """Whether `value` is finite on every process: under torchrun every rank must stop together, or
    the others would wait in the next gradient all-reduce for one that left."""
    finite = math.isfinite(value)
    if context.world_size == 1:
        return finite
    flag = torch.tensor([1.0 if finite else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _step_loss(model, teacher, images, labels, config: TrainConfig, device, smoothing: float = 0.0) -> torch.Tensor:
    """Task loss on hard labels or on Mixup's soft targets [B, classes], plus distillation."""
    with _autocast(device, config.amp):
        logits = _logits(model(images))
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=smoothing)
        if teacher is not None and config.distill_weight > 0:
            with torch.no_grad():
                teacher_logits = _logits(teacher(images)).float()
            kd = distillation_loss(logits.float(), teacher_logits, config.distill_temperature)
            loss = (1 - config.distill_weight) * loss + config.distill_weight * kd
    return loss


def fit(
    model: nn.Module,
    data: DataSplits,
    config: TrainConfig,
    teacher: Optional[nn.Module] = None,
    checkpoint_path: Optional[Path] = None,
    extra_loss=None,
    groups: Optional[list[dict]] = None,
    progress: bool = True,
    resume_key: Optional[dict] = None,
) -> TrainResult:
    """Fine-tune `model` in place on data.train and return per-epoch history and final val top-1.

    With `checkpoint_path`, the whole training state is written there after every epoch and a
    state found there is resumed from (see pruning.checkpoints) if it was made with the same
    settings, data, starting weights and `resume_key` (what else decides the training, e.g. the
    plan of a masked model, whose masks are not weights); `extra_loss()` is added to the
    task loss each step (e.g. a sparsity penalty); `groups` replaces the default optimizer
    parameter groups (e.g. to give gates their own learning rate).
    """
    from tqdm import tqdm

    context = distributed_context()
    torch.manual_seed(config.seed)
    # timm's Mixup and its PIL transforms (in this process) draw from numpy's and Python's global
    # generators; loader workers are seeded by torch from the loader's generator
    np.random.seed(config.seed)
    random.seed(config.seed)
    device = context.device
    model.to(device).train()
    if teacher is not None:
        teacher.to(device).eval()
    trained = (
        nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if context.world_size > 1
        else model
    )
    augmentation = resolve_augmentation(config, data)
    mixing = _mixing(augmentation, data.num_classes)
    train_set = augmented_dataset(data.train, augmentation.policy) if augmentation.policy else data.train
    loader, sampler = _train_loader(train_set, config, context, files=data.image_files)
    optimizer = torch.optim.AdamW(groups or parameter_groups(model, config.weight_decay), lr=config.lr)
    total_steps = max(1, config.epochs * len(loader))
    warmup = int(config.warmup_epochs * len(loader))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_lr_factor(s, total_steps, warmup, config.min_lr / config.lr)
    )
    history = []
    # what a saved state must have been made with to be resumed here
    resumable = {
        "train": config_dict(config),
        "steps_per_epoch": len(loader),
        "world_size": context.world_size,
        "data": data.source,
        "train_images": len(data.train),
        "start": weights_digest(model),
        **({} if resume_key is None else {"resume_key": resume_key}),
    }
    saved = load_state(checkpoint_path, resumable)
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        history = list(saved["history"])
        restore_generators(saved["generators"], loader.generator)
        if progress and context.is_main:
            tqdm.write(f"resuming from {checkpoint_path} after epoch {len(history)}/{config.epochs}")
    for epoch in range(len(history), config.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        started, loss_sum, batches = time.perf_counter(), 0.0, 0
        bar = tqdm(
            loader,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            leave=False,
            mininterval=1.0,
            disable=None if progress and context.is_main else True,
        )  # None: only on a terminal
        for images, labels in guarded_batches(bar, "training"):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if mixing is not None and len(images) % 2 == 0:  # soft targets; smoothing is inside them
                images, targets = mixing(images, labels)
                loss = _step_loss(trained, teacher, images, targets, config, device)
            else:
                loss = _step_loss(trained, teacher, images, labels, config, device, augmentation.label_smoothing)
            if extra_loss is not None:
                loss = loss + extra_loss()
            step_loss = float(loss.detach())  # the bar shows it anyway: no extra synchronisation
            if not _finite_everywhere(step_loss, device, context):  # else the weights turn NaN, and every step after
                raise PruningError(
                    f"training diverged in epoch {epoch + 1} (loss {step_loss} on this process): lower --lr (now {config.lr:g}) "
                    "or check the data and the starting weights"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum, batches = loss_sum + step_loss, batches + 1
            bar.set_postfix(loss=f"{loss_sum / batches:.3f}")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_seconds = time.perf_counter() - started
        val_top1 = evaluate(model, data.val, device=device)
        history.append(
            {
                "epoch": epoch + 1,
                "loss": loss_sum / max(1, batches),
                "lr": schedule.get_last_lr()[0],
                "val_top1": val_top1,
                "seconds": time.perf_counter() - started,
                "steps": batches,
                "train_images_per_s": batches * config.batch_size * context.world_size / max(train_seconds, 1e-9),
            }
        )
        if progress and context.is_main:
            tqdm.write(f"epoch {epoch + 1}/{config.epochs}: loss {history[-1]['loss']:.4f}, val top-1 {val_top1:.2f} %")
        if checkpoint_path is not None and context.is_main:
            save_state(
                checkpoint_path,
                resumable,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "history": history,
                    "generators": generator_states(loader.generator),
                },
            )
    model.eval()
    final = history[-1]["val_top1"] if history else evaluate(model, data.val, device=device)
    return TrainResult(history=tuple(history), val_top1=final, augmentation=augmentation.to_dict())


def config_dict(config: TrainConfig) -> dict:
    return asdict(config)
