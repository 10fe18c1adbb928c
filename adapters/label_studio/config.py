"""Reading a Label Studio label config once: which image objects, which prompt and output controls.

Parsing goes through label-studio-sdk's LabelInterface and is cached by the config text, so a
request never re-parses a config the process has seen before.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from label_studio_sdk.label_interface import LabelInterface

from ..errors import ApiError

#: Smart tools whose regions arrive as interactive prompts, by result type.
PROMPT_TYPES = {"keypointlabels": "KeyPointLabels", "keypoint": "KeyPoint",
                "rectanglelabels": "RectangleLabels", "rectangle": "Rectangle"}
#: Controls that can hold a mask answer, by tag name -> result type.
MASK_OUTPUTS = {"BrushLabels": "brushlabels", "Brush": "brush",
                "PolygonLabels": "polygonlabels", "Polygon": "polygon"}


@dataclass(frozen=True)
class Control:
    name: str
    tag: str  # e.g. "BrushLabels"
    to_name: tuple[str, ...]
    labels: tuple[str, ...]
    attrs: tuple[tuple[str, str], ...]
    #: lower-cased model class name -> label: each label by its own name, plus the names listed in
    #: its `predicted_values="a,b"` attribute.
    class_map: tuple[tuple[str, str], ...] = ()

    @property
    def result_type(self) -> str:
        return self.tag.lower()

    def attr(self, key: str, default: str | None = None) -> str | None:
        return dict(self.attrs).get(key, default)

    def label_for(self, class_name: str | None) -> str | None:
        """The label a model class maps to (case-insensitive), or None when it maps to none."""
        if class_name is None:
            return None
        return dict(self.class_map).get(class_name.strip().lower())


@dataclass(frozen=True)
class ParsedConfig:
    #: image object name -> task data key (the `$image` in value="$image", without the dollar)
    images: dict[str, str]
    controls: dict[str, Control]

    def control(self, name: str) -> Control:
        try:
            return self.controls[name]
        except KeyError:
            raise ApiError(400, f"unknown control {name!r}: the label config has "
                                f"{sorted(self.controls) or 'no controls'}") from None

    def mask_outputs(self, image: str) -> list[Control]:
        return [c for c in self.controls.values() if c.tag in MASK_OUTPUTS and image in c.to_name]

    def data_key(self, image: str) -> str:
        try:
            return self.images[image]
        except KeyError:
            raise ApiError(400, f"control points to {image!r}, which is not an Image in the label config") from None


@lru_cache(maxsize=64)
def parse_label_config(config: str) -> ParsedConfig:
    if not isinstance(config, str) or not config.strip():
        raise ApiError(400, "label_config is missing or empty")
    try:
        interface = LabelInterface(config)
    except Exception as exc:  # lxml / sdk errors for malformed XML or unknown tags
        raise ApiError(400, f"label_config could not be parsed: {exc}") from None
    images = {}
    for obj in interface.objects:
        if obj.tag == "Image":
            value = obj.value or ""
            images[obj.name] = value[1:] if value.startswith("$") else value
    controls = {}
    for c in interface.controls:
        controls[c.name] = Control(
            name=c.name, tag=c.tag, to_name=tuple(c.to_name or ()),
            labels=tuple(c.labels or ()), attrs=tuple(sorted((c.attr or {}).items())),
            class_map=tuple(_class_map(c)))
    return ParsedConfig(images=images, controls=controls)


def _class_map(control) -> list[tuple[str, str]]:
    pairs = []
    for label in control.labels or ():
        pairs.append((label.strip().lower(), label))
        tag = (getattr(control, "labels_attrs", None) or {}).get(label)
        aliases = (getattr(tag, "attr", None) or {}).get("predicted_values", "")
        pairs.extend((a.strip().lower(), label) for a in aliases.split(",") if a.strip())
    return pairs
