"""Tests of the fastai loaders and the batch transforms of pcamlib.data."""

from __future__ import annotations

import dataclasses
import itertools
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from fastai.torch_core import TensorCategory, TensorImage

from pcamlib.data import (
    AugmentConfig,
    NormalizeImage,
    PCamAugment,
    ToFloatImage,
    batch_pipeline,
    centre_mask_fraction,
    default_num_workers,
    dihedral,
    pcam_dataloaders,
    split_dataloader,
)
from pcamlib.pcam import PCamSplit, channel_stats, file_name

IDENTITY = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny batches: on a busy machine intra-op threads only spin (about 50x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _dls(root, **kwargs):
    settings = dict(IDENTITY, bs=8, device="cpu", num_workers=0, augment=None)
    settings.update(kwargs)
    return pcam_dataloaders(root, **settings)


def _rows(x: torch.Tensor) -> list[int]:
    """Row numbers encoded by the conftest ``index_pixels`` pattern (identity stats)."""
    px = (torch.as_tensor(x)[:, :2, 0, 0] * 255).round().long()
    return (px[:, 0] + 256 * px[:, 1]).tolist()


def _epoch(dl) -> tuple[list[int], list[int], list[int]]:
    rows, labels, sizes = [], [], []
    for xb, yb in dl:
        rows += _rows(xb)
        labels += yb.tolist()
        sizes.append(len(yb))
    return rows, labels, sizes


def _expected(root, split, mean, std) -> torch.Tensor:
    with h5py.File(root / file_name(split, "x"), "r") as f:
        x = torch.from_numpy(f["x"][()]).permute(0, 3, 1, 2).double() / 255
    mean = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    return ((x - mean) / std).float()


# ---------------------------------------------------------------- loaders


def test_train_batches_normalised(make_pcam_dir):
    root = make_pcam_dir({"train": 64, "valid": 8}, seed=4)
    stats = channel_stats(PCamSplit(root, "train"))
    dls = _dls(root, mean=stats["mean"], std=stats["std"], bs=16)
    xs = []
    for xb, yb in dls.train:
        assert isinstance(xb, TensorImage) and isinstance(yb, TensorCategory)
        assert xb.dtype == torch.float32 and tuple(xb.shape) == (16, 3, 96, 96)
        assert yb.dtype == torch.int64 and tuple(yb.shape) == (16,)
        assert set(yb.tolist()) <= {0, 1}
        xs.append(xb)
    assert len(xs) == 4  # 64 rows, bs 16: drop_last drops nothing
    x = torch.cat(xs).double()
    np.testing.assert_allclose(x.mean(dim=(0, 2, 3)), 0.0, atol=1e-4)
    np.testing.assert_allclose(x.std(dim=(0, 2, 3)), 1.0, atol=1e-3)
    # Sanity: without normalisation the same data is far from mean 0, std 1.
    raw = torch.cat([xb for xb, _ in _dls(root, bs=16).train]).double()
    assert raw.mean() > 0.3


def test_valid_batches_equal_manual_normalisation(make_pcam_dir):
    root = make_pcam_dir({"train": 16, "valid": 20}, seed=2)
    mean, std = (0.7, 0.5, 0.6), (0.2, 0.25, 0.15)
    dls = _dls(root, mean=mean, std=std, bs=4)
    batches = list(dls.valid)
    assert [len(yb) for _, yb in batches] == [8, 8, 4]  # val_bs defaults to 2 x bs
    x = torch.cat([xb for xb, _ in batches])
    torch.testing.assert_close(x, _expected(root, "valid", mean, std), atol=1e-5, rtol=0)
    labels = torch.cat([yb for _, yb in batches])
    np.testing.assert_array_equal(labels.numpy(), PCamSplit(root, "valid").labels)


def test_epoch_visits(make_pcam_dir):
    root = make_pcam_dir({"train": 50, "valid": 21}, index_pixels=True)
    dls = _dls(root, bs=8, seed=0)
    rows, labels, sizes = _epoch(dls.train)
    assert sizes == [8] * 6  # drop_last: 50 // 8 full batches
    assert len(set(rows)) == len(rows) == 48 and set(rows) <= set(range(50))
    assert rows != sorted(rows)  # shuffled
    assert labels == [r % 2 for r in rows]
    rows, labels, sizes = _epoch(dls.valid)
    assert rows == list(range(21))  # every row once, in order
    assert labels == [r % 2 for r in rows]
    assert sizes == [16, 5]


def test_small_train_split_keeps_partial_batch(make_pcam_dir):
    root = make_pcam_dir({"train": 5, "valid": 3}, index_pixels=True)
    rows, _, sizes = _epoch(_dls(root, bs=8).train)
    assert sizes == [5] and sorted(rows) == list(range(5))


def test_seeded_order(make_pcam_dir):
    root = make_pcam_dir({"train": 40, "valid": 4}, index_pixels=True)
    first = _dls(root, bs=4, seed=1).train
    again = _dls(root, bs=4, seed=1).train
    other = _dls(root, bs=4, seed=2).train
    epochs = [_epoch(first)[0], _epoch(first)[0]]
    assert epochs == [_epoch(again)[0], _epoch(again)[0]]
    assert epochs[0] != epochs[1]  # reshuffled every epoch
    assert _epoch(other)[0] != epochs[0]


@pytest.mark.parametrize("batches_per_transfer", [1, 3, 100])
def test_num_workers(make_pcam_dir, batches_per_transfer):
    # 10 train batches dealt in groups of 1, 3 (w0: 0-2, w1: 3-5, w0: 6-8, w1: 9) or all.
    root = make_pcam_dir({"train": 40, "valid": 13}, index_pixels=True)
    single = _dls(root, bs=4, seed=3)
    multi = _dls(root, bs=4, seed=3, num_workers=2)
    for dl in (multi.train, multi.valid):
        dl.transfer_bytes = batches_per_transfer * dl.bs * 96 * 96 * 3
    assert multi.train.batches_per_transfer == batches_per_transfer
    assert multi.train.fake_l.num_workers == 2
    for _ in range(2):  # two epochs: workers see each epoch's order
        rows, labels, sizes = _epoch(multi.train)
        assert sizes == [4] * 10 and sorted(rows) == list(range(40))
        assert labels == [r % 2 for r in rows]
        assert rows == _epoch(single.train)[0]  # shuffling happens in the main process
    assert _epoch(multi.valid)[0] == list(range(13))
    # An epoch abandoned early (lr_find stops mid-epoch) leaves the next one intact.
    next(iter(multi.train))
    next(iter(single.train))
    assert _epoch(multi.train)[0] == _epoch(single.train)[0]


def test_split_dataloader_uses_valid_pipeline(make_pcam_dir):
    root = make_pcam_dir({"train": 16, "valid": 8, "test": 10}, index_pixels=True)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.2, 0.2)
    augment = AugmentConfig(max_brightness=0.3, stain_jitter=0.1)
    dls = _dls(root, mean=mean, std=std, bs=4, augment=augment)
    dl = split_dataloader(dls, PCamSplit(root, "test"))
    passes = [torch.cat([xb for xb, _ in dl]) for _ in range(2)]
    assert torch.equal(passes[0], passes[1])
    torch.testing.assert_close(passes[0], _expected(root, "test", mean, std), atol=1e-5, rtol=0)
    # The same raw batch through the training pipeline is augmented (differs every time).
    raw = dls.train._read([0, 1, 2, 3])
    train_out = [dls.train.after_batch(raw)[0] for _ in range(2)]
    assert not torch.equal(train_out[0], train_out[1])
    valid_out = [dl.after_batch(raw)[0] for _ in range(2)]
    assert torch.equal(valid_out[0], valid_out[1])
    torch.testing.assert_close(valid_out[0], _expected(root, "train", mean, std)[:4])


@pytest.mark.parametrize("bs", [0, -4, 2.5, None])
def test_bad_batch_size(make_pcam_dir, bs):
    root = make_pcam_dir({"train": 4, "valid": 4})
    with pytest.raises(ValueError, match=r"\bbs\b.*" + repr(bs).replace(".", r"\.")):
        _dls(root, bs=bs)


def test_default_workers_on_cpu():
    assert default_num_workers(torch.device("cpu")) == 0


# ---------------------------------------------------------------- batch transforms


def test_to_float_and_normalise_roundtrip():
    x = TensorImage(torch.randint(0, 256, (2, 96, 96, 3), dtype=torch.uint8))
    to_float = ToFloatImage()
    f = to_float(x)
    assert f.dtype == torch.float32 and tuple(f.shape) == (2, 3, 96, 96) and f.is_contiguous()
    torch.testing.assert_close(f[1, 2, 5, 7], x[1, 5, 7, 2].float() / 255)
    assert torch.equal(to_float.decode(f), x)
    cl = ToFloatImage(channels_last=True)(x)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    norm = NormalizeImage((0.5, 0.4, 0.3), (0.1, 0.2, 0.3))
    n = norm(f)
    torch.testing.assert_close(n[0, 1], (f[0, 1] - 0.4) / 0.2)
    torch.testing.assert_close(norm.decode(n), f)


def test_pipeline_augments_before_normalising():
    # Augmentation clamps to [0, 1]; run after normalisation it would squash the result.
    x = TensorImage(torch.randint(0, 256, (8, 96, 96, 3), dtype=torch.uint8))
    cfg = AugmentConfig(max_brightness=0.2, p_lighting=1.0)
    out = batch_pipeline((0.5,) * 3, (0.1,) * 3, train=True, augment=cfg)(x)
    assert out.min() < -2 and out.max() > 2
    valid = batch_pipeline((0.5,) * 3, (0.1,) * 3, train=False, augment=cfg)
    torch.testing.assert_close(valid(x), (x.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.1)


@pytest.mark.parametrize("channels_last", [False, True])
def test_centre_crop_keeps_the_centre_in_every_split(channels_last):
    x = TensorImage(torch.randint(0, 256, (4, 96, 96, 3), dtype=torch.uint8))
    stats = ((0.5,) * 3, (0.1,) * 3)
    whole = batch_pipeline(*stats, train=False, augment=None, channels_last=channels_last)(x)
    cfg = AugmentConfig(max_rotate=0.0, max_zoom=1.0, max_translate=0.0, flip=False,
                        max_brightness=0.0, max_contrast=0.0)
    for train in (True, False):
        crop = batch_pipeline(*stats, train=train, augment=cfg, channels_last=channels_last,
                              centre_crop=64)(x)
        assert crop.shape == (4, 3, 64, 64)
        torch.testing.assert_close(crop, whole[..., 16:80, 16:80])
        assert crop.is_contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("stain_jitter", [0.0, 0.1])
def test_augmented_batch_keeps_its_memory_layout(channels_last, stain_jitter):
    # The model is NHWC on every device; a batch that came back NCHW would be converted
    # inside every convolution.
    x = TensorImage(torch.randint(0, 256, (8, 96, 96, 3), dtype=torch.uint8))
    out = batch_pipeline((0.5,) * 3, (0.1,) * 3, train=True, channels_last=channels_last,
                         augment=AugmentConfig(stain_jitter=stain_jitter))(x)
    assert out.is_contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_centre_crop_follows_augmentation(make_pcam_dir):
    # Cropping after the affine warp: border pixels of the crop are warped tissue, and a
    # train batch is exactly the centre of what the same augmentation gives uncropped.
    cfg = AugmentConfig(max_rotate=30.0, p_affine=1.0, p_lighting=0.0, flip=False)
    x = TensorImage(torch.randint(0, 256, (4, 96, 96, 3), dtype=torch.uint8))
    stats = ((0.5,) * 3, (0.1,) * 3)
    torch.manual_seed(0)
    whole = batch_pipeline(*stats, train=True, augment=cfg)(x)
    torch.manual_seed(0)
    crop = batch_pipeline(*stats, train=True, augment=cfg, centre_crop=48)(x)
    torch.testing.assert_close(crop, whole[..., 24:72, 24:72])
    root = make_pcam_dir({"train": 16, "valid": 8})
    dls = _dls(root, centre_crop=48)
    assert dls.one_batch()[0].shape[-2:] == (48, 48)
    assert dls.valid.one_batch()[0].shape[-2:] == (48, 48)
    with pytest.raises(ValueError, match="centre_crop .* even number .* got 47"):
        _dls(root, centre_crop=47)


# ---------------------------------------------------------------- label preservation

# The largest values AugmentConfig accepts (pinned by test_augment_limits).
MAX_ROTATE, MAX_ZOOM, MAX_TRANSLATE = 30.0, 1.2, 0.025


def _marked(n: int) -> torch.Tensor:
    """Channel 0 is 1.0 on the centre 32x32 and 0.0 elsewhere; other channels random."""
    x = torch.rand(n, 3, 96, 96)
    x[:, 0] = 0.0
    x[:, 0, 32:64, 32:64] = 1.0
    return x


def _geometry_only(**kwargs) -> AugmentConfig:
    settings = dict(flip=True, max_rotate=MAX_ROTATE, max_zoom=MAX_ZOOM,
                    max_translate=MAX_TRANSLATE, max_brightness=0.0, max_contrast=0.0,
                    p_affine=1.0)
    settings.update(kwargs)
    return AugmentConfig(**settings)


@pytest.mark.parametrize("seed", [0, 1])
def test_augment_keeps_label_region(seed):
    torch.manual_seed(seed)
    out = PCamAugment(_geometry_only()).augment(_marked(256))
    assert tuple(out.shape) == (256, 3, 96, 96)
    marked = out[:, 0] > 0.5
    inner, centre = centre_mask_fraction(marked)
    assert inner == 1.0, "a pixel of the inner 16x16 came from outside the centre"
    assert centre >= 0.8, f"only {centre:.1%} of some centre 32x32 came from the centre"
    # The augmentation really moved things: not every image kept the box in place.
    assert (marked[:, 32:64, 32:64].float().mean(dim=(1, 2)) < 1).sum() > 128


def test_unconstrained_affine_breaks_the_check():
    torch.manual_seed(0)
    cfg = _geometry_only(flip=False)
    object.__setattr__(cfg, "max_translate", 0.3)  # what AugmentConfig would refuse
    out = PCamAugment(cfg)._affine(_marked(256))
    inner, centre = centre_mask_fraction(out[:, 0] > 0.5)
    assert centre < 0.8 and inner < 1.0


@pytest.mark.parametrize(
    ("name", "largest", "beyond"),
    [
        ("max_rotate", MAX_ROTATE, 31.0),
        ("max_zoom", MAX_ZOOM, 1.25),
        ("max_zoom", MAX_ZOOM, 0.9),
        ("max_translate", MAX_TRANSLATE, 0.03),
        ("max_translate", MAX_TRANSLATE, -0.01),
        ("max_brightness", 0.5, 0.6),
        ("max_contrast", 0.5, 0.6),
        ("stain_jitter", 0.2, 0.3),
        ("p_affine", 1.0, 1.5),
        ("p_lighting", 1.0, -0.1),
    ],
)
def test_augment_limits(name, largest, beyond):
    AugmentConfig(**{name: largest})
    with pytest.raises(ValueError, match=rf"\b{name}\b.*got {beyond}"):
        AugmentConfig(**{name: beyond})


def test_default_config_valid_and_recorded():
    cfg = AugmentConfig()
    assert cfg.to_dict() == {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_rotate = 5.0


# ---------------------------------------------------------------- dihedral and randomness


def test_dihedral_eight_distinct():
    x = torch.rand(2, 3, 8, 8)
    outs = [dihedral(x, k) for k in range(8)]
    assert torch.equal(outs[0], x)
    for a, b in itertools.combinations(outs, 2):
        assert not torch.equal(a, b)
    for out in outs:  # a pure rearrangement of the pixels of each channel
        assert torch.equal(out.flatten(2).sort().values, x.flatten(2).sort().values)


@pytest.mark.parametrize("k", [-1, 8, 100])
def test_dihedral_bad_index(k):
    with pytest.raises(ValueError, match=rf"0\.\.7, got {k}"):
        dihedral(torch.rand(1, 3, 4, 4), k)


def test_dihedral_symmetric_image_unchanged():
    x = torch.full((1, 3, 6, 6), 0.25)
    x[:, 1] = 0.75
    for k in range(8):
        assert torch.equal(dihedral(x, k), x)


def test_augment_range_and_shape():
    torch.manual_seed(0)
    x = torch.rand(32, 3, 96, 96)
    for cfg in (AugmentConfig(), AugmentConfig(max_brightness=0.5, max_contrast=0.5,
                                               stain_jitter=0.2, p_lighting=1.0)):
        out = PCamAugment(cfg).augment(x.clone())
        assert out.shape == x.shape and out.dtype == x.dtype
        assert out.min() >= 0.0 and out.max() <= 1.0
        assert not torch.equal(out, x)


def test_stain_jitter_changes_colour_only():
    torch.manual_seed(0)
    x = 0.2 + 0.7 * torch.rand(8, 3, 96, 96)
    x[1] = x[0]
    off = dict(flip=False, p_affine=0.0, p_lighting=0.0)
    assert torch.equal(PCamAugment(AugmentConfig(**off)).augment(x.clone()), x)
    out = PCamAugment(AugmentConfig(stain_jitter=0.2, **off)).augment(x.clone())
    assert out.shape == x.shape
    assert out.min() >= 0 and out.max() <= 1
    assert (out - x).abs().mean() > 0.005
    assert not torch.allclose(out[0], out[1])  # a different perturbation per image
    # Colour only: pixels of equal colour stay equal; nothing moves.
    y = x.clone()
    y[:, :, 10, 10] = y[:, :, 50, 60]
    out = PCamAugment(AugmentConfig(stain_jitter=0.2, **off)).augment(y)
    torch.testing.assert_close(out[:, :, 10, 10], out[:, :, 50, 60])


def test_augment_random_per_image():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 96, 96).expand(128, -1, -1, -1).contiguous()
    flips = PCamAugment(AugmentConfig(p_affine=0.0, p_lighting=0.0)).augment(x)
    variants = [dihedral(x[:1], k)[0] for k in range(8)]
    which = [next(k for k, v in enumerate(variants) if torch.equal(img, v)) for img in flips]
    assert set(which) == set(range(8))  # each image draws its own flip/turn
    x = x[:32]
    affine = PCamAugment(AugmentConfig(flip=False, p_affine=1.0, p_lighting=0.0)).augment(x)
    assert len({tuple(img.flatten()[:4096].tolist()) for img in affine}) == 32
    lit = PCamAugment(AugmentConfig(flip=False, p_affine=0.0, p_lighting=1.0)).augment(x)
    means = lit.mean(dim=(1, 2, 3))
    assert means.std() > 1e-3


_SPAWN_CHECK = """
import multiprocessing, sys
multiprocessing.set_start_method("spawn", force=True)
import torch
from pcamlib.data import PCamDataLoader
from pcamlib.pcam import PCamSplit

def epoch(workers):
    dl = PCamDataLoader(PCamSplit(sys.argv[1], "train"), bs=4, shuffle=True, drop_last=True,
                        num_workers=workers)
    dl.transfer_bytes = 2 * 4 * 96 * 96 * 3
    dl.rng.seed(5)
    xs, ys = zip(*dl)
    return torch.cat(xs), torch.cat(ys)

single, multi = epoch(0), epoch(2)
assert all(torch.equal(a, b) for a, b in zip(single, multi, strict=True)), "order differs"
print("spawn ok", len(single[0]))
"""


def test_workers_with_spawn(make_pcam_dir):
    # CUDA users often switch to spawn: the ring and its lock must reach the workers by
    # pickling rather than fork.
    root = make_pcam_dir({"train": 37}, index_pixels=True)
    done = subprocess.run([sys.executable, "-c", _SPAWN_CHECK, str(root)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "spawn ok 36" in done.stdout
