"""tlcore: benchmark transfer-learning strategies for a pretrained VGG16.

The library is laid out one job per module:

- ``datasets``: reading and checking image folders, and the built-in offline dataset;
- ``inputs``: DALI input pipelines and the torchvision reference loader;
- ``models``: VGG16, its weights, and the frozen/trained split of each strategy;
- ``strategies``: the registry of transfer strategies;
- ``cache``: the HDF5 feature cache;
- ``engine``: training and evaluation loops;
- ``metrics``: accuracy, likelihood, macro F1, confusion matrices;
- ``results``: run folders and the append-only results table;
- ``runs``: one strategy from config to results row.

``tlcore.train`` and ``tlcore.cache`` are the command lines.
"""

__version__ = "0.1.0"


class TlcoreError(ValueError):
    """A user mistake or bad input, stated in one line that says what to do."""
