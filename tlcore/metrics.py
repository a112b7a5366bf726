"""Classification metrics computed from predicted probabilities and true labels."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score

__all__ = ["classification_metrics"]


def classification_metrics(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """Accuracy, mean likelihood, macro F1 and the confusion matrix.

    Args:
        probs: (N, K) class probabilities.
        labels: (N,) true class indices.
        num_classes: K; classes never predicted still get a row and column.

    Returns:
        ``accuracy``, ``mean_likelihood`` (mean probability given to the true class),
        ``macro_f1`` and ``confusion`` (K x K list, rows are true classes).
    """
    labels = np.asarray(labels, dtype=np.int64)
    preds = probs.argmax(axis=1)
    classes = list(range(num_classes))
    return {
        "accuracy": float((preds == labels).mean()),
        "mean_likelihood": float(probs[np.arange(len(labels)), labels].mean()),
        "macro_f1": float(f1_score(labels, preds, labels=classes, average="macro",
                                   zero_division=0)),
        "confusion": confusion_matrix(labels, preds, labels=classes).tolist(),
    }
