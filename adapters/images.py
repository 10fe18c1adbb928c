"""Image bytes -> numpy, for every adapter: the pixel count is checked before any pixel is decoded."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import MediaError


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode image bytes to a numpy array, checking the pixel count before decoding any pixels.

    Returns uint8 ``HxW`` for 1-bit/8-bit gray, uint16 ``HxW`` for 16-bit gray (int32 when 32-bit
    values do not fit), float32 ``HxW`` for float images, and uint8 ``HxWx3`` RGB for everything
    else (palette, CMYK, LA, RGBA: alpha is dropped). EXIF orientation is applied.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if width * height > max_pixels:
                raise MediaError(413, f"image is {width} x {height} pixels, over the limit of {max_pixels}")
            im = ImageOps.exif_transpose(im)
            return _to_array(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MediaError(413, f"image rejected as a decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise MediaError(422, "not an image (unrecognised image format)") from None
    except MediaError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise MediaError(422, f"image could not be decoded: {exc}") from None


def _to_array(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode == "1":
        im = im.convert("L")
        mode = "L"
    if mode == "L":
        return np.asarray(im, dtype=np.uint8).copy()
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16)
    if mode == "I":
        arr = np.asarray(im)
        if arr.size and arr.min() >= 0 and arr.max() <= 0xFFFF:
            return arr.astype(np.uint16)
        return arr.astype(np.int32)
    if mode == "F":
        return np.asarray(im, dtype=np.float32).copy()
    if mode != "RGB":
        if mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8).copy()
