"""Weights, the frozen/trained split, and proof that head strategies freeze what they claim."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tlcore import TlcoreError
from tlcore.config import CacheConfig, DataConfig, RunConfig, TrainConfig
from tlcore.models import (
    TransferModel,
    build_head,
    build_vgg16,
    export_head,
    resolve_weights,
    split_vgg16,
)
from tlcore.runs import prepare, run_strategy
from tlcore.strategies import STRATEGIES, get_strategy

HEAD_STRATEGIES = [s.name for s in STRATEGIES.values() if s.trained and not s.trains_backbone]


def tiny_config(root, tmp_path, **train) -> RunConfig:
    return RunConfig(
        weights="random", out=str(tmp_path / "runs"),
        data=DataConfig(root=str(root), image_size=32, sizes=(48, 32)),
        train=TrainConfig(**{"epochs": 2, "full_epochs": 1, **train}),
        cache=CacheConfig(enabled=False, directory=str(tmp_path / "cache")),
    )


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", HEAD_STRATEGIES)
def test_head_strategies_leave_every_vgg16_parameter_bit_identical(tiny_root, tmp_path, name):
    session = prepare(tiny_config(tiny_root, tmp_path, lr=0.05))
    before = _snapshot(session.vgg())

    row = run_strategy(session, get_strategy(name))

    after = session.vgg().state_dict()
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []
    assert row["source"] == "stream" and row["epochs"] == (4 if name == "scale" else 2)
    head = torch.load(f"{row['run_dir']}/weights.pt")
    assert set(head) == {"head.weight", "head.bias"}


def test_full_trains_the_backbone(tiny_root, tmp_path):
    session = prepare(tiny_config(tiny_root, tmp_path, lr=0.05))
    before = _snapshot(session.vgg())
    row = run_strategy(session, get_strategy("full"))

    # The session's network is untouched: full trains its own copy.
    assert all(torch.equal(before[k], v) for k, v in session.vgg().state_dict().items())
    saved = torch.load(f"{row['run_dir']}/weights.pt")
    conv = "trunk.0.0.weight"  # the first convolution
    assert not torch.equal(saved[conv], before["features.0.weight"])


def test_optimizer_sees_only_the_head_for_head_strategies():
    vgg = build_vgg16(resolve_weights("random"))
    for strategy in STRATEGIES.values():
        if not strategy.trained:
            continue
        head = build_head(strategy, 3)
        model = TransferModel(vgg, strategy, head)
        groups = model.param_groups(lr=0.1, backbone_lr=0.01)
        ids = {id(p) for g in groups for p in g["params"]}
        assert {id(p) for p in head.parameters()} <= ids
        trunk_ids = {id(p) for p in model.trunk.parameters()}
        assert bool(ids & trunk_ids) == strategy.trains_backbone
        assert not ids & {id(p) for p in model.last.parameters()}
        assert all(not p.requires_grad for p in model.last.parameters())


def test_frozen_layers_stay_in_eval_mode_during_training():
    vgg = build_vgg16(resolve_weights("random"))
    model = TransferModel(vgg, get_strategy("general"), build_head(get_strategy("general"), 3))
    model.train()
    assert model.head.training
    assert not any(m.training for m in model.trunk.modules())
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.frozen(images), model.frozen(images))  # no dropout


def _first_layer_calls(trunk) -> list[int]:
    """Counts the calls of the first classifier layer (skipped when the trunk folds it)."""
    calls = []
    trunk[3].register_forward_hook(lambda module, args, output: calls.append(len(args[0])))
    return calls


@pytest.mark.parametrize("size", [32, 64, 100, 224, 256])
def test_split_vgg16_reproduces_the_network(size):
    vgg = build_vgg16(resolve_weights("random")).eval()
    trunk, last = split_vgg16(vgg)
    calls = _first_layer_calls(trunk)
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = vgg(images)
        calls.clear()
        features = trunk(images)
    torch.testing.assert_close(last(features), expected, rtol=1e-4, atol=1e-6)
    assert features.shape == (2, 4096)
    # Below 224 px the feature map is smaller than the pooled 7x7 grid: the pooling and the
    # first classifier layer run as one folded layer. From 224 px on they run as they are.
    assert calls == ([] if size < 224 else [2])


def test_trunk_state_dict_keys_are_those_of_the_plain_layers():
    vgg = build_vgg16(resolve_weights("random"))
    trunk, _ = split_vgg16(vgg)
    plain = nn.Sequential(vgg.features, vgg.avgpool, nn.Flatten(1), *vgg.classifier[:-1])
    assert list(trunk.state_dict()) == list(plain.state_dict())


def test_trunk_fold_follows_changes_to_the_weights():
    vgg = build_vgg16(resolve_weights("random")).eval()
    trunk, _ = split_vgg16(vgg)
    images = torch.randn(2, 3, 32, 32)
    first = vgg.classifier[0]
    with torch.no_grad():
        before = trunk(images)
        first.weight.mul_(-2.0)  # in place, as an optimizer step
        changed = trunk(images)
        torch.testing.assert_close(changed, vgg.classifier[:-1](torch.flatten(
            vgg.avgpool(vgg.features(images)), 1)), rtol=1e-4, atol=1e-6)
        first.weight = nn.Parameter(torch.zeros_like(first.weight))  # replaced
        replaced = trunk(images)
    assert not torch.allclose(before, changed)
    torch.testing.assert_close(replaced, vgg.classifier[:-1](torch.zeros(2, 25088)))


def test_trunk_trains_through_the_unfolded_layers():
    vgg = build_vgg16(resolve_weights("random"))
    trunk, _ = split_vgg16(vgg)
    calls = _first_layer_calls(trunk)
    trunk(torch.randn(2, 3, 32, 32)).sum().backward()
    assert calls == [2]
    assert vgg.classifier[0].weight.grad is not None
    assert vgg.classifier[0].weight.grad.abs().sum() > 0


def test_standardised_head_folds_into_one_linear_layer():
    torch.manual_seed(0)
    mean, std = torch.randn(4096), torch.rand(4096) + 0.1
    head = build_head(get_strategy("general"), 5, input_stats=(mean, std))
    plain = nn.Linear(4096, 5)
    plain.load_state_dict(export_head(head))
    x = torch.randn(7, 4096)
    with torch.no_grad():
        assert torch.allclose(plain(x), head(x), atol=1e-4)


def test_subset_head_selects_imagenet_logits_in_class_order():
    head = build_head(get_strategy("subset"), 3, imagenet_indices=[945, 2, 513])
    logits = torch.arange(2000.0).view(2, 1000)
    assert head(logits).tolist() == [[945.0, 2.0, 513.0], [1945.0, 1002.0, 1513.0]]
    with pytest.raises(TlcoreError, match="wnid"):
        build_head(get_strategy("subset"), 3)


def test_weights_resolve_to_recorded_identities(tmp_path):
    assert resolve_weights("random", seed=3).identity == "random:seed3"
    assert resolve_weights("imagenet").identity == "imagenet:IMAGENET1K_V1"

    vgg = build_vgg16(resolve_weights("random", seed=1))
    path = tmp_path / "vgg.pt"
    torch.save(vgg.state_dict(), path)
    spec = resolve_weights(str(path))
    assert spec.identity.startswith("file:vgg.pt:")
    loaded = build_vgg16(spec)
    assert torch.equal(loaded.features[0].weight, vgg.features[0].weight)


def test_random_weights_are_seeded():
    a = build_vgg16(resolve_weights("random", seed=0))
    b = build_vgg16(resolve_weights("random", seed=0))
    c = build_vgg16(resolve_weights("random", seed=1))
    assert torch.equal(a.classifier[0].weight, b.classifier[0].weight)
    assert not torch.equal(a.classifier[0].weight, c.classifier[0].weight)


def test_bad_weights_are_rejected(tmp_path):
    with pytest.raises(TlcoreError, match="not imagenet, random, auto or an existing file"):
        resolve_weights("imagenet21k")
    bad = tmp_path / "other.pt"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(TlcoreError, match="not a VGG16 state dict"):
        build_vgg16(resolve_weights(str(bad)))


def test_auto_weights_use_imagenet_when_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "vgg16-397923af.pth").write_bytes(b"")
    assert resolve_weights("auto").kind == "imagenet"

