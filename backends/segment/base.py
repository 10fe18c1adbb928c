"""The interactive segmenter interface: one expensive `embed`, many cheap `segment` calls."""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..types import Prompt, Region


@dataclass(frozen=True)
class Embedding:
    """Whatever a segmenter precomputes for one image; opaque to everyone else.

    `nbytes` is what the embedding cache charges for it; `image_size` is (height, width) of the
    original image so prompts can be checked and masks returned at full size.
    """

    model_id: str
    image_size: tuple[int, int]
    data: Any
    nbytes: int


class Segmenter(abc.ABC):
    """Interactive segmenter. Thread-safe: `segment` may be called from many threads at once."""

    #: Identifies the model and its weights; part of the embedding cache key and model_version.
    model_id: str = "segmenter"

    @abc.abstractmethod
    def embed(self, image: np.ndarray) -> Embedding:
        """Precompute what clicks on this image need (gray/RGB, 8- or 16-bit)."""

    @abc.abstractmethod
    def segment(self, embedding: Embedding, prompt: Prompt) -> Region:
        """Answer one prompt with a `Region` of kind "mask" (bool HxW at original size)."""

    def describe(self) -> dict[str, Any]:
        return {"segmenter": type(self).__name__, "model_id": self.model_id}


def mask_region(mask: np.ndarray, score: float, label: str | None, **extra: Any) -> Region:
    score = float(np.clip(score, 0.0, 1.0))
    return Region(label=label, kind="mask", geometry=mask.astype(bool), score=score,
                  uncertainty=1.0 - score, extra=extra)
