"""Real architectures at toy size, built without weights (nothing is downloaded)."""
from __future__ import annotations

from functools import partial

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
