"""Training loops: the closed-form linear head matches autograd step for step."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tlcore.engine import LinearHeadSGD, TensorSource, evaluate, fit, train_one_epoch
from tlcore.models import Standardize

CPU = torch.device("cpu")


def _data(n=203, d=64, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * 3 + 1
    y = torch.randint(0, k, (n,), generator=g)
    return TensorSource(x, y, CPU)


@pytest.fixture(params=[1, 3], ids=lambda n: f"{n}-threads")
def threads(request):
    """CPU threads for the test: the closed form cuts its columns into one block per thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("standardize", [False, True])
def test_closed_form_linear_head_matches_autograd(standardize, threads):
    source = _data()
    torch.manual_seed(0)
    layer = nn.Linear(64, 5)
    head = (nn.Sequential(Standardize(source.inputs.mean(0), source.inputs.std(0)), layer)
            if standardize else layer)
    fast, slow = copy.deepcopy(head), copy.deepcopy(head)
    fast_opt = torch.optim.SGD(fast.parameters(), lr=0.05, momentum=0.9)
    slow_opt = torch.optim.SGD(slow.parameters(), lr=0.05, momentum=0.9)
    trainer = LinearHeadSGD.create(fast, fast_opt, source)
    assert trainer is not None
    assert trainer.blocks == threads

    for epoch in range(3):
        order = torch.randperm(len(source), generator=torch.Generator().manual_seed(epoch))
        fast_stats = trainer.epoch(16, order)
        slow_stats = train_one_epoch(slow, slow_opt, source, 16, order, device=CPU)
        assert fast_stats == pytest.approx(slow_stats, rel=1e-5)
        for a, b in zip(fast.parameters(), slow.parameters(), strict=True):
            assert torch.allclose(a, b, atol=1e-5)
    # The optimizer's momentum is kept, so a later stage continues where this one stopped.
    for a, b in zip(fast.parameters(), slow.parameters(), strict=True):
        assert torch.allclose(fast_opt.state[a]["momentum_buffer"],
                              slow_opt.state[b]["momentum_buffer"], atol=1e-5)


def test_closed_form_applies_only_to_linear_heads_and_plain_sgd():
    source = _data()
    mlp = nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 5))
    assert LinearHeadSGD.create(mlp, torch.optim.SGD(mlp.parameters(), lr=0.1), source) is None
    layer = nn.Linear(64, 5)
    adam = torch.optim.Adam(layer.parameters())
    assert LinearHeadSGD.create(layer, adam, source) is None
    decay = torch.optim.SGD(layer.parameters(), lr=0.1, weight_decay=1e-4)
    assert LinearHeadSGD.create(layer, decay, source) is None


def test_fit_logs_every_epoch_and_learns():
    source = _data(n=400, d=16, k=2)
    source.labels = (source.inputs[:, 0] > 1).long()  # a separable rule
    torch.manual_seed(0)
    head = nn.Linear(16, 2)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.05, momentum=0.9)
    history = fit(head, optimizer, source, source, epochs=5, batch_size=32, seed=0, device=CPU)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4, 5]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert evaluate(head, source, 32, device=CPU).accuracy > 0.9
