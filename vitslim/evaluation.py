"""`vitslim eval`: the top-1 of an artifact (a run directory, an ONNX file or an engine) on the
validation split of a data set, and with a run, its top-1 agreement with that run's masked
PyTorch reference. An ONNX file or an engine needs no run directory: its input shape and
preprocessing come from the artifact itself."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from vitslim.deploy.errors import DeployError

from .artifacts import Artifact, EngineArtifact, RunArtifact, RunnerOptions, open_artifact

DEFAULT_EVAL_BATCH = 64


def _fixed_batches(dataset, batch: int):
    """(images [batch, ...], labels [n]) per batch, the last one padded to `batch` by repeating
    its images: one batch size throughout (an engine's profile, a compiled module's shape)."""
    from torch.utils.data import DataLoader

    from vitslim.pruning.data import guarded_batches

    for images, labels in guarded_batches(DataLoader(dataset, batch_size=batch), "evaluation"):
        images = images.numpy().astype(np.float32)
        yield np.resize(images, (batch, *images.shape[1:])), labels.numpy()


def evaluation_batch(artifact: Artifact, asked: Optional[int]) -> int:
    """The batch size: the one asked for, else an engine's first profile's opt, else 64."""
    if asked is not None:
        return asked
    if isinstance(artifact, EngineArtifact):
        return artifact.manifest["profiles"][0]["opt"]
    return DEFAULT_EVAL_BATCH


def evaluate_artifact(
    path: str | Path,
    data_source: str,
    run_dir: Optional[str | Path] = None,
    batch: Optional[int] = None,
    options: Optional[RunnerOptions] = None,
) -> dict:
    """Top-1 (%) of the artifact at `path` on the validation split of `data_source`; with
    `run_dir` (or when the artifact is a run directory) also the top-1 of the run's masked
    reference and the artifact's top-1 agreement with it."""
    from vitslim.pruning.data import DIGITS, load_data, preprocessing

    from .measure import check_batch_sizes, check_preprocessing
    from .pipeline import check_run_data

    options = options or RunnerOptions(cuda_graph=False)  # numbers, not timing: nothing captured
    artifact = open_artifact(path)
    batch = evaluation_batch(artifact, batch)
    check_batch_sizes([batch])
    artifact.check_batches([batch])
    shape = artifact.input_shape
    data = load_data(data_source, shape[0], tuple(shape[1:]))
    # the preprocessing the artifact was exported for (ONNX metadata, engine manifest), if it says
    expected = preprocessing(DIGITS if data.source == DIGITS else "image files", shape[0], tuple(shape[1:]))
    check_preprocessing(artifact.path, getattr(artifact, "preprocessing", None), expected)
    run = RunArtifact(Path(run_dir)) if run_dir else artifact if isinstance(artifact, RunArtifact) else None
    made_from = None
    reference_model = None
    if run is not None:
        from vitslim.pruning.reference import MaskedReference

        plan, model = run.run
        if run is not artifact:
            made_from = artifact.made_from(plan, model)
        check_run_data(run.path, data, "eval")
        reference_model = MaskedReference(model, plan).eval()
    correct = reference_correct = agree = seen = 0
    with artifact.runner(options) as runner:
        for images, labels in _fixed_batches(data.val, batch):
            logits = runner.infer(images)[: len(labels)]
            if logits.ndim != 2 or logits.shape[1] != data.num_classes:
                raise DeployError(
                    f"{artifact.path} gives {logits.shape[-1]} logits per image but {data.source} has "
                    f"{data.num_classes} classes: evaluate it on the data it was trained for"
                )
            predicted = logits.argmax(axis=1)
            correct += int((predicted == labels).sum())
            if reference_model is not None:
                import torch

                with torch.no_grad():
                    expected = reference_model(torch.from_numpy(images[: len(labels)])).numpy().argmax(axis=1)
                reference_correct += int((expected == labels).sum())
                agree += int((expected == predicted).sum())
            seen += len(labels)
    result = {
        "artifact": str(artifact.path),
        "kind": artifact.what,
        "precision": artifact.precision(options),
        "data": data.source,
        "split": "validation",
        "images": seen,
        "batch": batch,
        "top1": 100.0 * correct / seen,
    }
    if reference_model is not None:
        result.update(
            run=str(run.path),
            reference_top1=100.0 * reference_correct / seen,
            agreement_with_reference=agree / seen,
            made_from=made_from,
        )
    return result


def evaluation_text(result: dict) -> str:
    line = (
        f"{Path(result['artifact']).name} ({result['precision']}): top-1 {result['top1']:.2f} % on "
        f"{result['images']} validation images of {result['data']}"
    )
    if "agreement_with_reference" in result:
        line += (
            f"; the run's masked reference {result['reference_top1']:.2f} %, top-1 agreement with it "
            f"{result['agreement_with_reference']:.1%}"
        )
    return line
