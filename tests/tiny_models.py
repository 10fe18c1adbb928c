"""Real architectures at toy size, built without weights (nothing is downloaded)."""
from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer


def tiny_sam(img_size: int = 256, seed: int = 0) -> Sam:
    """segment-anything's own modules with a two-block ViT encoder: same code paths as vit_b."""
    torch.manual_seed(seed)
    grid = img_size // 16
    encoder = ImageEncoderViT(
        img_size=img_size, patch_size=16, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2,
        out_chans=256, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=True, window_size=4, global_attn_indexes=(1,),
    )
    prompt = PromptEncoder(embed_dim=256, image_embedding_size=(grid, grid),
                           input_image_size=(img_size, img_size), mask_in_chans=16)
    decoder = MaskDecoder(num_multimask_outputs=3,
                          transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=512, num_heads=8),
                          transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=64)
    return Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder,
               pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375]).eval()


def count_calls(module: torch.nn.Module) -> list[int]:
    """A counter that goes up by one every time `module` runs forward."""
    calls = [0]

    def hook(*_):
        calls[0] += 1

    module.register_forward_hook(hook)
    return calls


def train_tiny(root: Path, arch: str, task: str, epochs: int, imgsz: int, n_train: int, n_val: int = 4,
               seed: int = 0) -> tuple[Path, float]:
    """Train `arch` (an architecture .yaml: random init, nothing downloaded) on synthetic scenes on
    the CPU; return (last.pt, seconds)."""
    import pytest

    from labelassist.backends.detect.yolo import import_ultralytics
    from synthetic_detection import write_yolo_dataset

    import_ultralytics()  # offline, before anything else imports ultralytics
    import ultralytics.data.utils as data_utils
    from ultralytics import YOLO

    data = write_yolo_dataset(root / "data", n_train, n_val, imgsz, task=task, seed=seed)
    t0 = time.perf_counter()
    with pytest.MonkeyPatch.context() as mp:
        # Checking a detection data set fetches Arial.ttf for plots even with plots=False.
        mp.setattr(data_utils, "check_font", lambda *a, **k: None)
        model = YOLO(arch)
        # nbs=batch: an optimizer step every batch (the default accumulates to 64 images, which
        # leaves a 60-image data set one step per epoch and nothing learnt).
        model.train(data=str(data), epochs=epochs, imgsz=imgsz, batch=8, nbs=8, workers=0, device="cpu",
                    amp=False, plots=False, val=False, project=str(root / "runs"), name="train",
                    exist_ok=True, verbose=False, seed=seed, deterministic=True)
    weights = root / "runs" / "train" / "weights" / "last.pt"
    assert weights.is_file()
    return weights, time.perf_counter() - t0
