"""Image normalisation shared by every backend: any numpy image in, RGB uint8 out."""
from __future__ import annotations

import hashlib

import numpy as np


def to_rgb8(image: np.ndarray) -> np.ndarray:
    """Convert gray/RGB/RGBA images of 8 or 16 bits (or floats) to contiguous RGB uint8.

    16-bit and float images are stretched between their 0.5th and 99.5th percentiles, which keeps
    microscopy-style images (that use a fraction of the 16-bit range) visible.
    """
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (3, 4)):
        raise ValueError(f"unsupported image shape {img.shape}")
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]
    if img.dtype != np.uint8:
        img = _stretch_to_uint8(img)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img)


def _stretch_to_uint8(img: np.ndarray) -> np.ndarray:
    data = img.astype(np.float32)
    if img.dtype == np.bool_:
        return (data * 255).astype(np.uint8)
    lo, hi = np.percentile(data, [0.5, 99.5])
    if hi <= lo:
        lo, hi = float(data.min()), float(data.max())
    if hi <= lo:
        return np.zeros(img.shape, dtype=np.uint8)
    out = (data - lo) * (255.0 / (hi - lo))
    return np.clip(out, 0, 255).astype(np.uint8)


def content_hash(image: np.ndarray) -> str:
    """A stable key for an image's pixels (shape and dtype included)."""
    img = np.ascontiguousarray(image)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{img.shape}|{img.dtype}".encode())
    h.update(memoryview(img).cast("B"))
    return h.hexdigest()
