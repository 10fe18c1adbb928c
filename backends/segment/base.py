"""The interactive segmenter interface: one expensive `embed`, many cheap `segment` calls."""
from __future__ import annotations

import abc
import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..types import Prompt, Region


@dataclass(frozen=True)
class Embedding:
    """Whatever a segmenter precomputes for one image; opaque to everyone else.

    `nbytes` is what the embedding cache charges for it; `image_size` is (height, width) of the
    original image so prompts can be checked and masks returned at full size.
    """

    model_id: str
    image_size: tuple[int, int]
    data: Any
    nbytes: int


class Segmenter(abc.ABC):
    """Interactive segmenter. Thread-safe: `segment` may be called from many threads at once."""

    #: Identifies the model and its weights; part of the embedding cache key and model_version.
    model_id: str = "segmenter"

    @abc.abstractmethod
    def embed(self, image: np.ndarray) -> Embedding:
        """Precompute what clicks on this image need (gray/RGB, 8- or 16-bit)."""

    @abc.abstractmethod
    def segment(self, embedding: Embedding, prompt: Prompt) -> Region:
        """Answer one prompt with a `Region` of kind "mask" (bool HxW at original size)."""

    def describe(self) -> dict[str, Any]:
        return {"segmenter": type(self).__name__, "model_id": self.model_id}

    # --- serialisation (the shared embedding cache) --------------------------------------------
    # An embedding travels as named numpy arrays in a small format of our own (`dump_embedding`):
    # no pickle, so bytes read back from a shared store can be wrong but never run code.

    def embedding_arrays(self, embedding: Embedding) -> dict[str, np.ndarray]:
        """The arrays that rebuild `embedding` (with its model_id and image_size). The default
        handles `data` that is one array or a dict of arrays; segmenters with other data override
        this and `embedding_from_arrays`."""
        data = embedding.data
        if isinstance(data, np.ndarray):
            return {"data": data}
        if isinstance(data, dict) and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in data.items()):
            return dict(data)
        raise NotImplementedError(f"{type(self).__name__} cannot serialise its embeddings")

    def embedding_from_arrays(self, image_size: tuple[int, int], arrays: dict[str, np.ndarray]) -> Embedding:
        """Inverse of `embedding_arrays`; raises EmbeddingFormatError when the arrays do not fit."""
        data: Any = arrays["data"] if set(arrays) == {"data"} else dict(arrays)
        return Embedding(self.model_id, image_size, data, int(sum(a.nbytes for a in arrays.values())))

    def dump_embedding(self, embedding: Embedding, fp16: bool = True) -> bytes:
        """`embedding` as bytes (uncompressed). With fp16, float arrays are stored as float16."""
        arrays = self.embedding_arrays(embedding)
        if fp16:
            arrays = {k: a.astype(np.float16) if a.dtype.kind == "f" else a for k, a in arrays.items()}
        return pack_arrays({"model_id": embedding.model_id,
                            "image_size": [int(v) for v in embedding.image_size]}, arrays)

    def load_embedding(self, blob: bytes) -> Embedding:
        """An embedding from `dump_embedding`'s bytes. Bytes that are not one of this segmenter's
        embeddings (another model, a foreign or damaged value) raise EmbeddingFormatError."""
        meta, arrays = unpack_arrays(blob)
        if meta.get("model_id") != self.model_id:
            raise EmbeddingFormatError(f"embedding is from {meta.get('model_id')!r}, not {self.model_id!r}")
        size = meta.get("image_size")
        if (not isinstance(size, list) or len(size) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
            raise EmbeddingFormatError(f"bad image_size {size!r}")
        try:
            return self.embedding_from_arrays((size[0], size[1]), arrays)
        except EmbeddingFormatError:
            raise
        except (KeyError, ValueError, TypeError) as exc:
            raise EmbeddingFormatError(f"arrays do not fit {type(self).__name__}: {exc}") from None


class EmbeddingFormatError(ValueError):
    """Bytes that are not a serialised embedding this segmenter can use."""


_MAGIC = b"LAEMB\x00\x01\x00"  # format version 1
_DTYPES = {"|b1", "|u1", "|i1", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8", "<f2", "<f4", "<f8"}
_ALIGN = 16


def pack_arrays(meta: dict, arrays: dict[str, np.ndarray]) -> bytes:
    """magic, uint32 header length, JSON header (meta + each array's name, dtype, shape, offset),
    then the arrays' bytes (C order, little-endian, each at a 16-byte aligned offset)."""
    specs, parts, offset = [], [], 0
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        dtype = a.dtype.str
        if dtype not in _DTYPES:
            raise NotImplementedError(f"array {name!r} has dtype {a.dtype}, which embeddings cannot hold")
        pad = -offset % _ALIGN
        parts.append(b"\x00" * pad)
        offset += pad
        specs.append({"name": name, "dtype": dtype, "shape": list(a.shape), "offset": offset})
        parts.append(a.tobytes())
        offset += a.nbytes
    header = json.dumps({**meta, "arrays": specs}, separators=(",", ":")).encode()
    head = _MAGIC + struct.pack("<I", len(header)) + header
    head += b"\x00" * (-len(head) % _ALIGN)
    return head + b"".join(parts)


def unpack_arrays(blob: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """Inverse of `pack_arrays`. Arrays are read-only views of `blob`. EmbeddingFormatError on
    anything else: a wrong magic, a bad header, a dtype outside the plain numeric ones, sizes that
    do not add up."""
    blob = bytes(blob)
    if len(blob) < len(_MAGIC) + 4 or not blob.startswith(_MAGIC):
        raise EmbeddingFormatError("not a serialised embedding (bad magic)")
    (n,) = struct.unpack_from("<I", blob, len(_MAGIC))
    start = len(_MAGIC) + 4
    if start + n > len(blob):
        raise EmbeddingFormatError("truncated header")
    try:
        meta = json.loads(blob[start:start + n])
    except ValueError:
        raise EmbeddingFormatError("header is not JSON") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("arrays"), list):
        raise EmbeddingFormatError("header has no array list")
    base = start + n + (-(start + n) % _ALIGN)
    arrays: dict[str, np.ndarray] = {}
    for spec in meta.pop("arrays"):
        try:
            name, dtype, shape, offset = spec["name"], spec["dtype"], spec["shape"], spec["offset"]
            ok = (isinstance(name, str) and dtype in _DTYPES and isinstance(shape, list)
                  and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in shape)
                  and isinstance(offset, int) and not isinstance(offset, bool) and offset >= 0)
        except (KeyError, TypeError):
            ok = False
        if not ok or name in arrays:
            raise EmbeddingFormatError(f"bad array entry {spec!r}"[:200])
        dt = np.dtype(dtype)
        count = math.prod(shape)
        end = base + offset + count * dt.itemsize
        if end > len(blob):
            raise EmbeddingFormatError(f"array {name!r} runs past the end of the data")
        arrays[name] = np.frombuffer(blob, dt, count, base + offset).reshape(shape)
    return meta, arrays


def mask_region(mask: np.ndarray, score: float, label: str | None, **extra: Any) -> Region:
    score = float(np.clip(score, 0.0, 1.0))
    return Region(label=label, kind="mask", geometry=mask.astype(bool), score=score,
                  uncertainty=1.0 - score, extra=extra)
