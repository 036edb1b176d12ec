"""An exponential moving average (EMA) of the student's weights: the student a run delivers when
`student_ema_decay` is set.

Why: adversarial DFKD (DFAD and its kin) is a game, and the online student swings between
evaluations and drifts as the learning rate decays (recipes/README.md, "DFAD at the paper's
generator width"). Averaging the weights over the last ~1/(1 - decay) steps smooths that out. It is
not part of any DFKD paper: an option, off by default.

The average covers every floating-point entry of the state dict, BatchNorm running statistics
included (as timm's ModelEmaV2 does), so the averaged student is evaluated with statistics that
match its weights; integer buffers (`num_batches_tracked`) are copied. The effective decay at update
t is min(decay, (1 + t) / (10 + t)), TensorFlow's `ExponentialMovingAverage(num_updates=...)`
warm-up, so the first, random weights are forgotten quickly instead of weighing on the average for
thousands of steps.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .config import ConfigError, check_ema_decay


class StudentEMA:
    """`module` holds the averaged student; `update(student)` after every optimizer step."""

    def __init__(self, student: nn.Module, decay: float) -> None:
        check_ema_decay(decay)
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(student).eval().requires_grad_(False)
        # A bf16/fp16 student (DeepSpeed casts it) is averaged in float32: in half precision an update of
        # (1 - decay) x the change would mostly round away.
        if any(t.dtype in (torch.float16, torch.bfloat16) for t in self.module.state_dict().values()):
            self.module.float()

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        decay = self.current_decay()
        online = student.state_dict()
        averaged, values = [], []
        for name, avg in self.module.state_dict().items():
            if avg.is_floating_point():
                averaged.append(avg)
                values.append(online[name].detach().to(avg.dtype))
            else:
                avg.copy_(online[name])
        # one fused update for all tensors (as torch.optim.swa_utils does): a step's cost on a GPU is
        # a few kernel launches, not two per tensor
        if averaged:
            torch._foreach_lerp_(averaged, values, 1.0 - decay)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates,
                "weights": {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["decay"] != self.decay:
            raise ConfigError(f"the checkpoint's student EMA has decay {state['decay']} but this run asks for "
                              f"{self.decay}: resume with --student_ema_decay {state['decay']}")
        self.module.load_state_dict(state["weights"])
        self.updates = int(state["updates"])
