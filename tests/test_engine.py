"""Training loops and the frozen pass: the closed-form linear head matches autograd step for
step; batches run through the frozen network at once come out as if run one at a time."""

from __future__ import annotations

import copy
import itertools
import threading

import numpy as np
import pytest
import torch
from torch import nn

from tlcore.engine import (
    CPU_BATCHES_IN_FLIGHT,
    LinearHeadSGD,
    TensorSource,
    batches_in_flight,
    evaluate,
    fit,
    frozen_outputs,
    train_one_epoch,
)
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
    val = _data(n=57, seed=1)
    validate = trainer.evaluator(val)

    for epoch in range(3):
        order = torch.randperm(len(source), generator=torch.Generator().manual_seed(epoch))
        fast_stats = trainer.epoch(16, order)
        slow_stats = train_one_epoch(slow, slow_opt, source, 16, order, device=CPU)
        assert fast_stats == pytest.approx(slow_stats, rel=1e-5)
        for a, b in zip(fast.parameters(), slow.parameters(), strict=True):
            assert torch.allclose(a, b, atol=1e-5)
        # Validation through the trainer's blocks: what the layer itself gives.
        fast_val, slow_val = validate(), evaluate(slow, val, 16, device=CPU)
        assert fast_val.loss == pytest.approx(slow_val.loss, rel=1e-5)
        np.testing.assert_allclose(fast_val.probs, slow_val.probs, atol=1e-5)
        assert fast_val.labels.tolist() == slow_val.labels.tolist()
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


def _image_batches(sizes=(4, 4, 3, 4, 1), seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = itertools.count()
    return [(torch.randn(n, 3, 8, 8, generator=g), torch.tensor([next(labels) for _ in range(n)]))
            for n in sizes]


def _small_network(seed=0):
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 16),
                          nn.Dropout(0.5))
    return trunk, nn.Linear(16, 10)


class _HoldFirstBatch(nn.Module):
    """Holds the first batch until the loader has been asked for the batch after next."""

    def __init__(self, loader_reached: threading.Event):
        super().__init__()
        self.loader_reached = loader_reached
        self.calls = itertools.count()

    def forward(self, images):
        if next(self.calls) == 0 and not self.loader_reached.wait(timeout=10):
            raise TimeoutError("the loader was not read ahead while the first batch ran")
        return images


def test_batches_in_flight_run_at_once_and_come_out_in_order():
    batches = _image_batches()
    trunk, last = _small_network()
    expected = list(frozen_outputs(trunk, last, batches))

    loader_reached = threading.Event()

    def loader():
        for i, batch in enumerate(batches):
            if i == 2:
                loader_reached.set()
            yield batch

    held = nn.Sequential(_HoldFirstBatch(loader_reached), trunk)
    outputs = list(frozen_outputs(held, last, loader(), in_flight=2))

    # The second batch finished first, yet every batch comes out in the loader's order, with
    # the outputs it has when run alone (dropout off: the frozen network is in eval mode).
    assert [labels.tolist() for _, _, labels in outputs] == [y.tolist() for _, y in batches]
    for (features, logits, _), (want_features, want_logits, _) in zip(outputs, expected,
                                                                        strict=True):
        torch.testing.assert_close(features, want_features)
        torch.testing.assert_close(logits, want_logits)
    assert not trunk.training and not last.training


def test_frozen_outputs_pass_on_a_failing_loader_and_a_failing_batch():
    trunk, last = _small_network()
    batches = _image_batches()

    def failing_loader():
        yield from batches[:3]
        raise RuntimeError("Failed to decode sample #0")

    with pytest.raises(RuntimeError, match="decode"):
        list(frozen_outputs(trunk, last, failing_loader(), in_flight=2))

    bad = batches[:2] + [(torch.randn(2, 5, 8, 8), torch.tensor([0, 1]))]  # 5 channels
    with pytest.raises(RuntimeError, match="channels"):
        list(frozen_outputs(trunk, last, bad, in_flight=2))


def test_cpu_runs_batches_in_flight_when_it_has_threads_for_them():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert batches_in_flight(CPU) == 1
        torch.set_num_threads(2)
        assert batches_in_flight(CPU) == CPU_BATCHES_IN_FLIGHT
    finally:
        torch.set_num_threads(threads)
    assert batches_in_flight(torch.device("cuda")) == 1
