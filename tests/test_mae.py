"""MAE's pieces against values computed by hand."""

import torch

from tinymim.mae import MAE, patchify, random_masking
from tinymim.models import ModelSpec, build_model
from tinymim.presets import get_config


def test_patchify_row_major_patches_with_channels_last():
    img = torch.arange(2 * 3 * 4 * 4, dtype=torch.float).reshape(2, 3, 4, 4)
    p = patchify(img, 2)
    assert p.shape == (2, 4, 12)
    # patch 1 is the top-right 2x2 block; within a patch, pixels row-major, channels last
    expected = torch.stack([img[0, c, i, 2 + j] for i in range(2) for j in range(2) for c in range(3)])
    assert torch.equal(p[0, 1], expected)


def test_random_masking_keeps_the_right_tokens():
    torch.manual_seed(0)
    x = torch.arange(2 * 8, dtype=torch.float).reshape(2, 8, 1).expand(2, 8, 3)
    kept, mask, ids_restore = random_masking(x, 0.75)
    assert kept.shape == (2, 2, 3) and mask.sum(1).tolist() == [6, 6]
    for b in range(2):
        visible = torch.nonzero(mask[b] == 0).flatten()
        assert sorted(kept[b, :, 0].tolist()) == sorted(x[b, visible, 0].tolist())
        # ids_restore undoes the shuffle: the kept tokens sit where the mask is 0
        assert torch.equal(torch.sort(ids_restore[b][visible]).values, torch.tensor([0, 1]))


def test_loss_is_mean_squared_error_over_masked_patches_only():
    cfg = get_config("mae", "micro_tiny", "smoke", {"norm_pix_loss": "false", "decoder_dim": "32",
                                                    "decoder_depth": "1", "decoder_heads": "2"})
    mae = MAE(build_model(ModelSpec.create("micro_tiny"), fixed_pos_embed=True), cfg)
    images = torch.randn(2, 3, 32, 32)
    target = patchify(images, 8)
    mask = torch.zeros(2, 16)
    mask[:, :4] = 1
    pred = target.clone()
    pred[:, :4] += 2.0  # masked patches off by 2 -> squared error 4
    pred[:, 4:] += 5.0  # visible patches do not count
    assert mae.loss(images, pred, mask).item() == 4.0
