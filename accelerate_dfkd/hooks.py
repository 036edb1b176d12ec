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


def _distributed_world() -> int:
    """World size of the default process group, 1 when torch.distributed is unavailable or not initialized."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def _all_reduce_sum(tensor: Tensor) -> Tensor:
    """Differentiable SUM all-reduce over the default group.

    torch.distributed.nn.functional.all_reduce (present in torch 2.x, works on gloo and nccl) keeps the
    autograd graph: its backward is again a SUM all-reduce of the incoming gradient. So when every rank
    back-propagates the same global loss L, rank r receives sum_q dL/dS * dS/dx_r = world_size * dL/dx_r
    (see BatchNormStatistics for why this is the convention we want). Every rank must call backward.
    """
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(tensor)


def _global_batch_statistics(x: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of the batch concatenated over all ranks, differentiably.

    Each rank contributes S1 = sum(x - c), S2 = sum((x - c)^2) and the element count n per channel; the
    three are packed into one tensor and all-reduced in a single collective, then mean = c + S1/n and
    var = S2/n - (S1/n)^2 (biased, like the single-process loss). The shift c is the layer's running
    mean, identical on every rank and close to the data mean, so the subtraction does not cancel
    catastrophically in float32; var is shift-invariant, so the result is the same.
    """
    centred = x - shift.view(1, -1, 1, 1)
    count = torch.full_like(shift, float(x.numel() // max(x.shape[1], 1)))
    packed = torch.stack([centred.sum(dim=(0, 2, 3)), centred.square().sum(dim=(0, 2, 3)), count])
    s1, s2, n = _all_reduce_sum(packed).unbind(0)
    shifted_mean = s1 / n
    var = (s2 / n - shifted_mean.square()).clamp_min(0.0)
    return shifted_mean + shift, var


class BNMomentumState:
    """FastDFKD's accumulated ("momentum") BatchNorm statistics, one (mean, var) pair per BN layer.

    Owned by a synthesizer across synthesis rounds (and checkpointed through state_dict); a
    BatchNormStatistics built with `momentum=m, state=this` blends each batch's statistics with the
    accumulators (FastDFKD Eq. 15). After a round, `update(bn_statistics)` folds in the statistics of
    the last batch that went through the teacher, as `update_mmt` in Fast-Datafree datafree/hooks.py:
    the first time acc = last; afterwards acc = m * acc + (1 - m) * last, detached.
    Layers are identified by their position among the teacher's BatchNorm2d modules (model.modules()).
    """

    def __init__(self) -> None:
        self.mean: list[Optional[Tensor]] = []
        self.var: list[Optional[Tensor]] = []

    def __len__(self) -> int:
        return len(self.mean)

    def get(self, index: int) -> Optional[tuple[Tensor, Tensor]]:
        if index >= len(self.mean) or self.mean[index] is None:
            return None
        return self.mean[index], self.var[index]

    def update(self, bn_statistics: "BatchNormStatistics") -> None:
        momentum = bn_statistics.momentum
        if not any(stats is not None for stats in bn_statistics.last_statistics):
            raise RuntimeError("BNMomentumState.update() needs a forward pass of the teacher inside BatchNormStatistics")
        layers = len(bn_statistics.last_statistics)
        if self.mean and len(self.mean) != layers:
            raise ValueError(f"momentum state holds {len(self.mean)} BatchNorm layers, the teacher has {layers}")
        if not self.mean:
            self.mean, self.var = [None] * layers, [None] * layers
        for i, last in enumerate(bn_statistics.last_statistics):
            if last is None:  # layer not reached by the last forward pass: keep its accumulator
                continue
            mean, var = (t.detach().float().clone() for t in last)
            if self.mean[i] is None:
                self.mean[i], self.var[i] = mean, var
            else:
                acc_mean, acc_var = self.mean[i].to(mean.device), self.var[i].to(var.device)
                self.mean[i] = (momentum * acc_mean + (1.0 - momentum) * mean).detach()
                self.var[i] = (momentum * acc_var + (1.0 - momentum) * var).detach()

    def reset(self) -> None:
        self.mean, self.var = [], []

    def state_dict(self) -> dict:
        return {"mean": [None if t is None else t.detach().cpu().clone() for t in self.mean],
                "var": [None if t is None else t.detach().cpu().clone() for t in self.var]}

    def load_state_dict(self, state: dict) -> None:
        mean, var = list(state["mean"]), list(state["var"])
        if len(mean) != len(var) or any((m is None) != (v is None) for m, v in zip(mean, var)):
            raise ValueError("BNMomentumState.load_state_dict: 'mean' and 'var' do not match layer by layer")
        self.mean = [None if t is None else t.detach().float().clone() for t in mean]
        self.var = [None if t is None else t.detach().float().clone() for t in var]


class BatchNormStatistics(_HookScope):
    """DeepInversion's feature-statistics prior: match each BatchNorm's running statistics.

    On the input of every BatchNorm2d, the batch mean and biased variance per channel are compared
    with the running statistics: loss_l = ||mu_l - mean||_2 + ||sigma2_l - var||_2 (plain L2 norms,
    NVlabs DeepInversion `DeepInversionFeatureHook`; zju-vipa `datafree/hooks.py`), summed over
    layers, the first BatchNorm2d of the model (module order) optionally scaled by
    `first_layer_weight` (DeepInversion's `first_bn_multiplier`). Computed in float32 (AMP NaNs in BN
    statistics, DESIGN.md fact 7).

    momentum (FastDFKD Eq. 15, Fast-Datafree `DeepInversionHook(module, mmt_rate)`): with m > 0 the
    compared statistics of layer l are (1 - m) * batch + m * accumulated wherever `state` holds an
    accumulator for l (the plain loss otherwise). `state` (a BNMomentumState) is meant to live in the
    synthesizer across rounds; call `update_momentum()` (= `state.update(self)`) after a round to fold
    in the statistics of the last batch. Without a `state`, a private one lives as long as this object.
    The detached statistics of the last forward pass are kept in `last_statistics` for that update.

    distributed (DESIGN.md fact 6; the reference computes per GPU, NVlabs/DeepInversion#16): the batch
    mean and variance are those of the synthesis batch concatenated over all ranks (sums and counts
    all-reduced, one collective per BN layer), so every rank sees the same loss. Falls back to local
    statistics when torch.distributed is not initialized or the world has one process. Gradient
    convention: the all-reduce's backward sums gradients, so rank r's inputs receive world_size times
    their slice of the single-process gradient of the global loss. This is the same scaling as every
    per-rank mean loss under DDP (whose gradients are then averaged over ranks), so mixing this term
    with per-rank terms keeps the single-process weighting, and shared (DDP) parameters receive
    exactly the single-process gradient. Every rank must run the forward and the backward.
    """

    def __init__(self, model: nn.Module, first_layer_weight: float = 1.0, momentum: float = 0.0,
                 state: Optional[BNMomentumState] = None, distributed: bool = False) -> None:
        super().__init__()
        self.layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        if not self.layers:
            raise ValueError(
                f"{type(model).__name__} has no BatchNorm2d layer, so its BatchNorm statistics cannot "
                "be matched; use a method without a BN-statistics term (e.g. dfad), or a teacher with BatchNorm")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        if state is not None and len(state) not in (0, len(self.layers)):
            raise ValueError(f"momentum state holds {len(state)} BatchNorm layers, "
                             f"{type(model).__name__} has {len(self.layers)}")
        self.first_layer_weight = first_layer_weight
        self.momentum = float(momentum)
        self.state = state if state is not None else BNMomentumState()
        self.distributed = distributed
        self.layer_losses: list[Tensor] = []
        self._layer_index: list[int] = []
        self.last_statistics: list[Optional[tuple[Tensor, Tensor]]] = [None] * len(self.layers)
        for index, layer in enumerate(self.layers):
            self._register(layer, self._make_hook(index))

    def _make_hook(self, index: int):
        def hook(module: nn.BatchNorm2d, inputs: tuple, output: Tensor) -> None:
            self._hook(index, module, inputs[0])
        return hook

    def _batch_statistics(self, module: nn.BatchNorm2d, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.distributed and _distributed_world() > 1:
            return _global_batch_statistics(x, module.running_mean.detach().float())
        return x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)

    def _hook(self, index: int, module: nn.BatchNorm2d, x: Tensor) -> None:
        x = x.float()
        mean, var = self._batch_statistics(module, x)
        self.last_statistics[index] = (mean.detach().clone(), var.detach().clone())
        accumulated = self.state.get(index) if self.momentum > 0 else None
        if accumulated is not None:
            m = self.momentum
            mean = (1.0 - m) * mean + m * accumulated[0].to(mean.device)
            var = (1.0 - m) * var + m * accumulated[1].to(var.device)
        loss = (torch.linalg.vector_norm(module.running_mean.float() - mean)
                + torch.linalg.vector_norm(module.running_var.float() - var))
        self.layer_losses.append(loss)
        self._layer_index.append(index)

    def loss(self) -> Tensor:
        if not self.layer_losses:
            raise RuntimeError("BatchNormStatistics.loss() called before a forward pass of the model")
        total = None
        for index, layer_loss in zip(self._layer_index, self.layer_losses):
            term = layer_loss * self.first_layer_weight if index == 0 else layer_loss
            total = term if total is None else total + term
        self.layer_losses, self._layer_index = [], []
        return total

    def update_momentum(self) -> None:
        """Fold the last batch's statistics into `state` (call once after each synthesis round)."""
        self.state.update(self)


def has_batchnorm(model: nn.Module) -> bool:
    """Whether BN-statistics terms can be computed on this model (LeNet-5 and ViTs cannot)."""
    return any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


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
