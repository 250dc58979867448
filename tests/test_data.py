"""Data: the embedded demo dataset, ImageNet-style folders, the sharded sampler and the batched augmentation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dynavit.data import ShardedSampler, build_dataset, collate_skip, make_loader
from dynavit.data import demo
from dynavit.data.transforms import AugmentConfig, TrainAugment, mix_batch, pil_resize_center_crop, soft_targets

COLOURS = {"a": (230, 20, 20), "b": (20, 230, 20), "c": (20, 20, 230)}


def make_image_folder(root, n_train: int = 4, n_val: int = 2, size=(40, 48), corrupt: bool = False,
                      mislabel: bool = False):
    """DIR/{train,val}/{a,b,c}/*.png of noisy solid red / green / blue images (class = dominant channel)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, col in COLOURS.items():
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = np.clip(np.array(col)[None, None] + rng.normal(0, 10, (*size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")
    if mislabel:  # a green image filed under 'a': a channel-argmax model gets it wrong
        arr = np.zeros((*size, 3), np.uint8)
        arr[..., 1] = 220
        Image.fromarray(arr).save(root / "val" / "a" / "zz_green.png")
    if corrupt:
        (root / "val" / "b" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    return root


# ---------------------------------------------------------------------------------------------- demo dataset
def test_demo_is_deterministic_per_seed():
    a, b = demo.DemoDataset("val", seed=0, n=6), demo.DemoDataset("val", seed=0, n=6)
    assert a.fingerprint(6) == b.fingerprint(6)
    assert demo.DemoDataset("val", seed=1, n=6).fingerprint(6) != a.fingerprint(6)
    assert demo.DemoDataset("train", seed=0, n=6).fingerprint(6) != a.fingerprint(6)
    img, label = a[3]
    assert img.shape == (3, 224, 224) and img.dtype == torch.uint8 and 0 <= label < 10


def test_demo_splits_are_disjoint_by_source_digit():
    split = demo.source_split(0)
    assert len(np.intersect1d(split["train"], split["val"])) == 0
    assert len(split["train"]) + len(split["val"]) == 1797
    _, labels = demo._digits()
    assert set(labels[split["val"]]) == set(range(10))  # stratified: every class in val
    train_src = {demo.render(0, "train", i)[2] for i in range(40)}
    val_src = {demo.render(0, "val", i)[2] for i in range(40)}
    assert not train_src & val_src and train_src <= set(split["train"]) and val_src <= set(split["val"])


def test_demo_label_is_in_a_minority_of_patches():
    """The digit covers at most (96 / 16 + 1)^2 = 49 of 196 patches (25%): the premise of token reduction."""
    side = demo.SCALE_RANGE[1]
    assert (side // 16 + 1) ** 2 / 196 <= 1 / 3
    labels = [demo.render(0, "train", i)[1] for i in range(60)]
    assert len(set(labels)) == 10  # all classes appear early (sources are interleaved)


def test_demo_v3_labels_and_sources_are_pinned():
    """The split and the draw order are pure numpy: the same on every machine (v3 of the task)."""
    assert demo.VERSION == 3
    got = [demo.render(0, "val", i, 112)[1:] for i in range(6)]
    assert [g[0] for g in got] == [2, 0, 7, 5, 0, 4]
    first = demo.render(0, "val", 0, 112)
    assert np.array_equal(first[0], demo.render(0, "val", 0, 112)[0])  # pixels: a pure function of the index
    assert first[0].shape == (112, 112, 3)


def test_demo_cache_roundtrip(tmp_path):
    ds = demo.DemoDataset("val", seed=0, n=3, size=64, cache=True, cache_dir=str(tmp_path))
    plain = demo.DemoDataset("val", seed=0, n=3, size=64)
    assert list(tmp_path.glob("*.npy"))
    for i in range(3):
        assert torch.equal(ds[i][0], plain[i][0]) and ds[i][1] == plain[i][1]


# ---------------------------------------------------------------------------------------------- folders
def test_folder_classes_sizes_and_skipped_images(tmp_path, caplog):
    make_image_folder(tmp_path, corrupt=True)
    val = build_dataset(str(tmp_path), "val", img_size=32)
    assert val.classes == ["a", "b", "c"] and len(val) == 7
    loader = make_loader(val, batch_size=4, train=False, workers=0)
    seen, skipped = 0, 0
    with caplog.at_level("WARNING"):
        for images, labels, n_skipped in loader:
            assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.uint8
            seen += len(labels)
            skipped += n_skipped
    assert (seen, skipped) == (6, 1)
    assert "broken.jpg" in caplog.text
    train = build_dataset(str(tmp_path), "train", img_size=32, train=True)
    assert train[0][0].shape == (3, 36, 36)  # int(32 / 0.875): random crops happen on the batch


def test_missing_folder_is_a_clear_error(tmp_path):
    from dynavit.errors import CheckpointNotFoundError, DataError

    with pytest.raises(CheckpointNotFoundError, match="not found"):
        build_dataset(str(tmp_path / "nope"), "val")
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        build_dataset(str(tmp_path), "val")


def test_collate_all_skipped():
    images, labels, skipped = collate_skip([None, None])
    assert images.numel() == 0 and labels.numel() == 0 and skipped == 2


def test_eval_transform_resizes_shorter_side_then_centre_crops():
    from PIL import Image

    img = Image.fromarray(np.zeros((100, 300, 3), np.uint8))
    assert pil_resize_center_crop(img, 256, 224).shape == (3, 224, 224)


# ---------------------------------------------------------------------------------------------- sampler
def test_sharded_sampler_matches_single_process_doubled_batch():
    single = ShardedSampler(40, 0, 1, shuffle=True, seed=3, batch_size=8, drop_last=True)
    ranks = [ShardedSampler(40, r, 2, shuffle=True, seed=3, batch_size=4, drop_last=True) for r in range(2)]
    s, r0, r1 = list(single), list(ranks[0]), list(ranks[1])
    assert single.steps_per_epoch() == ranks[0].steps_per_epoch() == 5
    for t in range(5):
        assert sorted(s[8 * t:8 * t + 8]) == sorted(r0[4 * t:4 * t + 4] + r1[4 * t:4 * t + 4])
    single.set_epoch(0, start_batch=2)
    assert list(single) == s[16:]
    single.set_epoch(1)
    assert list(single) != s  # a new order every epoch


def test_eval_sampler_covers_every_image_once():
    parts = [list(ShardedSampler(11, r, 3, shuffle=False)) for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(11))


# ---------------------------------------------------------------------------------------------- augmentation
def test_train_augment_shapes_targets_and_determinism():
    images = torch.randint(0, 256, (6, 3, 40, 40), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    aug = TrainAugment(32, 3, AugmentConfig())
    torch.manual_seed(0)
    x1, t1 = aug(images, labels)
    torch.manual_seed(0)
    x2, t2 = aug(images, labels)
    assert x1.shape == (6, 3, 32, 32) and t1.shape == (6, 3)
    assert torch.equal(x1, x2) and torch.equal(t1, t2)
    assert torch.allclose(t1.sum(1), torch.ones(6))
    x3, t3 = TrainAugment(32, 3, AugmentConfig.none())(images, labels)
    assert t3 is labels and x3.shape == (6, 3, 32, 32)


def test_mixup_targets_follow_the_mixed_images():
    x = torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)])
    cfg = AugmentConfig(mixup=0.8, cutmix=0.0, smoothing=0.0)
    torch.manual_seed(1)
    mixed, t = mix_batch(x, torch.tensor([0, 1]), 2, cfg)
    lam = t[0, 0].item()
    assert torch.allclose(mixed[0], torch.full((3, 8, 8), 1 - lam), atol=1e-6)
    cfg = AugmentConfig(mixup=0.0, cutmix=1.0, smoothing=0.0)
    mixed, t = mix_batch(x, torch.tensor([0, 1]), 2, cfg)
    assert abs(mixed[0].mean().item() - t[0, 1].item()) < 1e-6  # pasted area = weight of the other label


def test_soft_targets_smoothing():
    t = soft_targets(torch.tensor([2]), 4, 0.1)
    assert torch.allclose(t, torch.tensor([[0.025, 0.025, 0.925, 0.025]]))


# ---------------------------------------------------------------------------------------------- DeiT's crop
def test_random_resized_crop_box_follows_deit_ranges():
    from dynavit.data.transforms import random_resized_crop_box

    gen = torch.Generator().manual_seed(0)
    areas, aspects = [], []
    for _ in range(2000):
        left, top, w, h = random_resized_crop_box(640, 480, generator=gen)
        assert 0 <= left and left + w <= 640 and 0 <= top and top + h <= 480
        areas.append(w * h / (640 * 480))
        aspects.append(w / h)
    assert 0.075 <= min(areas) < 0.12 and max(areas) > 0.9  # area fraction ~ U(0.08, 1) where it fits
    assert min(aspects) >= 0.74 and max(aspects) <= 1.35 and min(aspects) < 0.8 and max(aspects) > 1.28
    # nothing fits in 10 draws on a 1000:1 strip: the centred fallback, cut to the widest allowed aspect
    assert random_resized_crop_box(1000, 1, scale=(0.9, 1.0), generator=gen) == (499, 0, 1, 1)


def test_train_crops_see_the_whole_original_image(tmp_path):
    """A wide image (red | green | blue thirds): a centre square would only ever show green; DeiT's crop on the
    full image reaches the red and blue borders. Crops are a pure function of (seed, epoch, index)."""
    from PIL import Image

    from dynavit.data.folder import ImageFolder

    yy, xx = np.mgrid[0:60, 0:300]
    arr = np.repeat(((xx + 3 * yy) % 20).astype(np.uint8)[..., None], 3, axis=2)  # a faint texture
    arr[:, :100, 0], arr[:, 100:200, 1], arr[:, 200:, 2] = 255, 255, 255
    (tmp_path / "x").mkdir()
    Image.fromarray(arr).save(tmp_path / "x" / "wide.png")
    ds = ImageFolder(tmp_path, img_size=32, train=True, random_crop=((0.08, 1.0), (3 / 4, 4 / 3)))
    assert ds.crops_on_worker and ds.wants_epoch
    crops = [ds[(0, epoch)][0] for epoch in range(40)]
    assert all(c.shape == (3, 32, 32) and c.dtype == torch.uint8 for c in crops)
    means = torch.stack([c.float().mean(dim=(1, 2)) for c in crops])  # (40, 3) per-channel means
    assert (means[:, 0] > 200).any() and (means[:, 2] > 200).any()  # some crops lie in the red / blue thirds
    assert torch.equal(ds[(0, 7)][0], crops[7]) and not torch.equal(crops[0], crops[1])
    old = ImageFolder(tmp_path, img_size=32, train=True)[0][0]  # the former centre square: green only
    assert old.float().mean(dim=(1, 2)).tolist()[1] > 200 and old.float()[[0, 2]].max() < 25


def test_loader_passes_the_epoch_and_trainer_skips_the_batch_crop(tmp_path):
    make_image_folder(tmp_path)
    ds = build_dataset(str(tmp_path), "train", img_size=32, train=True, random_crop=((0.08, 1.0), (0.75, 4 / 3)))
    loader = make_loader(ds, batch_size=4, train=True, workers=0)
    loader.sampler.set_epoch(0)
    a = torch.cat([b[0] for b in loader])
    loader.sampler.set_epoch(1)
    b = torch.cat([b[0] for b in loader])
    loader.sampler.set_epoch(0)
    a2 = torch.cat([b[0] for b in loader])
    assert a.shape[1:] == (3, 32, 32) and torch.equal(a, a2) and not torch.equal(a, b)
    aug = TrainAugment(32, 3, AugmentConfig(randaugment=False, erasing=0.0, mixup=0.0, cutmix=0.0), crop=False)
    assert not any("Crop" in type(op).__name__ for op in aug.pixel_ops)
    assert any("Crop" in type(op).__name__ for op in TrainAugment(32, 3, AugmentConfig()).pixel_ops)


def test_aug_none_needs_no_kornia(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "kornia", None)
    monkeypatch.setitem(sys.modules, "kornia.augmentation", None)
    assert not AugmentConfig.none().needs_kornia and AugmentConfig().needs_kornia
    images = torch.randint(0, 256, (4, 3, 36, 36), dtype=torch.uint8)
    x, t = TrainAugment(32, 3, AugmentConfig.none())(images, torch.tensor([0, 1, 2, 0]))
    assert x.shape == (4, 3, 32, 32)
    with pytest.raises(ImportError):
        TrainAugment(32, 3, AugmentConfig())


def test_cli_missing_extras_fail_before_any_work(monkeypatch, tmp_path, capsys):
    import sys

    from dynavit.cli import main

    monkeypatch.setitem(sys.modules, "kornia", None)
    rc = main(["train", "--model", "tiny_vit", "--data", str(tmp_path / "nowhere"), "--output", str(tmp_path / "r"),
               "--aug", "deit"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and 'pip install "dynavit[train]"' in err and "kornia" in err
    assert not (tmp_path / "r").exists()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    rc = main(["viz", "--model", "tiny_vit", "--image", str(tmp_path / "x.png")])
    assert rc == 2 and 'pip install "dynavit[plot]"' in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "sklearn", None)
    rc = main(["demo", "--output", str(tmp_path / "d")])
    assert rc == 2 and "scikit-learn" in capsys.readouterr().err and not (tmp_path / "d").exists()


def test_cli_train_aug_none_runs_without_kornia(monkeypatch, tmp_path):
    import sys

    from dynavit.cli import main

    monkeypatch.setitem(sys.modules, "kornia", None)
    monkeypatch.setitem(sys.modules, "kornia.augmentation", None)
    make_image_folder(tmp_path / "data")
    rc = main(["train", "--model", "tiny_vit", "--img-size", "32", "--set", "depth=2", "--data",
               str(tmp_path / "data"), "--output", str(tmp_path / "run"), "--aug", "none", "--max-steps", "1",
               "--batch-size", "4", "--workers", "0", "--no-eval", "--amp", "none"])
    assert rc == 0 and (tmp_path / "run" / "model.safetensors").exists()


def test_digit_box_is_where_render_draws_the_digit():
    """demo.digit_box: the pixels render changes over the background lie in the box (the digit fills 34-46% of
    it); outside it only the thin distractor strokes do (under 2%)."""
    for split in ("train", "val"):
        for index in range(8):
            top, left, side = demo.digit_box(0, split, index)
            _, background, _ = demo._placement(0, split, index, demo.IMAGE_SIZE)
            image = demo.render(0, split, index)[0].astype(np.float32)
            changed = np.abs(image - background).sum(-1) > 30  # (H, W)
            inside = np.zeros_like(changed)
            inside[top:top + side, left:left + side] = True
            assert 0 <= top and top + side <= demo.IMAGE_SIZE and 0 <= left and left + side <= demo.IMAGE_SIZE
            assert changed[inside].mean() > 0.25 and changed[~inside].mean() < 0.05, (split, index)
