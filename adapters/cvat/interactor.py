"""A cvat-sdk auto-annotation interaction function around our interactive segmenters.

    cvat-cli --server-host ... function create-native "labelassist interactor" \\
        --function-module labelassist.adapters.cvat.interactor [-p segmenter=str:sam \\
        -p sam_checkpoint=str:/models/sam_vit_b_01ec64.pth]
    cvat-cli --server-host ... function run-agent FUNCTION_ID \\
        --function-module labelassist.adapters.cvat.interactor [same -p parameters]

The expensive part, the image embedding (`Segmenter.embed`), is computed once per image in
`preprocess_image`; the agent keeps it while the annotator clicks, and each click only runs
`Segmenter.segment`. Prompts: positive points, negative points and an optional box (none of them
required, so a box alone works too); the answer is one mask in CVAT's encoding
(cvat_sdk.masks.encode_mask) with the segmenter's score as its confidence, or nothing for an empty
prompt or an empty mask.

Parameters left out come from the labelassist settings: SEGMENTER (auto: SAM when SAM_CHECKPOINT is
set, else the classical grabcut), SAM_CHECKPOINT, SAM_MODEL_TYPE, DEVICE, EMBEDDING_CACHE_FP16.
"""
from __future__ import annotations

import cvat_sdk.auto_annotation as cvataa
import numpy as np
from cvat_sdk import models
from cvat_sdk.masks import encode_mask

from ...backends.segment import Embedding, Segmenter, create_segmenter
from .convert import image_array, prompt

__all__ = ["InteractorFunction", "create"]


class InteractorFunction:
    """cvat_sdk.auto_annotation.InteractionFunction for a backends.segment.Segmenter."""

    spec = cvataa.InteractionFunctionSpec(min_pos_points=0, min_neg_points=0, min_bounding_boxes=0)

    def __init__(self, segmenter: Segmenter):
        self.segmenter = segmenter

    def preprocess_image(self, context: cvataa.InteractionFunctionContext, image) -> Embedding:
        return self.segmenter.embed(image_array(image))

    def detect(self, context: cvataa.InteractionFunctionContext, pp_image,
               prompts: cvataa.InteractionPrompts) -> list[cvataa.InteractionResultShape]:
        embedding = pp_image if isinstance(pp_image, Embedding) else self.preprocess_image(context, pp_image)
        request = prompt(prompts.pos_points, prompts.neg_points, prompts.bounding_box)
        if request.is_empty:
            return []
        region = self.segmenter.segment(embedding, request)
        mask = np.asarray(region.geometry, dtype=bool)
        if not mask.any():
            return []
        confidence = models.AttributeValRequest(spec_id=cvataa.InteractionResultAttributes.CONFIDENCE,
                                                value=f"{float(np.clip(region.score, 0.0, 1.0)):.4f}")
        return [cvataa.InteractionResultShape(type="mask", points=encode_mask(mask), attributes=[confidence])]


def create(segmenter: str | None = None, sam_checkpoint: str | None = None, sam_model_type: str | None = None,
           device: str | None = None, fp16_embeddings: bool | None = None) -> InteractorFunction:
    """The function cvat-cli builds from `-p name=type:value` parameters.

    segmenter: auto, grabcut or sam; sam_checkpoint: a local segment-anything .pth file;
    sam_model_type: vit_b, vit_l or vit_h; device: auto, cpu, cuda ...; fp16_embeddings: keep SAM
    embeddings in float16.
    """
    from ...settings import Settings

    settings = Settings()
    return InteractorFunction(create_segmenter(
        segmenter or settings.segmenter, sam_checkpoint or settings.sam_checkpoint,
        sam_model_type or settings.sam_model_type, device or settings.device,
        settings.embedding_cache_fp16 if fp16_embeddings is None else fp16_embeddings))
