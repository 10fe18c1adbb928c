"""Interactive context (smart keypoints / boxes in percent) to backend Prompts (pixels)."""
from __future__ import annotations

from dataclasses import dataclass

from ...backends.types import Prompt
from ..errors import ApiError
from .config import PROMPT_TYPES, ParsedConfig

_EPS = 1e-6


@dataclass(frozen=True)
class SmartRequest:
    """What one interactive call asks: a prompt in percent, for one image object."""

    image: str  # the Image object name (to_name)
    points: tuple[tuple[float, float], ...]  # percent
    positive: tuple[bool, ...]
    box: tuple[float, float, float, float] | None  # percent x0, y0, x1, y1
    label: str | None

    def to_prompt(self, width: int, height: int) -> Prompt:
        sx, sy = width / 100.0, height / 100.0
        points = tuple((min(x * sx, width - 1.0), min(y * sy, height - 1.0)) for x, y in self.points)
        box = None
        if self.box is not None:
            x0, y0, x1, y1 = self.box
            box = (x0 * sx, y0 * sy, max(x1 * sx, x0 * sx + 1), max(y1 * sy, y0 * sy + 1))
        return Prompt(points=points, positive=self.positive, box=box, label=self.label)


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"context region {what} must be a number, got {value!r}")
    return float(value)


def _percent(value, what: str) -> float:
    v = _number(value, what)
    if not (-_EPS <= v <= 100 + _EPS):
        raise ApiError(400, f"context region {what}={v} is out of range (coordinates are percent, 0..100)")
    return min(max(v, 0.0), 100.0)


def parse_context(context: dict, config: ParsedConfig) -> SmartRequest:
    """Turn `params.context` into one SmartRequest; raise ApiError(400) for anything unusable."""
    items = context.get("result")
    if not isinstance(items, list) or not items:
        raise ApiError(400, "context has no result regions: nothing to segment")
    points, positive, box, label, image = [], [], None, None, None
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ApiError(400, f"context.result[{i}] is not an object")
        rtype = str(item.get("type", "")).lower()
        if rtype not in PROMPT_TYPES:
            raise ApiError(400, f"context.result[{i}] has type {item.get('type')!r}; smart prompts are "
                                f"keypointlabels or rectanglelabels")
        control = config.control(str(item.get("from_name")))
        to_name = item.get("to_name") or (control.to_name[0] if control.to_name else None)
        config.data_key(to_name)  # must be an Image
        if image is not None and to_name != image:
            raise ApiError(400, "context mixes regions of different images")
        image = to_name
        value = item.get("value")
        if not isinstance(value, dict):
            raise ApiError(400, f"context.result[{i}] has no value")
        x, y = _percent(value.get("x"), "x"), _percent(value.get("y"), "y")
        labels = value.get(rtype) or value.get("labels") or []
        if rtype.startswith("keypoint"):
            is_positive = item.get("is_positive", True)
            is_positive = True if is_positive is None else bool(is_positive)
            points.append((x, y))
            positive.append(is_positive)
            if is_positive and labels and label is None:
                label = str(labels[0])
        else:
            w, h = _number(value.get("width"), "width"), _number(value.get("height"), "height")
            if w <= 0 or h <= 0:
                raise ApiError(400, f"context.result[{i}] box has no area (width={w}, height={h})")
            x1, y1 = _percent(x + w, "x+width"), _percent(y + h, "y+height")
            box = (x, y, x1, y1)  # the latest box wins: one box per prompt
            if labels:
                label = str(labels[0])
    if box is None and not any(positive):
        raise ApiError(400, "context has no usable prompt: give a positive keypoint or a box")
    return SmartRequest(image=image, points=tuple(points), positive=tuple(positive), box=box, label=label)
