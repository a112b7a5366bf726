"""Training and evaluation loops, over cached features or streamed images alike.

A *source* yields ``(inputs, labels)`` batches in a given order. The same loop trains a head on
tensors from the feature cache, a head on features streamed through the frozen network, or the
whole network on streamed images; only the source differs.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from tlcore.datasets import Split
from tlcore.inputs import Preprocess, create_loader

__all__ = [
    "TensorSource",
    "LinearHeadSGD",
    "StreamSource",
    "Evaluation",
    "CPU_BATCHES_IN_FLIGHT",
    "batches_in_flight",
    "frozen_outputs",
    "input_statistics",
    "pooled_statistics",
    "train_one_epoch",
    "evaluate",
    "fit",
]

log = logging.getLogger(__name__)

CPU_BATCHES_IN_FLIGHT = 2


class TensorSource:
    """Batches sliced from tensors already in memory (features read from the cache).

    ``frozen_pass_seconds``, when known, is what one pass of the same images through the
    frozen network took: the cost of the epoch this source saves.
    """

    eval_batch_size = 4096  # evaluation results do not depend on it; bigger is faster

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, device: torch.device,
                 frozen_pass_seconds: float | None = None):
        self.inputs = inputs.to(device)
        self.labels = labels.long().to(device)
        self.frozen_pass_seconds = frozen_pass_seconds

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, order: Sequence[int] | torch.Tensor | None = None):
        if order is None:
            for start in range(0, len(self), batch_size):
                yield self.inputs[start:start + batch_size], self.labels[start:start + batch_size]
            return
        order = torch.as_tensor(order, device=self.inputs.device)
        for start in range(0, len(self), batch_size):
            index = order[start:start + batch_size]
            yield self.inputs.index_select(0, index), self.labels.index_select(0, index)


class StreamSource:
    """Batches decoded from image files; ``transform`` (e.g. the frozen network) runs on them.

    Args:
        split: the images.
        preprocess: input pipeline settings.
        device: where the batches land.
        backend: ``dali`` or ``torchvision``.
        transform: applied to each image batch under ``torch.no_grad``, or ``None``.
    """

    eval_batch_size = None  # the training batch size: images are the memory that counts

    def __init__(self, split: Split, preprocess: Preprocess, device: torch.device,
                 backend: str = "dali", transform: Callable | None = None):
        self.split, self.preprocess, self.device = split, preprocess, device
        self.backend, self.transform = backend, transform

    def __len__(self) -> int:
        return len(self.split)

    def batches(self, batch_size: int, order=None):
        order = None if order is None else [int(i) for i in order]
        loader = create_loader(self.split, self.preprocess, batch_size, device=self.device,
                               backend=self.backend, order=order)
        for images, labels in loader:
            if self.transform is not None:
                with torch.no_grad():
                    images = self.transform(images)
            yield images, labels.to(self.device)


def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class Evaluation:
    """Predictions over one pass of a source."""

    probs: np.ndarray  # (N, K)
    labels: np.ndarray  # (N,)
    loss: float
    seconds: float
    images_per_s: float  # after the first (warm-up) batch, when there is more than one

    @property
    def accuracy(self) -> float:
        return float((self.probs.argmax(1) == self.labels).mean())


@torch.inference_mode()
def evaluate(module: nn.Module, source, batch_size: int, *, device: torch.device,
             autocast: bool = False, progress: bool = False, desc: str = "eval") -> Evaluation:
    """Run ``module`` once over every batch of ``source`` in eval mode.

    ``batch_size`` applies unless the source sets a larger ``eval_batch_size`` of its own.
    """
    batch_size = source.eval_batch_size or batch_size
    module.eval()
    probs, labels, loss_sum = [], [], 0.0
    start = time.perf_counter()
    warm_start, warm_images = start, 0
    batches = tqdm(source.batches(batch_size), total=-(-len(source) // batch_size),
                   desc=desc, disable=not progress, leave=False, unit="batch")
    for inputs, targets in batches:
        with _autocast(device, autocast):
            logits = module(inputs)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()  # syncs the GPU
        probs.append(logits.softmax(1).cpu())
        labels.append(targets.cpu())
        if len(labels) == 1:
            warm_start = time.perf_counter()
        else:
            warm_images += len(targets)
    end = time.perf_counter()
    labels_np = torch.cat(labels).numpy()
    if warm_images:
        images_per_s = warm_images / max(end - warm_start, 1e-9)
    else:
        images_per_s = len(labels_np) / max(end - start, 1e-9)
    return Evaluation(torch.cat(probs).numpy(), labels_np, loss_sum / len(labels_np),
                      end - start, images_per_s)


def batches_in_flight(device: torch.device) -> int:
    """How many batches :func:`frozen_outputs` should run through the network at once.

    On the CPU the input pipeline and the network share the cores. With two batches in flight,
    the loader prepares the next batch while the network works, and a core that one batch
    leaves idle between ops goes to the other. A GPU takes one batch at a time; the input
    pipeline runs ahead of it on its own.
    """
    if device.type == "cpu" and torch.get_num_threads() > 1:
        return CPU_BATCHES_IN_FLIGHT
    return 1


@torch.inference_mode()
def _frozen_pass(trunk: nn.Module, last: nn.Module,
                 images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    features = trunk(images)  # (N, 3, H, W) -> (N, 4096)
    return features, last(features)  # logits: (N, 1000)


def frozen_outputs(trunk: nn.Module, last: nn.Module, loader, *,
                   in_flight: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(features, logits, labels)`` per batch, in the loader's order.

    This is what the feature cache stores. The network is in eval mode and sees each batch on
    its own, so the outputs do not depend on ``in_flight``.

    Args:
        trunk: the frozen network up to the features.
        last: its last layer (features to ImageNet logits).
        loader: yields ``(images, labels)`` batches.
        in_flight: batches that run through the network at once, each in a worker thread,
            while the loader reads the next (see :func:`batches_in_flight`).
    """
    trunk.eval()
    last.eval()
    if in_flight == 1:
        for images, labels in loader:
            yield *_frozen_pass(trunk, last, images), labels
        return

    pending: deque = deque()  # (future, labels) of the batches in flight, in loader order
    with ThreadPoolExecutor(in_flight, thread_name_prefix="tlcore-frozen") as pool:
        for images, labels in loader:
            if len(pending) == in_flight:
                future, done_labels = pending.popleft()
                yield *future.result(), done_labels
            pending.append((pool.submit(_frozen_pass, trunk, last, images), labels))
        while pending:
            future, done_labels = pending.popleft()
            yield *future.result(), done_labels


@torch.inference_mode()
def input_statistics(source, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column mean and standard deviation of a source's inputs, in one pass."""
    count, total, total_sq = 0, 0.0, 0.0
    for inputs, _ in source.batches(batch_size):
        inputs = inputs.double()
        count += len(inputs)
        total = total + inputs.sum(0)
        total_sq = total_sq + (inputs * inputs).sum(0)
    mean = total / count
    var = (total_sq / count - mean * mean).clamp_min(0.0) * count / max(count - 1, 1)
    return mean.float(), var.sqrt().float()


def pooled_statistics(sources, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column mean and standard deviation of several equally large sources taken together.

    Each source (one per training image size) weighs the same; the standard deviation is that of
    the pooled values, not a mean of the sources' deviations.

    Args:
        sources: sources of the same images, e.g. the training split at each size.
        batch_size: rows read at a time.
    """
    per_source = [input_statistics(source, batch_size) for source in sources]
    mean = torch.stack([m for m, _ in per_source]).mean(0)
    second_moment = torch.stack([s * s + m * m for m, s in per_source]).mean(0)
    return mean, (second_moment - mean * mean).clamp_min(0).sqrt()


def _linear_layer(module: nn.Module) -> tuple[nn.Module | None, nn.Linear] | None:
    """``(standardize, layer)`` when ``module`` is a linear head, else ``None``."""
    if isinstance(module, nn.Linear):
        return None, module
    if (isinstance(module, nn.Sequential) and len(module) == 2
            and isinstance(module[1], nn.Linear) and not list(module[0].parameters())):
        return module[0], module[1]
    return None


def _plain_sgd(optimizer: torch.optim.Optimizer) -> bool:
    return type(optimizer) is torch.optim.SGD and len(optimizer.param_groups) == 1 and all(
        g["weight_decay"] == 0 and not g["nesterov"] and g["dampening"] == 0
        and not g["maximize"] for g in optimizer.param_groups)


class LinearHeadSGD:
    """Epochs of a linear softmax head on in-memory inputs, with closed-form gradients.

    The same arithmetic as autograd, cross-entropy and ``torch.optim.SGD`` with momentum,
    without their per-step overhead: the inputs are standardised once and given a column of ones
    (so weight and bias are one matrix), and each step is two small matrix products. Weights and
    momentum buffers are written back to the layer and the optimizer after every epoch.

    A step's products are too small for the BLAS to spread over several CPU cores, so on the
    CPU the columns are cut into one block per thread and each product is a batched one over
    the blocks (the forward pass then sums the blocks' partial logits). Validation goes the
    same way (:meth:`evaluator`): a product with only K columns is as awkward for the BLAS
    when it has thousands of rows.
    """

    @classmethod
    def create(cls, module: nn.Module, optimizer: torch.optim.Optimizer,
               source) -> LinearHeadSGD | None:
        """A trainer for ``module``, or ``None`` when the closed form does not apply."""
        parts = _linear_layer(module)
        if parts is None or not isinstance(source, TensorSource) or not _plain_sgd(optimizer):
            return None
        return cls(*parts, optimizer, source)

    @torch.no_grad()
    def __init__(self, standardize: nn.Module | None, layer: nn.Linear,
                 optimizer: torch.optim.SGD, source: TensorSource):
        self.layer, self.optimizer, self.standardize = layer, optimizer, standardize
        d, k = layer.in_features, layer.out_features
        self.blocks = torch.get_num_threads() if source.inputs.device.type == "cpu" else 1
        # Columns: the D inputs, a column of ones for the bias, then zeros up to a multiple of
        # 16 per block so that rows stay aligned for the matrix products (zero inputs get zero
        # gradients, so those weights stay zero).
        self.width = width = -(-(d + 1) // (16 * self.blocks)) * 16 * self.blocks
        self.inputs = self._prepare(source.inputs)  # (N, W)
        self.labels = source.labels
        weight = layer.weight.new_zeros(k, width)  # (K, W)
        weight[:, :d] = layer.weight
        weight[:, d] = layer.bias
        buffer = torch.zeros_like(weight)
        weight_buf, bias_buf = (optimizer.state[p].get("momentum_buffer")
                                for p in (layer.weight, layer.bias))
        if weight_buf is not None:
            buffer[:, :d] = weight_buf
            buffer[:, d] = bias_buf
        self.weight, self.buffer = self._to_blocks(weight), self._to_blocks(buffer)  # (P, K, W/P)
        self.d = d
        self._steps = {}  # batch size -> a step's buffers and the views the products read

    def _prepare(self, inputs: torch.Tensor) -> torch.Tensor:
        """(N, D) inputs -> (N, W): standardised, a column of ones, zeros up to W."""
        inputs = inputs if self.standardize is None else self.standardize(inputs)
        n, d = inputs.shape
        prepared = inputs.new_zeros(n, self.width)
        prepared[:, :d] = inputs
        prepared[:, d] = 1.0
        return prepared

    @torch.no_grad()
    def evaluator(self, source: TensorSource) -> Callable[[], Evaluation]:
        """A function that evaluates the layer's current weights on ``source``.

        It returns what :func:`evaluate` returns for the head. The inputs are prepared once,
        as the training inputs are, so each call is one batched product over the blocks.
        """
        inputs = self._prepare(source.inputs)  # (N, W)
        n, width = inputs.shape
        blocks = inputs.view(n, self.blocks, width // self.blocks).permute(1, 2, 0)  # (P, W/P, N)
        labels = source.labels

        @torch.no_grad()
        def run() -> Evaluation:
            start = time.perf_counter()
            logits = torch.bmm(self.weight, blocks).sum(0).T  # (N, K)
            loss = F.cross_entropy(logits, labels).item()
            probs = logits.softmax(1).cpu().numpy()
            seconds = time.perf_counter() - start
            return Evaluation(probs, labels.cpu().numpy(), loss, seconds,
                              n / max(seconds, 1e-9))

        return run

    def _to_blocks(self, matrix: torch.Tensor) -> torch.Tensor:
        """(K, W) -> (P, K, W/P): block p holds columns [p W/P, (p+1) W/P)."""
        k, width = matrix.shape
        return matrix.view(k, self.blocks, width // self.blocks).transpose(0, 1).contiguous()

    def _from_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        """(P, K, W/P) -> (K, W)."""
        return blocks.transpose(0, 1).reshape(blocks.shape[1], -1)

    @torch.no_grad()
    def epoch(self, batch_size: int, order: torch.Tensor) -> tuple[float, float]:
        """One pass in ``order``; returns mean training loss and accuracy."""
        group = self.optimizer.param_groups[0]
        lr, momentum = group["lr"], group["momentum"]
        order = torch.as_tensor(order, device=self.inputs.device)
        labels = self.labels.index_select(0, order)  # (N,), in epoch order
        n, k = len(order), self.weight.shape[1]
        # Classes run along rows here, images along columns: the (K, W) x (W, B) product is
        # faster than its transpose for K much smaller than B. Each step's log-probabilities
        # land in one (N, K) array (seen as (K, N)); loss and accuracy are read off it once, at
        # the end, along its contiguous rows.
        log_probs_all = self.weight.new_empty(n, k)  # (N, K)
        # scatter_add_ reads as many of these as a step's targets need.
        minus_one = self.weight.new_full((1, batch_size), -1.0)
        steps = zip(order.split(batch_size), labels.view(1, n).split(batch_size, 1),
                    log_probs_all.T.split(batch_size, 1), strict=True)
        for index, targets, log_probs in steps:  # (B,), (1, B), (K, B)
            size = len(index)
            if size not in self._steps:
                self._steps[size] = self._step_buffers(size)
            batch, forward_in, backward_in, grad, grad_in = self._steps[size]
            torch.index_select(self.inputs, 0, index, out=batch)

            # Forward: log-probabilities (K, B). The gradient of the mean cross-entropy with
            # respect to the logits is (softmax - one_hot) / B.
            log_probs.copy_(torch.bmm(self.weight, forward_in).sum(0).log_softmax(0))
            torch.exp(log_probs, out=grad).scatter_add_(0, targets, minus_one)

            # SGD with momentum, as torch.optim.SGD does it: buf = m * buf + g; w -= lr * buf.
            self.buffer.baddbmm_(grad_in, backward_in, beta=momentum, alpha=1.0 / size)
            self.weight.add_(self.buffer, alpha=-lr)
        self._write_back()
        loss = -log_probs_all.gather(1, labels.unsqueeze(1)).mean().item()
        accuracy = (log_probs_all.argmax(1) == labels).float().mean().item()
        return loss, accuracy

    def _step_buffers(self, size: int) -> tuple[torch.Tensor, ...]:
        """Buffers a step of ``size`` rows reuses, and the views of them the products read.

        Returns the rows (B, W), them as blocks for the forward product (P, W/P, B) and for the
        backward one (P, B, W/P), the gradient of the logits (K, B), and it for every block
        (P, K, B). Made once per batch size and trainer, they spare each step and each epoch
        their setup.
        """
        blocks, k = self.blocks, self.weight.shape[1]
        batch = self.inputs.new_empty(size, self.width)
        split = batch.view(size, blocks, self.width // blocks)  # (B, P, W/P)
        grad = self.weight.new_empty(k, size)
        return (batch, split.permute(1, 2, 0), split.transpose(0, 1), grad,
                grad.expand(blocks, k, size))

    def _write_back(self):
        layer, state = self.layer, self.optimizer.state
        d = self.d
        weight, buffer = self._from_blocks(self.weight), self._from_blocks(self.buffer)
        layer.weight.copy_(weight[:, :d])
        layer.bias.copy_(weight[:, d])
        state[layer.weight]["momentum_buffer"] = buffer[:, :d].clone()
        state[layer.bias]["momentum_buffer"] = buffer[:, d].clone()


def train_one_epoch(module: nn.Module, optimizer: torch.optim.Optimizer, source,
                    batch_size: int, order: torch.Tensor, *, device: torch.device,
                    autocast: bool = False, progress: bool = False) -> tuple[float, float]:
    """One pass over ``source`` in ``order``; returns mean training loss and accuracy."""
    module.train()

    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    batches = tqdm(source.batches(batch_size, order), total=-(-len(source) // batch_size),
                   desc="train", disable=not progress, leave=False, unit="batch")
    for inputs, targets in batches:
        with _autocast(device, autocast):
            logits = module(inputs)
        loss = F.cross_entropy(logits.float(), targets)

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        # Accumulate on the device; one sync per epoch, not per step.
        loss_sum += loss.detach() * len(targets)
        correct += (logits.detach().argmax(1) == targets).sum()
    n = len(source)
    return loss_sum.item() / n, correct.item() / n


def fit(module: nn.Module, optimizer: torch.optim.Optimizer, train, val, *, epochs: int,
        batch_size: int, seed: int, device: torch.device, autocast: bool = False,
        progress: bool = False, on_epoch: Callable[[dict], None] | None = None) -> list[dict]:
    """Train ``module`` for ``epochs`` passes over ``train``, validating after each.

    A linear head on in-memory inputs trained by plain SGD runs through :class:`LinearHeadSGD`;
    everything else through autograd (:func:`train_one_epoch`). The batch order of each epoch
    is a permutation drawn from a generator seeded with ``seed``, so a head trained from the
    cache and one trained by streaming see the same batches.

    Returns:
        One dict per epoch: train/val loss and accuracy, and wall seconds of each pass.
    """
    generator = torch.Generator().manual_seed(seed)
    history = []
    setup_start = time.perf_counter()
    linear = LinearHeadSGD.create(module, optimizer, train)
    if linear is not None and isinstance(val, TensorSource):
        validate = linear.evaluator(val)
    else:
        validate = functools.partial(evaluate, module, val, batch_size, device=device,
                                     autocast=autocast)
    setup_seconds = time.perf_counter() - setup_start  # counted in the first epoch
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(train), generator=generator)

        start = time.perf_counter()
        if linear is not None:
            module.train()
            train_loss, train_acc = linear.epoch(batch_size, order)
        else:
            train_loss, train_acc = train_one_epoch(module, optimizer, train, batch_size, order,
                                                    device=device, autocast=autocast,
                                                    progress=progress)
        train_seconds = time.perf_counter() - start + (setup_seconds if epoch == 1 else 0.0)

        val_eval = validate()
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_accuracy": train_acc,
            "val_loss": val_eval.loss,
            "val_accuracy": val_eval.accuracy,
            "train_seconds": train_seconds,
            "val_seconds": val_eval.seconds,
        }
        history.append(row)
        if on_epoch is not None:
            on_epoch(row)
    return history
