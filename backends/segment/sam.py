"""Segment Anything (the `segment-anything` package) behind the Segmenter interface.

`embed` runs the ViT image encoder once per image; `segment` runs only the prompt encoder and the
light mask decoder, so a click costs milliseconds once the embedding is cached.
"""
from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from ..image import to_rgb8
from ..types import Prompt, Region
from .base import Embedding, Segmenter, mask_region


class ModelLoadError(RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the architecture."""


@dataclass(frozen=True)
class _SamFeatures:
    features: torch.Tensor  # (1, C, h, w), possibly float16
    input_size: tuple[int, int]  # size of the resized image before padding


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class SamSegmenter(Segmenter):
    def __init__(self, model: Sam, model_id: str, device: str | torch.device = "cpu",
                 fp16_embeddings: bool = True):
        self.device = torch.device(device) if isinstance(device, str) else device
        self.model = model.to(self.device).eval()
        self.model_id = model_id
        self.fp16_embeddings = fp16_embeddings
        self.transform = ResizeLongestSide(self.model.image_encoder.img_size)
        # One image encode at a time: parallel encodes only thrash the same cores / GPU memory.
        self._encode_lock = threading.Lock()

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, model_type: str = "vit_b",
                        device: str = "auto", fp16_embeddings: bool = True) -> "SamSegmenter":
        path = Path(checkpoint)
        if model_type not in sam_model_registry:
            raise ModelLoadError(f"unknown SAM model type {model_type!r}")
        if not path.is_file():
            raise ModelLoadError(f"SAM checkpoint not found: {path}")
        model = sam_model_registry[model_type](checkpoint=None)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as exc:  # corrupt file, wrong architecture, not a checkpoint
            raise ModelLoadError(f"cannot load SAM {model_type} checkpoint {path.name}: {exc}") from exc
        stat = path.stat()
        digest = hashlib.blake2b(f"{path.name}|{stat.st_size}|{stat.st_mtime_ns}".encode(),
                                 digest_size=4).hexdigest()
        return cls(model, f"sam-{model_type}-{digest}", resolve_device(device), fp16_embeddings)

    @torch.inference_mode()
    def embed(self, image: np.ndarray) -> Embedding:
        rgb = to_rgb8(image)
        resized = self.transform.apply_image(rgb)
        x = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]
        x = self.model.preprocess(x.float())
        with self._encode_lock:
            features = self.model.image_encoder(x)
        if self.fp16_embeddings:
            features = features.half()
        data = _SamFeatures(features, (int(resized.shape[0]), int(resized.shape[1])))
        return Embedding(self.model_id, (int(rgb.shape[0]), int(rgb.shape[1])), data,
                         features.numel() * features.element_size())

    # --- serialisation (shared embedding cache) --------------------------------------------------

    def embedding_arrays(self, embedding: Embedding) -> dict[str, np.ndarray]:
        data: _SamFeatures = embedding.data
        return {"features": data.features.detach().cpu().numpy(),
                "input_size": np.asarray(data.input_size, np.int32)}

    def embedding_from_arrays(self, image_size: tuple[int, int], arrays: dict[str, np.ndarray]) -> Embedding:
        from .base import EmbeddingFormatError

        features, input_size = arrays["features"], arrays["input_size"]
        expected = (1, self.model.prompt_encoder.embed_dim, *self.model.prompt_encoder.image_embedding_size)
        if features.dtype.kind != "f" or tuple(features.shape) != expected:
            raise EmbeddingFormatError(f"SAM features must be float {expected}, got {features.dtype} "
                                       f"{tuple(features.shape)}")
        size = self.transform.get_preprocess_shape(image_size[0], image_size[1], self.transform.target_length)
        if input_size.shape != (2,) or tuple(int(v) for v in input_size) != tuple(size):
            raise EmbeddingFormatError(f"input size {input_size.tolist()} does not fit image size {image_size}")
        dtype = torch.float16 if self.fp16_embeddings else torch.float32
        tensor = torch.from_numpy(features.copy()).to(device=self.device, dtype=dtype)
        data = _SamFeatures(tensor, (int(size[0]), int(size[1])))
        return Embedding(self.model_id, image_size, data, tensor.numel() * tensor.element_size())

    @torch.inference_mode()
    def segment(self, embedding: Embedding, prompt: Prompt) -> Region:
        if prompt.is_empty:
            raise ValueError("prompt has no positive point or box")
        data: _SamFeatures = embedding.data
        original = embedding.image_size
        points = None
        if prompt.points:
            coords = self.transform.apply_coords(prompt.point_array(), original)
            points = (torch.as_tensor(coords, dtype=torch.float, device=self.device)[None],
                      torch.as_tensor(prompt.label_array(), dtype=torch.int, device=self.device)[None])
        boxes = None
        if prompt.box is not None:
            box = self.transform.apply_boxes(np.asarray([prompt.box], dtype=np.float32), original)
            boxes = torch.as_tensor(box, dtype=torch.float, device=self.device)
        sparse, dense = self.model.prompt_encoder(points=points, boxes=boxes, masks=None)
        # One positive click is ambiguous (part, object, group): ask for three masks, keep the best.
        multimask = prompt.box is None and len(prompt.points) == 1
        low_res, iou_pred = self.model.mask_decoder(
            image_embeddings=data.features.float(),
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
        best = int(torch.argmax(iou_pred[0]))
        masks = self.model.postprocess_masks(low_res[:, best:best + 1], data.input_size, original)
        mask = (masks[0, 0] > self.model.mask_threshold).cpu().numpy()
        score = float(iou_pred[0, best].clamp(0, 1))
        return mask_region(mask, score, prompt.label, predicted_iou=score)

    def describe(self) -> dict:
        return {"segmenter": "sam", "model_id": self.model_id, "device": str(self.device)}
