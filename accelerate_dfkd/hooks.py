"""Forward-hook context managers on the teacher. Every hook is removed on exit, even on error.

The research code registers hooks once and never removes them (DESIGN.md): after a method is done
with a model, its hooks keep running and holding tensors. Here hooks live exactly as long as a
`with` block.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import Tensor, nn


class _HookScope(contextlib.AbstractContextManager):
    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _register(self, module: nn.Module, fn) -> None:
        self._handles.append(module.register_forward_hook(fn))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __exit__(self, *exc) -> None:
        self.remove()


class FeatureCapture(_HookScope):
    """Keeps the input or output of one module from the last forward pass.

    `with FeatureCapture(last_linear(teacher), capture="input") as feats: teacher(x); feats.value`
    gives the penultimate features (DAFL's activation loss) without a `return_features` kwarg.
    """

    def __init__(self, module: nn.Module, capture: str = "output") -> None:
        super().__init__()
        if capture not in ("input", "output"):
            raise ValueError("capture must be 'input' or 'output'")
        self.capture = capture
        self.value: Optional[Tensor] = None
        self._register(module, self._hook)

    def _hook(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        self.value = inputs[0] if self.capture == "input" else output


class BatchNormStatistics(_HookScope):
    """DeepInversion's feature-statistics prior: match each BatchNorm's running statistics.

    On the input of every BatchNorm2d, the batch mean and biased variance per channel are compared
    with the running statistics: loss_l = ||mu_l - mean||_2 + ||sigma2_l - var||_2 (plain L2 norms,
    NVlabs DeepInversion `DeepInversionFeatureHook`; zju-vipa `datafree/hooks.py`), summed over
    layers, the first layer optionally scaled by `first_layer_weight` (DeepInversion's
    `first_bn_multiplier`). Computed in float32 (AMP NaNs in BN statistics, DESIGN.md fact 7).
    """

    def __init__(self, model: nn.Module, first_layer_weight: float = 1.0) -> None:
        super().__init__()
        self.layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        if not self.layers:
            raise ValueError(
                f"{type(model).__name__} has no BatchNorm2d layer, so its BatchNorm statistics cannot "
                "be matched; use a method without a BN-statistics term (e.g. dfad), or a teacher with BatchNorm")
        self.first_layer_weight = first_layer_weight
        self.layer_losses: list[Tensor] = []
        for layer in self.layers:
            self._register(layer, self._hook)

    def _hook(self, module: nn.BatchNorm2d, inputs: tuple, output: Tensor) -> None:
        x = inputs[0].float()
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
        loss = torch.linalg.vector_norm(module.running_mean - mean) + torch.linalg.vector_norm(module.running_var - var)
        self.layer_losses.append(loss)

    def loss(self) -> Tensor:
        if not self.layer_losses:
            raise RuntimeError("BatchNormStatistics.loss() called before a forward pass of the model")
        total = self.layer_losses[0] * self.first_layer_weight
        for layer_loss in self.layer_losses[1:]:
            total = total + layer_loss
        self.layer_losses = []
        return total


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Temporarily `requires_grad_(False)` on every parameter, restoring each flag on exit.

    A generator step backpropagates *through* the student to the images; freezing the student keeps
    its .grad untouched and, under DDP, avoids all-reducing gradients that are thrown away.
    """
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def training_mode(module: nn.Module, mode: bool) -> Iterator[nn.Module]:
    """Temporarily set train()/eval() on a module, restoring the previous mode of every submodule."""
    previous = [(m, m.training) for m in module.modules()]
    module.train(mode)
    try:
        yield module
    finally:
        for m, was_training in previous:
            m.training = was_training


def last_linear(model: nn.Module) -> nn.Linear:
    """The classifier layer: the last nn.Linear registered in the model (its input is the
    penultimate feature). Every model of our zoo follows this convention."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier layer")
    return linears[-1]
