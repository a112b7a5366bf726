"""tlcore: benchmark transfer-learning strategies for a pretrained VGG16.

The library is laid out one job per module:

- ``config``: run settings, one dataclass per concern;
- ``datasets``: reading and checking image folders, and the built-in offline dataset;
- ``imagenet``: ImageNet labels, and seeded splits drawn from ImageNet-layout folders;
- ``inputs``: DALI input pipelines and the torchvision reference loader;
- ``models``: VGG16, its weights, and the frozen/trained split of each strategy;
- ``strategies``: the registry of transfer strategies;
- ``cache``: the HDF5 feature cache;
- ``engine``: training and evaluation loops;
- ``metrics``: accuracy, likelihood, macro F1, confusion matrices;
- ``results``: run folders and the append-only results tables;
- ``runs``: one strategy from config to results row;
- ``experiments``: trained runs re-tested at other sizes, in gray, at lower contrast;
- ``plots``: the report's tables and figures.

``tlcore.train``, ``tlcore.cache`` and ``tlcore.report`` are the command lines (``cli`` holds
what they share).
"""

__version__ = "0.1.0"


class TlcoreError(ValueError):
    """A user mistake or bad input, stated in one line that says what to do."""
