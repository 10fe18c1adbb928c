"""SamSegmenter with segment-anything's real modules at toy size (no weights, nothing downloaded)."""
import threading

import numpy as np
import pytest
import torch

from labelassist.backends.cache import ByteLRU
from labelassist.backends.segment.sam import ModelLoadError, SamSegmenter
from labelassist.backends.types import Prompt
from tiny_models import count_calls, tiny_sam


@pytest.fixture(scope="module")
def segmenter():
    return SamSegmenter(tiny_sam(), "sam-tiny", "cpu", fp16_embeddings=True)


def _image(h=180, w=240, channels=3, dtype=np.uint8):
    rng = np.random.default_rng(0)
    top = 255 if dtype == np.uint8 else 4000
    shape = (h, w, channels) if channels else (h, w)
    return rng.integers(0, top, size=shape).astype(dtype)


@pytest.mark.parametrize("channels,dtype", [(3, np.uint8), (0, np.uint8), (0, np.uint16)])
def test_mask_at_original_size_for_colour_and_gray(segmenter, channels, dtype):
    emb = segmenter.embed(_image(channels=channels, dtype=dtype))
    assert emb.image_size == (180, 240)
    assert emb.data.features.dtype == torch.float16
    assert emb.nbytes == emb.data.features.numel() * 2
    for prompt in [Prompt(points=((100, 90),), positive=(True,)),
                   Prompt(box=(50, 40, 150, 120)),
                   Prompt(points=((100, 90), (20, 20)), positive=(True, False), box=(50, 40, 150, 120))]:
        region = segmenter.segment(emb, prompt)
        assert region.kind == "mask" and region.geometry.shape == (180, 240)
        assert region.geometry.dtype == bool and 0.0 <= region.score <= 1.0


def test_only_negative_points_are_rejected(segmenter):
    emb = segmenter.embed(_image())
    with pytest.raises(ValueError, match="positive"):
        segmenter.segment(emb, Prompt(points=((10, 10),), positive=(False,)))


def test_encoder_runs_once_for_many_clicks():
    seg = SamSegmenter(tiny_sam(), "sam-tiny", "cpu")
    calls = count_calls(seg.model.image_encoder)
    decoder_calls = count_calls(seg.model.mask_decoder)
    cache = ByteLRU(10**8, lambda e: e.nbytes)
    image = _image()
    for i in range(10):
        emb = cache.get_or_compute(("img", seg.model_id), lambda: seg.embed(image))
        seg.segment(emb, Prompt(points=((20 + i * 10, 50),), positive=(True,)))
    assert calls[0] == 1
    assert decoder_calls[0] == 10


def test_encoder_runs_once_under_concurrent_first_clicks():
    seg = SamSegmenter(tiny_sam(), "sam-tiny", "cpu")
    calls = count_calls(seg.model.image_encoder)
    cache = ByteLRU(10**8, lambda e: e.nbytes)
    image = _image()
    barrier = threading.Barrier(6)
    masks, errors = [], []

    def click(i):
        try:
            barrier.wait(5)
            emb = cache.get_or_compute(("img", seg.model_id), lambda: seg.embed(image))
            masks.append(seg.segment(emb, Prompt(points=((30 + i * 20, 60),), positive=(True,))).geometry)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=click, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(masks) == 6
    assert calls[0] == 1


def test_checkpoint_round_trip_and_bad_files(tmp_path, monkeypatch):
    from labelassist.backends.segment import sam

    # A "vit_b" registry entry that builds the tiny model keeps the loading code path real and fast.
    monkeypatch.setitem(sam.sam_model_registry, "vit_b", lambda checkpoint=None: tiny_sam(seed=1))
    good = tmp_path / "tiny.pth"
    torch.save(tiny_sam(seed=3).state_dict(), good)
    seg = SamSegmenter.from_checkpoint(good, "vit_b", "cpu")
    ref = tiny_sam(seed=3)
    assert torch.equal(seg.model.mask_decoder.iou_token.weight, ref.mask_decoder.iou_token.weight)
    assert seg.model_id.startswith("sam-vit_b-")

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="truncated.pth"):
        SamSegmenter.from_checkpoint(truncated, "vit_b", "cpu")
    with pytest.raises(ModelLoadError, match="not found"):
        SamSegmenter.from_checkpoint(tmp_path / "missing.pth", "vit_b", "cpu")
    with pytest.raises(ModelLoadError, match="unknown SAM model type"):
        SamSegmenter.from_checkpoint(good, "vit_x", "cpu")
