"""Callbacks: the side jobs of a run (progress, image grids, best student, timing).

A callback subclasses `Callback` and overrides the events it needs; every event is a no-op by
default and receives the shared `TrainerState` plus named payloads. Events, in order:

    on_train_start(state)                            once, after set-up (and after a resume)
    on_synthesis_start(state)                        before each synthesis round
    on_synthesis_end(state, output)                  after it: output is a SynthesisOutput
    on_step_start(state)                             before each student optimizer step
    on_step_end(state, losses)                       after it: losses maps names to detached tensors
    on_evaluate(state, metrics, student)             after an evaluation on real held-out data
    on_save(state, checkpoint_dir)                   after a checkpoint is complete on disk
    on_train_end(state, results)                     once: results is what goes to results.json

Callbacks run on every rank (so collective work stays in step); side effects that write files
check `state.is_main_process`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from .imaging import save_image_grid
from .utils import synchronize


@dataclass
class TrainerState:
    """What the loop knows and the callbacks read. The serialisable part is saved with every
    checkpoint (`to_json`), so counters, timings and best-so-far survive a resume."""

    max_steps: int = 0
    global_step: int = 0          # student optimizer steps done
    rounds: int = 0               # synthesis rounds done
    teacher_top1: Optional[float] = None
    best_top1: Optional[float] = None
    best_step: Optional[int] = None
    eval_history: list[tuple[int, float]] = field(default_factory=list)
    synthesis_seconds: float = 0.0
    distill_seconds: float = 0.0
    wall_seconds: float = 0.0     # the loop's wall clock, summed over resumed segments
    # runtime only (not saved)
    output_dir: Path = field(default_factory=Path, metadata={"runtime": True})
    is_main_process: bool = field(default=True, metadata={"runtime": True})
    device: torch.device = field(default_factory=lambda: torch.device("cpu"), metadata={"runtime": True})

    def to_json(self) -> dict[str, Any]:
        skip = {"output_dir", "is_main_process", "device"}
        return {k: v for k, v in asdict(self).items() if k not in skip}

    def load_json(self, data: dict[str, Any]) -> None:
        for key, value in data.items():
            if key == "eval_history":
                value = [tuple(x) for x in value]
            setattr(self, key, value)


class Callback:
    """Typed no-op base. Override what you need."""

    def on_train_start(self, state: TrainerState) -> None: ...
    def on_synthesis_start(self, state: TrainerState) -> None: ...
    def on_synthesis_end(self, state: TrainerState, output: Any) -> None: ...
    def on_step_start(self, state: TrainerState) -> None: ...
    def on_step_end(self, state: TrainerState, losses: dict[str, Tensor]) -> None: ...
    def on_evaluate(self, state: TrainerState, metrics: dict[str, float], student: nn.Module) -> None: ...
    def on_save(self, state: TrainerState, checkpoint_dir: Path) -> None: ...
    def on_train_end(self, state: TrainerState, results: dict[str, Any]) -> None: ...


class CallbackHandler(Callback):
    """Dispatches each event to every callback, in order."""

    def __init__(self, callbacks: list[Callback]) -> None:
        self.callbacks = list(callbacks)

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("on_"):
            def dispatch(*args: Any, **kwargs: Any) -> None:
                for cb in object.__getattribute__(self, "callbacks"):
                    getattr(cb, name)(*args, **kwargs)
            return dispatch
        return object.__getattribute__(self, name)


class TimingCallback(Callback):
    """The timing audit: synthesis time and distillation time, measured separately and
    device-synchronised (the reference code times without synchronising, implementations.md s.6).
    Distillation time includes drawing batches from the source."""

    def __init__(self) -> None:
        self._start: Optional[float] = None
        self._wall_mark: Optional[float] = None

    def _wall(self, state: TrainerState) -> None:
        """Wall clock since the last mark into `state.wall_seconds`: updated at every event that can
        precede a checkpoint or the results, so a resumed run continues from the saved total."""
        now = time.perf_counter()
        if self._wall_mark is not None:
            state.wall_seconds += now - self._wall_mark
        self._wall_mark = now

    def on_train_start(self, state: TrainerState) -> None:
        self._wall_mark = time.perf_counter()

    def on_evaluate(self, state: TrainerState, metrics: dict[str, float], student: nn.Module) -> None:
        self._wall(state)

    def on_save(self, state: TrainerState, checkpoint_dir: Path) -> None:
        self._wall(state)

    def _tic(self, state: TrainerState) -> None:
        synchronize(state.device)
        self._start = time.perf_counter()

    def _toc(self, state: TrainerState) -> float:
        synchronize(state.device)
        elapsed = time.perf_counter() - (self._start or time.perf_counter())
        self._start = None
        return elapsed

    def on_synthesis_start(self, state: TrainerState) -> None:
        self._tic(state)

    def on_synthesis_end(self, state: TrainerState, output: Any) -> None:
        state.synthesis_seconds += self._toc(state)

    def on_step_start(self, state: TrainerState) -> None:
        self._tic(state)

    def on_step_end(self, state: TrainerState, losses: dict[str, Tensor]) -> None:
        state.distill_seconds += self._toc(state)
        self._wall(state)


class ProgressCallback(Callback):
    """A tqdm bar on the main process, with the latest losses every `every` steps."""

    def __init__(self, every: int = 10) -> None:
        self.every = max(1, every)
        self.bar = None

    def on_train_start(self, state: TrainerState) -> None:
        if state.is_main_process:
            import sys

            from tqdm.auto import tqdm

            # redirected to a file or CI log: a line every 10 s instead of a redraw per step
            interval = 0.1 if sys.stderr.isatty() else 10.0
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="distill", dynamic_ncols=True,
                            mininterval=interval)

    def on_step_end(self, state: TrainerState, losses: dict[str, Tensor]) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        if state.global_step % self.every == 0:
            self.bar.set_postfix({k: f"{float(v):.4f}" for k, v in losses.items()}, refresh=False)

    def on_evaluate(self, state: TrainerState, metrics: dict[str, float], student: nn.Module) -> None:
        if self.bar is not None:
            self.bar.write(f"step {state.global_step}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))

    def on_train_end(self, state: TrainerState, results: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.close()


class ImageGridCallback(Callback):
    """A PNG grid of the latest synthetic images every `every_rounds` synthesis rounds
    (`OUTPUT_DIR/images/round_000100.png`), from the main process's batch."""

    def __init__(self, every_rounds: int, max_images: int = 64, upscale: int = 1) -> None:
        self.every_rounds, self.max_images, self.upscale = every_rounds, max_images, upscale

    def on_synthesis_end(self, state: TrainerState, output: Any) -> None:
        if not state.is_main_process or output.images is None or state.rounds % self.every_rounds:
            return
        images = output.images[: self.max_images]
        if images.dim() == 4 and images.shape[1] in (1, 3):
            save_image_grid(images, state.output_dir / "images" / f"round_{state.rounds:06d}.png", upscale=self.upscale)


class BestStudentCallback(Callback):
    """Tracks the best evaluation top-1 and keeps that student as `best_student.safetensors`."""

    def __init__(self, metric: str = "eval/top1") -> None:
        self.metric = metric

    def on_evaluate(self, state: TrainerState, metrics: dict[str, float], student: nn.Module) -> None:
        value = metrics.get(self.metric)
        if value is None or (state.best_top1 is not None and value <= state.best_top1):
            return
        state.best_top1, state.best_step = value, state.global_step
        if state.is_main_process:
            path = state.output_dir / "best_student.safetensors"
            tmp = path.with_name(".best_student.safetensors.tmp")
            save_file({k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}, str(tmp))
            tmp.replace(path)
