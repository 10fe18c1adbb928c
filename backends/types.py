"""The spine: small frozen types every backend and adapter speaks.

Geometry is always in pixels of the original image. Percentages exist only inside the Label Studio
adapter.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

RegionKind = Literal["box", "polygon", "mask", "keypoints", "class"]


@dataclass(frozen=True)
class Prompt:
    """What an annotator gave: clicked points and/or a dragged box, in pixels (x, y)."""

    points: tuple[tuple[float, float], ...] = ()
    #: One flag per point: True for a positive (object) click, False for a negative one.
    positive: tuple[bool, ...] = ()
    #: (x0, y0, x1, y1) in pixels, or None.
    box: tuple[float, float, float, float] | None = None
    label: str | None = None

    def __post_init__(self) -> None:
        if len(self.points) != len(self.positive):
            raise ValueError("Prompt needs one positive/negative flag per point")
        if self.box is not None:
            x0, y0, x1, y1 = self.box
            if x1 <= x0 or y1 <= y0:
                raise ValueError("Prompt box must have positive width and height")

    @property
    def is_empty(self) -> bool:
        return self.box is None and not any(self.positive)

    def point_array(self) -> np.ndarray:
        return np.asarray(self.points, dtype=np.float32).reshape(-1, 2)

    def label_array(self) -> np.ndarray:
        return np.asarray(self.positive, dtype=np.int32).reshape(-1)


@dataclass(frozen=True)
class Region:
    """One result region.

    geometry by kind:
      - "mask": bool array (H, W)
      - "polygon": float array (N, 2) of (x, y)
      - "box": (x0, y0, x1, y1, rotation_degrees)
      - "keypoints": float array (K, 3) of (x, y, visibility)
      - "class": None
    """

    label: str | None
    kind: RegionKind
    geometry: Any
    score: float = 1.0
    #: 0..1, higher means more likely to be wrong.
    uncertainty: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Prediction:
    """The regions of one image, with an aggregate difficulty for the task."""

    regions: tuple[Region, ...]
    model_version: str
    difficulty: float = 0.0
