"""The augmentation recipes: the PIL reference mode bit-identical to the release's transforms,
host and device modes the same recipe (same draws; distributions checked statistically),
per-sample seeding (a function of seed, epoch and index only), and the device-side ops
against torchvision's own."""

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ks_2samp, kstest
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from tinymim.config import derive_seed
from tinymim.data import Augmented, Classify, ImageNetFolder, MemoryImages, Segment, Views
from tinymim.data.augment import Ragged, collate, color_jitter, jitter_params
from tinymim.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from tinymim.presets import get_config

CPU = torch.device("cpu")


def _photos(n=6, h=75, w=100, seed=0):
    """Textured RGB images of an odd size, as uint8 N x 3 x H x W."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, h // 5, w // 5, generator=g)
    x = torch.nn.functional.interpolate(base, size=(h, w), mode="bicubic", align_corners=False)
    return ((x + 0.1 * torch.rand(n, 3, h, w, generator=g)).clamp(0, 1) * 255).to(torch.uint8)


def _folder(tmp_path, images):
    for i, img in enumerate(images):
        (tmp_path / f"c{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp_path / f"c{i % 2}" / f"{i}.jpg", quality=95)
    return ImageNetFolder(tmp_path)


def _release_two_views(size, jitter):
    """TinyMIM's main_pretrain.py, verbatim: TwoCropsTransform(common, teacher, student)."""
    common = T.Compose([T.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=3), T.RandomHorizontalFlip()])
    teacher = T.Compose([T.ToTensor(), T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])
    student = T.Compose([T.ColorJitter(jitter, jitter, jitter), T.ToTensor(),
                         T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])

    def transform(img):
        x = common(img)
        return [teacher(x), student(x)]
    return transform


def _seed(seed: int, epoch: int, index: int) -> int:
    return derive_seed(seed, "sample", epoch, index)


def test_reference_mode_is_the_release_transform_bit_for_bit():
    source = MemoryImages(_photos())
    ds = Augmented(source, Views(48, (0.2, 1.0), 0.4, "reference"), seed=3)
    release = _release_two_views(48, 0.4)
    for i in range(len(source)):
        torch.manual_seed(_seed(3, 1, i))
        teacher, student = release(source.pil(i))
        out = ds[(1, i)]
        assert torch.equal(out["teacher"], teacher) and torch.equal(out["student"], student)


def test_fine_tuning_reference_mode_is_timms_create_transform_bit_for_bit():
    from timm.data import create_transform

    source = MemoryImages(_photos(), labels=torch.arange(6))
    recipe = Classify(48, (0.08, 1.0), "rand-m9-mstd0.5-inc1", reprob=0.25, mode="reference")
    ds = Augmented(source, recipe, seed=0)
    mae = create_transform(48, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic",
                           re_prob=0.25, re_mode="pixel", re_count=1, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    for i in range(len(source)):
        s = _seed(0, 0, i)
        torch.manual_seed(s), random.seed(s), np.random.seed(s % 2**32)
        assert torch.equal(ds[(0, i)]["image"], mae(source.pil(i)))


def test_host_and_device_modes_draw_what_the_release_draws_and_compute_nearly_the_same_views():
    source = MemoryImages(_photos())
    ref = Augmented(source, Views(48, (0.2, 1.0), 0.4, "reference"), seed=0)
    for mode in ("host", "device"):
        ds = Augmented(source, Views(48, (0.2, 1.0), 0.4, mode), seed=0)
        batch = collate([ds[(0, i)] for i in range(len(source))])
        student, teacher = Views(48, (0.2, 1.0), 0.4, mode).device(batch, CPU)
        want = collate([ref[(0, i)] for i in range(len(source))])
        # the same crop, flip and jitter draws: the views differ only by resampling arithmetic
        # (torch's antialiased bicubic vs PIL's, float jitter vs PIL's uint8 steps)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        assert ((teacher - want["teacher"]) * std).abs().mean() < 3 / 255, mode
        assert ((student - want["student"]) * std).abs().mean() < 4 / 255, mode


def test_the_crop_and_jitter_distributions_are_torchvisions():
    """Drawn per sample under its own seed, the boxes and factors follow torchvision's recipe."""
    h, w, n = 375, 500, 1500
    source = MemoryImages(torch.zeros(n, 3, h, w, dtype=torch.uint8)[:, :, :, :])
    ds = Augmented(source, Views(224, (0.2, 1.0), 0.4, "device"), seed=0)
    ours = torch.stack([ds[(0, i)]["box"] for i in range(n)]).double()
    jitter = torch.stack([ds[(0, i)]["jitter"] for i in range(n)]).double()
    torch.manual_seed(123)
    theirs = torch.tensor([T.RandomResizedCrop.get_params(torch.zeros(3, h, w), [0.2, 1.0], [3 / 4, 4 / 3])
                           for _ in range(n)]).double()
    for name, a, b in (("area", ours[:, 2] * ours[:, 3], theirs[:, 2] * theirs[:, 3]),
                       ("log ratio", (ours[:, 3] / ours[:, 2]).log(), (theirs[:, 3] / theirs[:, 2]).log()),
                       ("top", ours[:, 0], theirs[:, 0])):
        assert ks_2samp(a.numpy(), b.numpy()).pvalue > 1e-3, name
    assert 0.45 < ours[:, 4].mean() < 0.55  # flip
    for k in range(3):  # brightness, contrast, saturation factors ~ U(0.6, 1.4)
        assert kstest(jitter[:, 4 + k].numpy(), "uniform", args=(0.6, 0.8)).pvalue > 1e-3
    orders = {tuple(o) for o in jitter[:, :4].long().tolist()}
    assert len(orders) == 24  # every order of the four operations occurs


def test_batched_color_jitter_equals_torchvisions_tensor_operations():
    x = _photos(5, 16, 20).float() / 255
    params = torch.stack([jitter_params(0.4) for _ in range(5)])
    ops = {0: TF.adjust_brightness, 1: TF.adjust_contrast, 2: TF.adjust_saturation}
    out = color_jitter(x, params)
    for i in range(5):
        want = x[i]
        for op in params[i, :4].long().tolist():
            if op < 3:
                want = ops[op](want, float(params[i, 4 + op]))
        assert torch.allclose(out[i], want, atol=1e-6)


def test_a_sample_is_a_function_of_seed_epoch_and_index_only():
    source = MemoryImages(_photos())
    recipe = Views(32, (0.2, 1.0), 0.4, "host")
    a, b = Augmented(source, recipe, seed=5), Augmented(source, recipe, seed=5)
    torch.manual_seed(0)
    first = a[(2, 3)]
    torch.rand(10)  # the caller's RNG in another state: no effect
    again = b[(2, 3)]
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(a[(3, 3)]["image"], first["image"])  # another epoch, another draw
    state = torch.get_rng_state()
    a[(0, 0)]
    assert torch.equal(torch.get_rng_state(), state)  # in the main process the training RNG is untouched


def test_device_decoding_of_jpegs_equals_decoding_in_the_workers(tmp_path):
    folder = _folder(tmp_path, _photos(4))
    plain, on_device = Views(32, (0.2, 1.0), None, "device"), Views(32, (0.2, 1.0), None, "device", device_decode=True)
    a = collate([Augmented(folder, plain, 0)[(0, i)] for i in range(4)])
    b = collate([Augmented(folder, on_device, 0)[(0, i)] for i in range(4)])
    assert isinstance(b["image"], Ragged) and b["image"].flat.numel() < a["image"].numel()  # bytes, not pixels
    assert torch.equal(a["box"], b["box"])
    assert torch.allclose(plain.device(a, CPU)[0], on_device.device(b, CPU)[0], atol=1e-5)


def test_ragged_batches_round_trip():
    tensors = [torch.arange(6, dtype=torch.uint8).view(1, 2, 3), torch.arange(4, dtype=torch.uint8).view(1, 1, 4)]
    packed = collate([{"x": t} for t in tensors])["x"]
    assert isinstance(packed, Ragged) and len(packed) == 2
    assert all(torch.equal(a, b) for a, b in zip(packed.unpack(CPU), tensors))


def test_fine_tuning_device_half_erases_and_mixes():
    torch.manual_seed(0)
    recipe = Classify(32, (0.35, 1.0), "rand-m9-mstd0.5-inc1", reprob=1.0, mixup=0.8, cutmix=1.0,
                      label_smoothing=0.1, num_classes=10)
    source = MemoryImages(_photos(8, 40, 40), labels=torch.arange(8) % 10)
    batch = collate([Augmented(source, recipe, 0)[(0, i)] for i in range(8)])
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (8, 3, 32, 32)
    x, y = recipe.device(batch, CPU)
    assert x.dtype == torch.float32 and y.shape == (8, 10) and torch.allclose(y.sum(1), torch.ones(8))


def test_rand_augment_posterize_at_the_top_magnitude_does_not_crash():
    """timm's increasing posterize keeps 0 bits at magnitude 10 (reached by mstd 0.5 draws);
    Pillow 13 refuses that (requirements pin Pillow < 13)."""
    from timm.data.auto_augment import AugmentOp

    op = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)
    out = op(Image.fromarray(_photos(1)[0].permute(1, 2, 0).numpy()))
    assert np.asarray(out).max() == 0  # 0 bits kept: black, as timm and older Pillow mean it


def test_segmentation_crops_pad_with_ignore_and_zero_after_normalising():
    images = _photos(2, 20, 24)
    masks = torch.randint(0, 5, (2, 20, 24))
    recipe = Segment(32, (128, 32), ratio=(0.5, 0.5))  # resized to half: always smaller than the crop
    batch = collate([Augmented(MemoryImages(images, masks=masks), recipe, 0)[(0, i)] for i in range(2)])
    x, m = recipe.device(batch, CPU)
    h, w = batch["valid"][0].tolist()
    assert (h, w) == (16, 19) and x.shape == (2, 3, 32, 32)  # 0.5 x the (128, 32) scale: 0.8 x the image
    assert (m[0, h:] == 255).all() and (m[0, :, w:] == 255).all() and (m[0, :h, :w] != 255).all()
    assert (x[0, :, h:] == 0).all() and (x[0, :, :, w:] == 0).all()


def test_stage_configs_choose_the_mode_and_refuse_what_cannot_run():
    from tinymim.config import ConfigError

    assert get_config("pretrain", overrides={"augment": "device"}).augment == "device"
    with pytest.raises(ConfigError, match="RandAugment"):
        get_config("finetune", "vit_small", "paper", {"augment": "device"})
    with pytest.raises(ConfigError, match="segmentation"):
        get_config("segmentation", overrides={"augment": "device"})
    with pytest.raises(ConfigError, match="augment"):
        get_config("mae", overrides={"augment": "gpu"})
    assert math.isclose(Views(8, (0.2, 1.0)).ratio[0], 0.75)
