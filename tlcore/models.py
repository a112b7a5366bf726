"""VGG16, its weights, and the split of the network into a frozen part and a trained head.

``TransferModel`` wraps a torchvision VGG16 as three parts:

- ``trunk``: every layer up to the penultimate activations (4096 values per image);
- ``last``: the original 4096->1000 ImageNet layer;
- ``head``: what the strategy puts on top (a new linear layer, or a choice of ImageNet logits).

A head-only strategy freezes ``trunk`` and ``last``: they have ``requires_grad=False``, stay in
eval mode, and the optimizer never sees them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import VGG16_Weights, vgg16

from tlcore import TlcoreError
from tlcore.strategies import Strategy

__all__ = [
    "FEATURE_DIM",
    "IMAGENET_CLASSES",
    "WeightsSpec",
    "resolve_weights",
    "build_vgg16",
    "split_vgg16",
    "Trunk",
    "TransferModel",
    "build_head",
    "export_head",
    "trained_state",
    "Standardize",
]

log = logging.getLogger(__name__)

FEATURE_DIM = 4096
IMAGENET_CLASSES = 1000
_IMAGENET = VGG16_Weights.IMAGENET1K_V1


@dataclass(frozen=True)
class WeightsSpec:
    """Which VGG16 weights a run uses.

    Attributes:
        kind: ``imagenet``, ``random`` or ``file``.
        identity: a stable name for the weights, recorded in results and cache keys.
        path: the state-dict file, for ``file``.
        seed: the initialisation seed, for ``random``.
    """

    kind: str
    identity: str
    path: str | None = None
    seed: int = 0


def _imagenet_cached() -> bool:
    filename = os.path.basename(_IMAGENET.url)
    return (Path(torch.hub.get_dir()) / "checkpoints" / filename).is_file()


def _try_download_imagenet() -> bool:
    try:
        torch.hub.load_state_dict_from_url(_IMAGENET.url, progress=True, check_hash=True)
    except Exception as exc:  # any network or disk failure means "not available"
        log.info("ImageNet weights could not be downloaded: %s", exc)
        return False
    return True


def resolve_weights(spec: str, seed: int = 0) -> WeightsSpec:
    """Turn a ``--weights`` value into a :class:`WeightsSpec`.

    Args:
        spec: ``imagenet``, ``random``, ``auto`` (imagenet when it is cached or can be
            downloaded, else random with a warning) or a path to a VGG16 state dict.
        seed: the seed of random weights.
    """
    if spec == "auto":
        if _imagenet_cached() or _try_download_imagenet():
            spec = "imagenet"
        else:
            warnings.warn("ImageNet weights for VGG16 are neither cached nor downloadable; "
                          "using random weights (pass --weights imagenet to insist)",
                          stacklevel=2)
            spec = "random"
    if spec == "imagenet":
        return WeightsSpec("imagenet", f"imagenet:{_IMAGENET.name}")
    if spec == "random":
        return WeightsSpec("random", f"random:seed{seed}", seed=seed)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise TlcoreError(f"weights {spec!r} are not imagenet, random, auto or an existing file; "
                          "pass one of those or the path to a VGG16 state dict")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return WeightsSpec("file", f"file:{path.name}:{digest}", path=str(path.resolve()))


def build_vgg16(weights: WeightsSpec) -> nn.Module:
    """Build torchvision's VGG16 with the given weights."""
    if weights.kind == "imagenet":
        try:
            return vgg16(weights=_IMAGENET, progress=True)
        except Exception as exc:
            raise TlcoreError(f"ImageNet weights for VGG16 could not be loaded ({exc}); connect "
                              "to the internet once, or pass --weights random") from None
    if weights.kind == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(weights.seed)
            return vgg16(weights=None)
    model = vgg16(weights=None)
    state = torch.load(weights.path, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as exc:
        first = str(exc).splitlines()[0]
        raise TlcoreError(f"{weights.path} is not a VGG16 state dict ({first}); pass a file "
                          "saved from torchvision's vgg16().state_dict()") from None
    return model


def split_vgg16(vgg: nn.Module) -> tuple[Trunk, nn.Linear]:
    """Split VGG16 into the layers up to its penultimate activations, and its last layer.

    The two share their parameters with ``vgg``.
    """
    trunk = Trunk(vgg.features, vgg.avgpool, nn.Flatten(1), *list(vgg.classifier.children())[:-1])
    return trunk, vgg.classifier[-1]


class Trunk(nn.Sequential):
    """VGG16 up to its penultimate activations: convolutions, pooling, then the classifier.

    Images smaller than VGG16's 224 px leave a feature map smaller than the 7x7 grid that the
    adaptive pooling fills, so the pooling only repeats and averages values. Pooling and the
    first classifier layer are then one linear map with fewer inputs: 512 instead of 25,088 at
    32 px (a 1x1 map), 2,048 at 64 px. Whenever no gradient reaches that layer's weights, the
    map is folded once per feature-map size and reused, which makes small images much cheaper
    through the frozen network (the 103M-weight layer dominates there). The result equals the
    layers run one after another up to float rounding. A fold is rebuilt when the weights
    change in place (an optimizer step) or are replaced.

    Children, and so state-dict keys, are those of the plain sequence: features, pooling,
    flatten, then the classifier's layers up to the last.
    """

    def __init__(self, *layers: nn.Module):
        super().__init__(*layers)
        # (map height, width, device, dtype) -> ((weight version, storage), folded weight)
        self._folds: dict[tuple, tuple[tuple[int, int], torch.Tensor]] = {}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features, pool, flatten, first, *rest = self
        x = features(images)  # (N, 512, h, w)
        folded = self._folded_weight(pool, first, x)
        if folded is None:
            x = first(flatten(pool(x)))
        else:
            x = F.linear(x.flatten(1), folded, first.bias)  # (N, 512 h w) -> (N, 4096)
        for layer in rest:
            x = layer(x)
        return x

    def _folded_weight(self, pool: nn.Module, layer: nn.Linear,
                       x: torch.Tensor) -> torch.Tensor | None:
        weight = layer.weight
        if torch.is_grad_enabled() and weight.requires_grad:
            return None
        channels, h, w = x.shape[1:]
        cells = weight.shape[1] // channels  # positions in the pooled grid (49)
        if h * w >= cells:
            return None
        key = (h, w, x.device, x.dtype)
        stamp = (weight._version, weight.data_ptr())
        cached = self._folds.get(key)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        # Pooling is linear: its matrix is its output for each one-hot input position.
        # Computed outside any inference mode, so that the fold can serve every caller.
        with torch.inference_mode(False), torch.no_grad():
            basis = torch.eye(h * w, device=weight.device, dtype=weight.dtype)
            pooling = pool(basis.view(h * w, 1, h, w)).reshape(h * w, cells)  # (hw, cells)
            folded = weight.view(-1, channels, cells) @ pooling.T  # (4096, 512, hw)
            folded = folded.reshape(weight.shape[0], channels * h * w).to(x.dtype).contiguous()
        self._folds[key] = (stamp, folded)
        return folded


class SelectLogits(nn.Module):
    """The untrained ``subset`` head: keeps the ImageNet logits of the K classes, in order."""

    def __init__(self, imagenet_indices: list[int]):
        super().__init__()
        self.register_buffer("index", torch.tensor(imagenet_indices, dtype=torch.long))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.index_select(1, self.index)  # (N, 1000) -> (N, K)


class Standardize(nn.Module):
    """A fixed map of each input to zero mean and unit variance, from training-split statistics.

    It conditions SGD when the frozen outputs are on an arbitrary scale (random weights); being
    affine, it folds into the linear layer after it (see :func:`export_head`).
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.detach().clone().float())
        std = std.detach().clone().float()
        # Near-constant columns (dead units) are not blown up: their scale is floored at a
        # tenth of the median column's.
        floor = 0.1 * std.median().clamp_min(1e-12)
        self.register_buffer("std", std.clamp_min(floor))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def build_head(strategy: Strategy, num_classes: int, imagenet_indices: list[int] | None = None,
               input_stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> nn.Module:
    """Build the part a strategy puts on top of the frozen network.

    Args:
        strategy: decides the head's input width, or that it selects ImageNet logits.
        num_classes: K, the head's output width.
        imagenet_indices: the ImageNet index of each class, for ``subset``.
        input_stats: ``(mean, std)`` of the head's input on the training split; when given, a
            :class:`Standardize` layer goes before the new linear layer.
    """
    if not strategy.trained:
        if imagenet_indices is None:
            raise TlcoreError(f"strategy {strategy.name!r} needs class folders named by ImageNet "
                              "wnid (e.g. n07720875)")
        return SelectLogits(imagenet_indices)
    in_features = IMAGENET_CLASSES if strategy.head_input == "logits" else FEATURE_DIM
    layer = nn.Linear(in_features, num_classes)
    return layer if input_stats is None else nn.Sequential(Standardize(*input_stats), layer)


def export_head(head: nn.Module) -> dict[str, torch.Tensor]:
    """The head as one plain linear layer's state dict, with any standardisation folded in.

    The result loads into ``nn.Linear`` (e.g. in place of VGG16's last layer for ``general``).
    """
    if isinstance(head, nn.Linear):
        return {"weight": head.weight.detach().clone(), "bias": head.bias.detach().clone()}
    standardize, layer = head
    weight = layer.weight / standardize.std  # (K, D) / (D,)
    bias = layer.bias - weight @ standardize.mean
    return {"weight": weight.detach().clone(), "bias": bias.detach().clone()}


class TransferModel(nn.Module):
    """VGG16 split into ``trunk`` (to the penultimate layer), ``last`` (ImageNet layer), ``head``.

    Args:
        vgg: a torchvision VGG16.
        strategy: decides what the head reads and whether the backbone is trained.
        head: the module on top, from :func:`build_head`.
        backbone_dropout: keep the classifier's dropout active while the backbone trains.
    """

    def __init__(self, vgg: nn.Module, strategy: Strategy, head: nn.Module,
                 backbone_dropout: bool = True):
        super().__init__()
        self.strategy = strategy
        self.backbone_dropout = backbone_dropout
        self.trunk, self.last = split_vgg16(vgg)
        self.head = head
        self.last.requires_grad_(False)
        self.trunk.requires_grad_(strategy.trains_backbone)

    def frozen(self, images: torch.Tensor) -> torch.Tensor:
        """The head's input: penultimate features (N, 4096) or ImageNet logits (N, 1000)."""
        features = self.trunk(images)  # (N, 3, H, W) -> (N, 4096)
        return self.last(features) if self.strategy.head_input == "logits" else features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.frozen(images))  # (N, K)

    def param_groups(self, lr: float, backbone_lr: float) -> list[dict]:
        """The optimizer's parameter groups: the head, plus the trunk for ``full``."""
        groups = [{"params": list(self.head.parameters()), "lr": lr}]
        if self.strategy.trains_backbone:
            groups.insert(0, {"params": list(self.trunk.parameters()), "lr": backbone_lr})
        return groups

    def train(self, mode: bool = True):
        # Frozen layers stay in eval mode so dropout never touches the features.
        super().train(mode)
        if not self.strategy.trains_backbone:
            self.trunk.eval()
        elif not self.backbone_dropout:
            for module in self.trunk.modules():
                if isinstance(module, nn.Dropout):
                    module.eval()
        self.last.eval()
        return self

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The weights this strategy trains, for saving beside the run's results."""
        return trained_state(self.head, self.trunk if self.strategy.trains_backbone else None)


def trained_state(head: nn.Module, trunk: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """``head.*`` (one plain linear layer, see :func:`export_head`), plus ``trunk.*`` if given."""
    state = {f"head.{k}": v for k, v in export_head(head).items()}
    if trunk is not None:
        state.update({f"trunk.{k}": v for k, v in trunk.state_dict().items()})
    return state
