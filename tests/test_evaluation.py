import pytest
import torch
from torch import nn

from tinymim.evaluation import argmax, confusion_matrix, linear_probe, predict, topk_accuracy


class _Sum(nn.Module):
    """Logits [sum, -sum] of each (normalised) image: a model whose output is known."""

    def forward(self, x):
        s = x.flatten(1).sum(1, keepdim=True)
        return torch.cat([s, -s], 1)


def test_predict_tensors_and_loaders_batch_by_batch():
    x = torch.randn(7, 3, 4, 4)
    logits, labels = predict(_Sum(), x, batch_size=3)
    assert labels is None and torch.allclose(logits[:, 0], x.flatten(1).sum(1), atol=1e-5)
    y = (x.flatten(1).sum(1) < 0).long()
    loader = [(x[:4], y[:4]), (x[4:], y[4:])]
    pred, labels = predict(_Sum(), loader, reduce=argmax)
    assert torch.equal(labels, y) and torch.equal(pred, y)  # class 1 iff the sum is negative


def test_topk_and_confusion_by_hand():
    logits = torch.tensor([[3.0, 2.0, 1.0], [0.0, 1.0, 2.0], [1.0, 3.0, 2.0]])
    labels = torch.tensor([1, 2, 0])
    assert topk_accuracy(logits, labels, ks=(1, 2)) == pytest.approx({"top1": 100 / 3, "top2": 200 / 3, "n": 3})
    conf = confusion_matrix(logits.argmax(1), labels, 3)
    assert conf.tolist() == [[0, 1, 0], [1, 0, 0], [0, 0, 1]]
    assert confusion_matrix(torch.tensor([0, 1]), torch.tensor([255, 1]), 2).tolist() == [[0, 0], [0, 1]]


def test_linear_probe_separates_what_is_separable_and_not_noise():
    g = torch.Generator().manual_seed(0)
    y_train, y_val = torch.randint(0, 4, (200,), generator=g), torch.randint(0, 4, (100,), generator=g)
    centres = torch.randn(4, 16, generator=g) * 3
    x_train = centres[y_train] + torch.randn(200, 16, generator=g)
    x_val = centres[y_val] + torch.randn(100, 16, generator=g)
    assert linear_probe(x_train, y_train, x_val, y_val)["top1"] == 100.0
    noise = linear_probe(torch.randn(200, 16, generator=g), y_train, torch.randn(100, 16, generator=g), y_val)
    assert noise["top1"] < 45  # chance is 25 %
