"""Output comparison as a separate step on saved arrays (max abs diff, cosine, top-1 agreement)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

FP32_LOGIT_TOLERANCE = 1e-4
FP16_TOP1_AGREEMENT = 0.99


@dataclass(frozen=True)
class Parity:
    """How closely `candidate` logits [B, classes] follow `reference` logits."""

    max_abs_diff: float
    cosine: float
    top1_agreement: float
    batch: int

    def within(self, max_abs_diff: float) -> bool:
        return self.max_abs_diff <= max_abs_diff

    def to_dict(self) -> dict:
        return asdict(self)


def compare_outputs(reference: np.ndarray, candidate: np.ndarray) -> Parity:
    """Compare two [B, ...] arrays; cosine is the minimum per-sample cosine similarity."""
    reference = np.asarray(reference, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    if reference.shape != candidate.shape:
        raise ValueError(f"output shapes differ: reference {reference.shape} vs candidate {candidate.shape}")
    flat_ref = reference.reshape(len(reference), -1)
    flat_cand = candidate.reshape(len(candidate), -1)
    norms = np.linalg.norm(flat_ref, axis=1) * np.linalg.norm(flat_cand, axis=1)
    cosines = np.where(norms > 0, (flat_ref * flat_cand).sum(axis=1) / np.maximum(norms, 1e-300), 1.0)
    agreement = float((flat_ref.argmax(axis=1) == flat_cand.argmax(axis=1)).mean())
    return Parity(
        max_abs_diff=float(np.abs(reference - candidate).max()),
        cosine=float(cosines.min()),
        top1_agreement=agreement,
        batch=len(reference),
    )
