"""Interactive segmenters: `embed(image)` once per image, `segment(embedding, prompt)` per click."""
from __future__ import annotations

from pathlib import Path

from .base import Embedding, EmbeddingFormatError, Segmenter, mask_region

__all__ = ["Embedding", "EmbeddingFormatError", "Segmenter", "mask_region", "create_segmenter"]


def create_segmenter(kind: str = "auto", sam_checkpoint: str | Path | None = None,
                     sam_model_type: str = "vit_b", device: str = "auto",
                     fp16_embeddings: bool = True) -> Segmenter:
    """auto: SAM when a checkpoint is given, else the weight-free classical default."""
    if kind == "auto":
        kind = "sam" if sam_checkpoint else "grabcut"
    if kind == "sam":
        if not sam_checkpoint:
            raise ValueError("SEGMENTER=sam needs SAM_CHECKPOINT (a local .pth file)")
        from .sam import SamSegmenter  # torch is imported only when SAM is used

        return SamSegmenter.from_checkpoint(sam_checkpoint, sam_model_type, device, fp16_embeddings)
    if kind == "grabcut":
        from .grabcut import GrabCutSegmenter

        return GrabCutSegmenter()
    raise ValueError(f"unknown segmenter {kind!r}: use auto, grabcut or sam")
