"""The registry of transfer strategies: what each one trains and what it feeds the head."""

from __future__ import annotations

from dataclasses import dataclass

from tlcore import TlcoreError

__all__ = ["Strategy", "STRATEGIES", "get_strategy", "resolve_variants"]


@dataclass(frozen=True)
class Strategy:
    """How one strategy re-uses VGG16.

    Attributes:
        name: the strategy's name on the command line.
        head_input: what the head reads: ``"features"`` (the 4096 penultimate activations) or
            ``"logits"`` (the frozen 1000-way ImageNet output).
        trained: whether the strategy trains anything (``subset`` does not).
        trains_backbone: whether every VGG16 layer is trained, not only the head.
        gray: whether training images are converted to grayscale.
        multi_size: whether training runs in turn at each of several image sizes.
        needs_imagenet_classes: whether the classes must map to ImageNet labels.
        description: one line for ``--help`` and reports.
    """

    name: str
    head_input: str
    trained: bool = True
    trains_backbone: bool = False
    gray: bool = False
    multi_size: bool = False
    needs_imagenet_classes: bool = False
    description: str = ""

    @property
    def cacheable(self) -> bool:
        """Whether the frozen part is fixed, so its output can come from the feature cache."""
        return not self.trains_backbone


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("general", "features",
                 description="replace the last layer with a new 4096->K layer"),
        Strategy("linear", "logits",
                 description="add a 1000->K layer on top of the 1000-way output"),
        Strategy("gray", "features", gray=True, description="general, trained on grayscale images"),
        Strategy("scale", "features", multi_size=True,
                 description="general, trained in turn at several image sizes"),
        Strategy("full", "features", trains_backbone=True,
                 description="general, with every layer trained"),
        Strategy("subset", "logits", trained=False, needs_imagenet_classes=True,
                 description="untrained baseline: the K ImageNet logits of the K classes"),
    )
}


def get_strategy(name: str) -> Strategy:
    """Return the registered strategy called ``name``."""
    try:
        return STRATEGIES[name]
    except KeyError:
        choices = ", ".join(STRATEGIES)
        raise TlcoreError(f"unknown strategy {name!r}; choose one of: {choices}") from None


def resolve_variants(variant: str) -> list[Strategy]:
    """Expand a ``--variant`` value (a strategy name or ``all``) into strategies."""
    if variant == "all":
        return list(STRATEGIES.values())
    return [get_strategy(variant)]
