"""Batched augmentation (crop with zero padding, flip, normalise) and the in-memory loader."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from teskd.data.arrays import ImageArrays
from teskd.data.augment import BatchAugment, normalize
from teskd.data.memory_loader import InMemoryLoader
from teskd.errors import TeskdError

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2023, 0.1994, 0.2010)


def _images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def reference_uint8(x: torch.Tensor, tops, lefts, flips, crop: int, padding: int) -> torch.Tensor:
    """Per-image pad / crop / flip with plain numpy slicing."""
    out = []
    for img, t, l, f in zip(x.numpy(), tops.tolist(), lefts.tolist(), flips.tolist()):
        c, h, w = img.shape
        padded = np.zeros((c, h + 2 * padding, w + 2 * padding), np.uint8)
        padded[:, padding:padding + h, padding:padding + w] = img
        window = padded[:, t:t + crop, l:l + crop]
        out.append(window[:, :, ::-1] if f else window)
    return torch.from_numpy(np.ascontiguousarray(np.stack(out)))


# --- normalize ----------------------------------------------------------------------------------


def test_normalize_values():
    x = torch.tensor([0, 255, 128], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 4, 4).contiguous()
    out = normalize(x, MEAN, STD)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 4, 4)
    expected = [(0 / 255 - MEAN[0]) / STD[0], (1 - MEAN[1]) / STD[1], (128 / 255 - MEAN[2]) / STD[2]]
    for c in range(3):
        assert torch.allclose(out[:, c], torch.full((2, 4, 4), expected[c]), atol=1e-6)
    with pytest.raises(TeskdError, match="uint8"):
        normalize(x.float(), MEAN, STD)


# --- BatchAugment -------------------------------------------------------------------------------


def test_shapes_and_dtype():
    aug = BatchAugment(MEAN, STD)
    out = aug(_images(7), _gen(0))
    assert out.dtype == torch.float32 and out.shape == (7, 3, 32, 32) and out.is_contiguous()
    out = BatchAugment(MEAN, STD, crop=24, padding=2)(_images(5), _gen(0))
    assert out.shape == (5, 3, 24, 24)
    with pytest.raises(TeskdError, match="cannot crop 40x40"):
        BatchAugment(MEAN, STD, crop=40, padding=2)(_images(2), _gen(0))


def test_no_padding_no_flip_is_plain_normalize():
    x = _images(16)
    assert torch.equal(BatchAugment(MEAN, STD, padding=0, flip=False)(x, _gen(1)), normalize(x, MEAN, STD))


def test_same_generator_state_same_output_and_cpu_draws():
    aug, x = BatchAugment(MEAN, STD), _images(32)
    assert torch.equal(aug(x, _gen(5)), aug(x, _gen(5)))
    assert not torch.equal(aug(x, _gen(5)), aug(x, _gen(6)))
    tops, lefts, flips = aug.draw(32, 32, 32, _gen(5))
    assert tops.device.type == lefts.device.type == flips.device.type == "cpu"
    assert int(tops.min()) >= 0 and int(tops.max()) <= 8 and int(lefts.max()) <= 8


def test_flips_really_happen():
    x = _images(512, seed=2)
    out = BatchAugment(MEAN, STD, padding=0, flip=True)(x, _gen(3))
    plain, flipped = normalize(x, MEAN, STD), normalize(x.flip(-1), MEAN, STD)
    is_plain = (out == plain).flatten(1).all(1)
    is_flipped = (out == flipped).flatten(1).all(1)
    assert bool((is_plain ^ is_flipped).all())  # every output is exactly one of the two
    frac = is_flipped.float().mean().item()
    assert 0.4 <= frac <= 0.6, frac
    # flip=False never flips
    out = BatchAugment(MEAN, STD, padding=0, flip=False)(x, _gen(3))
    assert torch.equal(out, plain)


def test_each_output_is_a_window_of_the_zero_padded_input():
    x = _images(24, seed=4)
    aug = BatchAugment(MEAN, STD, crop=32, padding=4, flip=True)
    out = aug(x, _gen(7))
    padded = normalize(torch.nn.functional.pad(x, (4, 4, 4, 4)), MEAN, STD)  # zero pixels before normalising
    found = []
    for b in range(x.shape[0]):
        matches = [(t, l, f) for t in range(9) for l in range(9) for f in (False, True)
                   if torch.equal(out[b], (lambda w: w.flip(-1) if f else w)(padded[b, :, t:t + 32, l:l + 32]))]
        assert len(matches) == 1, (b, matches)
        found.append(matches[0])
    # crops vary and flips happen
    assert len({(t, l) for t, l, _ in found}) >= 12
    assert len({t for t, _, _ in found}) >= 5 and len({l for _, l, _ in found}) >= 5
    assert 0 < sum(f for _, _, f in found) < len(found)
    # and they are exactly the drawn choices
    tops, lefts, flips = aug.draw(24, 32, 32, _gen(7))
    assert found == list(zip(tops.tolist(), lefts.tolist(), flips.tolist()))


def test_padding_is_black_before_normalisation():
    x = torch.full((64, 3, 32, 32), 200, dtype=torch.uint8)
    aug = BatchAugment(MEAN, STD, padding=4, flip=False)
    out = aug(x, _gen(0))
    black = normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8), MEAN, STD).view(3)
    tops, lefts, _ = aug.draw(64, 32, 32, _gen(0))
    b = int(torch.nonzero(tops == 0)[0])  # an image cropped at the very top: its first 4 rows are padding
    for c in range(3):
        assert torch.equal(out[b, c, :4], torch.full((4, 32), float(black[c])))
    assert torch.equal(out[b, :, 4:, max(0, 4 - int(lefts[b])):32 - max(0, int(lefts[b]) - 4)],
                       normalize(x[:1], MEAN, STD)[0, :, 4:, :32 - abs(int(lefts[b]) - 4)])


def test_matches_per_image_reference_for_drawn_offsets():
    x = _images(128, seed=8)
    aug = BatchAugment(MEAN, STD)
    tops, lefts, flips = aug.draw(128, 32, 32, _gen(11))
    expected = normalize(reference_uint8(x, tops, lefts, flips, 32, 4), MEAN, STD)
    assert torch.equal(aug(x, _gen(11)), expected)


def test_matches_torchvision_functional():
    tvf = pytest.importorskip("torchvision.transforms.functional")
    x = _images(16, seed=9)
    aug = BatchAugment(MEAN, STD)
    tops, lefts, flips = aug.draw(16, 32, 32, _gen(12))
    out = aug(x, _gen(12))
    for b in range(16):
        img = tvf.crop(tvf.pad(x[b], [4], fill=0), int(tops[b]), int(lefts[b]), 32, 32)
        if flips[b]:
            img = tvf.hflip(img)
        img = tvf.normalize(img.float() / 255, MEAN, STD)
        assert torch.allclose(out[b], img, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 6), size=st.integers(4, 12), padding=st.integers(0, 3), shrink=st.integers(0, 3),
       flip=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_property_matches_reference(n, size, padding, shrink, flip, seed):
    crop = size - shrink
    x = _images(n, size=size, seed=seed % 1000)
    aug = BatchAugment(MEAN, STD, crop=crop, padding=padding, flip=flip)
    tops, lefts, flips = aug.draw(n, size, size, _gen(seed))
    assert int(tops.max()) <= size + 2 * padding - crop and int(lefts.max()) <= size + 2 * padding - crop
    expected = normalize(reference_uint8(x, tops, lefts, flips, crop, padding), MEAN, STD)
    assert torch.equal(aug(x, _gen(seed)), expected)


# --- InMemoryLoader -----------------------------------------------------------------------------


def _labelled(n: int = 50, num_classes: int = 7) -> ImageArrays:
    """Image i is constant, equal to its label (so the label can be read back from the pixels)."""
    labels = torch.tensor([(i * 3) % num_classes for i in range(n)], dtype=torch.int64)
    images = labels.to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous()
    return ImageArrays(images, labels, [str(c) for c in range(num_classes)])


UNIT = partial(normalize, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # x / 255


def _collect(iterable):
    return [tuple(t.clone() for t in batch) for batch in iterable]


def test_labels_stay_attached_eval_and_train():
    arrays = _labelled()
    loader = InMemoryLoader(arrays, 8, shuffle=True, drop_last=False, transform=UNIT, device="cpu", seed=3)
    seen = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        for images, labels, _ in loader:
            assert images.dtype == torch.float32 and labels.dtype == torch.int64
            decoded = torch.round(images * 255).to(torch.int64)
            assert torch.equal(decoded, labels.view(-1, 1, 1, 1).expand_as(decoded))
            seen.append(labels)
    assert sorted(torch.cat(seen[: len(loader)]).tolist()) == sorted(arrays.labels.tolist())

    aug = BatchAugment((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), padding=4, flip=True)
    loader = InMemoryLoader(arrays, 8, shuffle=True, drop_last=True, transform=aug, device="cpu", seed=3)
    for images, labels, _ in loader:
        center = torch.round(images[:, :, 12:20, 12:20] * 255).to(torch.int64)  # never padding
        assert torch.equal(center, labels.view(-1, 1, 1, 1).expand_as(center))


def test_every_sample_once_per_epoch_and_unshuffled_order():
    arrays = _labelled(23)
    idx_images = torch.arange(23, dtype=torch.uint8).view(23, 1, 1, 1).expand(23, 3, 32, 32).contiguous()
    arrays = ImageArrays(idx_images, arrays.labels, arrays.classes)
    for shuffle in (True, False):
        loader = InMemoryLoader(arrays, 5, shuffle=shuffle, drop_last=False, transform=UNIT, device="cpu")
        batches = list(loader)
        ids = torch.cat([torch.round(x[:, 0, 0, 0] * 255).long() for x, *_ in batches])
        assert torch.equal(ids, torch.cat([batch.index for batch in batches]))  # index names the images
        assert sorted(ids.tolist()) == list(range(23))
        assert (ids.tolist() == list(range(23))) == (not shuffle)


def test_loader_determinism():
    arrays = ImageArrays(_images(40, seed=5), torch.arange(40) % 5, [str(i) for i in range(5)])
    aug = BatchAugment(MEAN, STD)

    def make(seed):
        return InMemoryLoader(arrays, 16, shuffle=True, drop_last=False, transform=aug, device="cpu", seed=seed)

    a, b = make(1), make(1)
    a.set_epoch(3)
    b.set_epoch(3)
    first, second = _collect(a), _collect(b)
    again = _collect(a)
    for batch_a, batch_b, batch_c in zip(first, second, again):
        for ta, tb, tc in zip(batch_a, batch_b, batch_c):
            assert torch.equal(ta, tb) and torch.equal(ta, tc)

    b.set_epoch(4)
    other_epoch = _collect(b)
    assert not torch.equal(torch.cat([y for _, y, _ in first]), torch.cat([y for _, y, _ in other_epoch]))
    c = make(2)
    c.set_epoch(3)
    assert not torch.equal(torch.cat([x for x, *_ in first]), torch.cat([x for x, *_ in _collect(c)]))


def test_skipping_batches_is_exact():
    arrays = ImageArrays(_images(70, seed=6), torch.arange(70) % 10, [str(i) for i in range(10)])
    loader = InMemoryLoader(arrays, 8, shuffle=True, drop_last=False, transform=BatchAugment(MEAN, STD),
                            device="cpu", seed=9)
    loader.set_epoch(2)
    full = _collect(loader)
    assert len(full) == len(loader) == 9
    for start in (1, 4, 8, 9):
        tail = _collect(loader.iter_from(start))
        assert len(tail) == len(full) - start
        for got, want in zip(tail, full[start:]):
            assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_len_and_batch_sizes():
    arrays = _labelled(10)
    for drop_last, expected_sizes in ((False, [4, 4, 2]), (True, [4, 4])):
        loader = InMemoryLoader(arrays, 4, shuffle=True, drop_last=drop_last, transform=UNIT, device="cpu")
        assert len(loader) == len(expected_sizes)
        assert [y.shape[0] for _, y, _ in loader] == expected_sizes
    assert len(InMemoryLoader(arrays, 5, shuffle=False, drop_last=True, transform=UNIT, device="cpu")) == 2
    assert len(InMemoryLoader(arrays, 20, shuffle=False, drop_last=False, transform=UNIT, device="cpu")) == 1
    assert len(InMemoryLoader(arrays, 20, shuffle=False, drop_last=True, transform=UNIT, device="cpu")) == 0
    with pytest.raises(TeskdError, match="batch size"):
        InMemoryLoader(arrays, 0, shuffle=False, drop_last=False, transform=UNIT, device="cpu")


def test_extras_are_off_by_default_and_leave_the_crop_and_flip_stream_unchanged():
    from teskd.data.augment import BatchAugment

    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    plain = BatchAugment((0.5,) * 3, (0.25,) * 3)
    assert not plain.autoaugment and plain.cutout == 0
    with_cutout = BatchAugment((0.5,) * 3, (0.25,) * 3, cutout=8)
    a = plain(x, torch.Generator().manual_seed(4))
    b = with_cutout(x, torch.Generator().manual_seed(4))
    zeroed = b == 0
    # cutout only zeroes pixels (all channels of a square), the rest is the plain batch
    assert torch.equal(a[~zeroed], b[~zeroed])
    per_image = zeroed.all(dim=1).flatten(1).sum(1)
    assert per_image.max() <= 64 and per_image.min() >= 16  # an 8x8 square, at least a 4x4 corner of it


def test_cutout_mask_by_hand():
    from teskd.data.augment import cutout_mask

    g = torch.Generator().manual_seed(0)
    centres = torch.randint(0, 10, (2, 3), generator=torch.Generator().manual_seed(0))
    mask = cutout_mask(3, 10, 4, g)
    for i in range(3):
        y, x = centres[0, i].item(), centres[1, i].item()
        expect = torch.ones(10, 10)
        expect[max(y - 2, 0):min(y + 2, 10), max(x - 2, 0):min(x + 2, 10)] = 0
        assert torch.equal(mask[i, 0], expect)


def test_autoaugment_is_seeded_per_batch():
    from teskd.data.augment import BatchAugment

    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    aug = BatchAugment((0.5,) * 3, (0.25,) * 3, autoaugment=True)
    first = aug(x, torch.Generator().manual_seed(1))
    assert torch.equal(first, aug(x, torch.Generator().manual_seed(1)))
    plain = BatchAugment((0.5,) * 3, (0.25,) * 3)(x, torch.Generator().manual_seed(1))
    assert not torch.equal(first, plain)
