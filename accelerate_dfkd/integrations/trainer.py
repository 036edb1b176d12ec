"""Drop-in synthetic data for someone else's training loop: a plain PyTorch loop or a transformers
`Trainer` with a KD loss trains on a method's synthetic data unchanged.

    dataset = SyntheticDataset.from_method("dfad", teacher, student, image_shape=(1, 8, 8),
                                           num_classes=10, batch_size=256)
    for batch in DataLoader(dataset, batch_size=256):        # num_workers=0 (the default)
        loss = kl(student(batch["pixel_values"]), batch["teacher_logits"]) ...

The other mode of the library (DESIGN.md "Drop-in use"): inside our Distiller, the loop calls
`synthesize()` explicitly; here nobody else will, so the dataset does it itself, every
`synthesize_every` batches, against the LIVE student it was given (the very module the loop
trains, not a copy), so adversarial methods (DFAD, ZSKT, DFQ, ADI) keep playing their game.

What it yields, one sample at a time (the caller's DataLoader or the Trainer collates them):
    pixel_values    (C, H, W) float32, in the teacher's input space
    teacher_logits  (num_classes,) float32, the frozen teacher's logits on those pixels
    labels          () int64, the teacher's argmax; only with `with_labels=True`, so that a stock
                    `Trainer` on a transformers model (its own cross-entropy on `labels`) also trains
    weights         () float32, per-sample loss weights, only where the method's source gives them
    replay_indices  () int64, the sample's slot in the method's replay buffer, only where the source
                    gives them (SSD-KD): hand the batch back with `dataset.after_student_step(batch,
                    student_logits)` after the student's step, so the method re-scores those slots

Teacher logits are computed here once per batch, so a KD loss needs no second teacher forward.

Rules the dataset enforces or documents:
  * It must be iterated in the main process (`num_workers=0`, the default; Trainer:
    `dataloader_num_workers=0`): the generator, its optimizer and the student live there, and a
    worker process would train a copy that the student never sees. A worker raises a clear error.
  * It is endless and has no `__len__`: a Trainer needs `max_steps > 0` (the Trainer itself refuses
    otherwise); a plain loop stops when it wants, or sets `num_batches`.
  * Under a Trainer, pass the model you give the Trainer (`trainer.model`, the unwrapped module; the
    Trainer wraps it in DDP for training but updates the same parameters in place). The callback
    checks it is the same object. FSDP / DeepSpeed ZeRO-3 shard the parameters, so the module is not
    usable for synthesis there: not supported.
  * Synthesis rounds count batches of `batch_size` samples. With a DataLoader of the same batch size
    they land on student-step boundaries (DESIGN.md fact 2); the callback scales the count by
    gradient accumulation and, in a multi-process Trainer, by the world size (Accelerate's default
    for an IterableDataset is `dispatch_batches`: rank 0 alone iterates the dataset, drawing every
    rank's batch, and sends each rank its slice; the synthesizer then runs on rank 0 only, against
    rank 0's student, which DDP keeps identical on every rank).
  * The Trainer's DataLoader fetches one batch ahead, so a synthesis round may see the student of
    one optimizer step earlier. A plain loop with `num_workers=0` sees the current one.
"""

from __future__ import annotations

import inspect
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import IterableDataset, get_worker_info

from ..config import ConfigError, MethodConfig, load_recipe
from ..evaluation import recipe_input_normalization, resolve_input_normalization
from ..hooks import has_batchnorm
from ..synthesis import SynthesisContext, SyntheticBatch, Synthesizer
from ..teachers import check_classifier_output, freeze
from ..utils import logits_of


def _device_of(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def build_synthesizer(method: str | MethodConfig, teacher: nn.Module, *, image_shape: tuple[int, int, int],
                      num_classes: int, seed: int = 0, device: Optional[torch.device | str] = None,
                      task: str = "classification", image_mean: Optional[Sequence[float]] = None,
                      image_std: Optional[Sequence[float]] = None, **method_kwargs: Any) -> Synthesizer:
    """A method's synthesizer from its registry name (with config fields as keyword arguments) or
    from a ready MethodConfig, on the teacher's device, for one process. `image_mean` / `image_std`:
    the teacher's input normalisation for pixels in [0, 1] (None: the teacher's declared one, if any),
    which methods with a [0, 1] generator (fast_dfkd, cmi, ssd_kd) need.

    The generator is initialised from `seed` inside a forked RNG, so the caller's global random
    stream is left as it was; the synthesizer's own streams are seeded with `seed` too."""
    from ..methods import METHODS

    if isinstance(method, MethodConfig):
        matches = [cls for cls in METHODS.values() if type(method) is cls.config_class]
        if not matches or method_kwargs:
            raise ConfigError(f"give either a method name with keyword overrides, or a method config alone "
                              f"(got {type(method).__name__} with {sorted(method_kwargs)})")
        synth_cls, config = matches[0], method
    else:
        if method not in METHODS:
            raise ConfigError(f"unknown method {method!r}; known: {sorted(METHODS)}")
        synth_cls = METHODS[method]
        known = {f for f in synth_cls.config_class.__dataclass_fields__}
        unknown = sorted(set(method_kwargs) - known)
        if unknown:
            raise ConfigError(f"{synth_cls.config_class.__name__} has no field(s) {unknown}; "
                              f"run `accelerate-dfkd --help-keys --method {method}` to list them")
        config = synth_cls.config_class(**method_kwargs)
    if hasattr(config, "validate"):
        config.validate()
    image_shape = tuple(image_shape)
    synth_cls.check_image_shape(config, image_shape)
    device = torch.device(device) if device is not None else _device_of(teacher)
    freeze(teacher)
    check_classifier_output(teacher, "teacher", image_shape, num_classes, device=device, task=task)
    if synth_cls.needs_batchnorm_teacher and not has_batchnorm(teacher):
        raise ConfigError(f"method {synth_cls.name!r} matches the teacher's BatchNorm statistics, but "
                          f"{type(teacher).__name__} has no BatchNorm2d layer: use a method without a "
                          "BN-statistics term (e.g. dfad)")
    mean, std = resolve_input_normalization(image_mean, image_std, teacher) or (None, None)
    context = SynthesisContext(device=device, seed=seed, image_mean=mean, image_std=std)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the same generator initialisation as a Distiller run with this seed
        return synth_cls(config, teacher, image_shape=image_shape, num_classes=num_classes, context=context,
                         task=task)


class SyntheticDataset(IterableDataset):
    """A method's synthetic data as an endless torch IterableDataset of per-sample dicts, running a
    synthesis round against the live `student` every `synthesize_every` batches by itself.

    `synthesize_every` defaults to the method's `student_steps_per_round` (DFAD: 5, the reference's
    5 student steps per generator step), so the cadence is the one the Distiller would use.
    """

    def __init__(self, synthesizer: Synthesizer, student: nn.Module, *, batch_size: int,
                 synthesize_every: Optional[int] = None, with_labels: bool = False,
                 num_batches: Optional[int] = None, output_device: torch.device | str = "cpu") -> None:
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        synthesize_every = synthesize_every or synthesizer.config.student_steps_per_round
        if synthesize_every <= 0:
            raise ConfigError(f"synthesize_every must be positive, got {synthesize_every}")
        if num_batches is not None and num_batches <= 0:
            raise ConfigError(f"num_batches must be positive or None (endless), got {num_batches}")
        self.synthesizer = synthesizer
        self.teacher = synthesizer.teacher
        self.student = student
        self.batch_size = batch_size
        self.synthesize_every = synthesize_every
        self.with_labels = with_labels
        self.num_batches = num_batches
        self.output_device = torch.device(output_device)
        self.source = synthesizer.build_source(batch_size)
        # Set by SyntheticDataCallback: batches drawn per student optimizer step (gradient
        # accumulation x ranks served by this process), and the student's LR-schedule multiplier,
        # which methods such as DFAD apply to their generator too.
        self.batches_per_step = 1
        self.lr_scale = 1.0
        self.batches_read = 0            # over all iterations of this dataset
        self.last_synthesis_losses: dict[str, Tensor] = {}
        self.synthesis_seconds = 0.0
        # Methods that learn from what the student just saw (SSD-KD's priorities) override the hook.
        self.needs_feedback = type(synthesizer).after_student_step is not Synthesizer.after_student_step
        self.feedback_calls = 0
        # Set by SyntheticDataCallback under a multi-process Trainer: every rank's feedback is gathered
        # to the rank(s) that read this dataset, since their buffer served every rank's slice.
        self.feedback_world_size = 1
        self._warned_no_feedback = False

    # --- constructors ----------------------------------------------------------------------------
    @classmethod
    def from_method(cls, method: str | MethodConfig, teacher: nn.Module, student: nn.Module, *,
                    image_shape: tuple[int, int, int], num_classes: int, batch_size: int, seed: int = 0,
                    device: Optional[torch.device | str] = None, synthesize_every: Optional[int] = None,
                    with_labels: bool = False, num_batches: Optional[int] = None,
                    **method_kwargs: Any) -> "SyntheticDataset":
        """`SyntheticDataset.from_method("dfad", teacher, student, image_shape=(3, 32, 32),
        num_classes=10, batch_size=256, nz=256)`: keyword arguments the dataset does not take are
        fields of the method's config."""
        synthesizer = build_synthesizer(method, teacher, image_shape=image_shape, num_classes=num_classes,
                                        seed=seed, device=device, **method_kwargs)
        check_classifier_output(student, "student", tuple(image_shape), num_classes, device=_device_of(student))
        return cls(synthesizer, student, batch_size=batch_size, synthesize_every=synthesize_every,
                   with_labels=with_labels, num_batches=num_batches)

    @classmethod
    def from_recipe(cls, recipe: Optional[str | Path], student: Optional[nn.Module] = None,
                    teacher: Optional[nn.Module] = None, *, overrides: Optional[dict[str, Any]] = None,
                    with_labels: bool = False, num_batches: Optional[int] = None) -> "SyntheticDataset":
        """The method, teacher, student, image shape, seed and batch size of a recipe
        (`recipes/<dataset>/<method>.yaml`, with `overrides` as on the command line). Models not given
        are built as the CLI builds them (the student from `student_checkpoint`, or freshly
        initialised from the recipe's seed); the one to train is `dataset.student`."""
        from ..teachers import load_student, load_teacher

        config, method_config = load_recipe(recipe, overrides)
        shape = dict(num_classes=config.num_classes, in_channels=config.in_channels, image_size=config.image_size,
                     task=config.task)
        if teacher is None:
            teacher = load_teacher(config.teacher, config.teacher_checkpoint, **shape)
        if student is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                student = load_student(config.student, config.student_checkpoint, **shape)
        image_shape = (config.in_channels, config.image_size, config.image_size)
        mean, std = recipe_input_normalization(config, teacher) or (None, None)
        synthesizer = build_synthesizer(method_config, teacher, image_shape=image_shape,
                                        num_classes=config.num_classes, seed=config.seed, task=config.task,
                                        image_mean=mean, image_std=std)
        return cls(synthesizer, student, batch_size=config.per_device_train_batch_size,
                   with_labels=with_labels, num_batches=num_batches)

    # --- reading -----------------------------------------------------------------------------------
    def _check_main_process(self) -> None:
        if get_worker_info() is not None:
            raise RuntimeError(
                "SyntheticDataset must be iterated in the training process: its generator and the live student "
                "live there, and a DataLoader worker would train a copy the student never sees. Use "
                "DataLoader(..., num_workers=0) or TrainingArguments(dataloader_num_workers=0)")

    def synthesize(self) -> None:
        """One synthesis round against the live student (called by the iteration itself)."""
        start = time.perf_counter()
        output = self.synthesizer.synthesize(self.student, lr_scale=self.lr_scale)
        self.last_synthesis_losses = output.losses
        self.synthesis_seconds += time.perf_counter() - start

    def next_batch(self) -> dict[str, Tensor]:
        """The next whole batch as a dict of stacked tensors, after a synthesis round when one is due."""
        self._check_main_process()
        if self.batches_read == 0:  # the method's synthesis-only warm-up (FastDFKD), as in the Distiller
            for _ in range(getattr(self.synthesizer.config, "warmup_rounds", 0)):
                self.synthesize()
        if self.batches_read % (self.synthesize_every * self.batches_per_step) == 0:
            self.synthesize()
        batch = self.source.next_batch()
        with torch.no_grad(), self.synthesizer.context.autocast():
            teacher_logits = logits_of(self.teacher(batch.images)).float()
        out = {"pixel_values": batch.images.float(), "teacher_logits": teacher_logits}
        if self.with_labels:
            out["labels"] = teacher_logits.argmax(dim=1)
        if batch.weights is not None:
            out["weights"] = batch.weights.float()
        if batch.indices is not None:
            out["replay_indices"] = batch.indices.long()
        self.batches_read += 1
        self._warn_if_feedback_missing()
        return {key: value.detach().to(self.output_device) for key, value in out.items()}

    def after_student_step(self, batch: dict[str, Tensor], student_logits: Tensor) -> None:
        """Hand a collated batch and the student's logits on it back to the method, as the Distiller
        does after every student step (SSD-KD re-scores the replay slots it drew, Eq. 4). Call it in
        your loss (a Trainer's `compute_loss`) with the batch the loss saw; a no-op for methods that
        need nothing back. Under a multi-process Trainer, call it on every rank: it is a collective
        there. Each rank trained on its slice of batches one reader drew, so the slices' logits are
        gathered and the reader's buffer re-scores all of them."""
        self.feedback_calls += 1
        if not self.needs_feedback or "replay_indices" not in batch:
            return
        parts = {"images": batch["pixel_values"].detach(), "indices": batch["replay_indices"],
                 "student_logits": student_logits.detach().float(),
                 "teacher_logits": batch["teacher_logits"].detach().float()}
        if batch.get("weights") is not None:
            parts["weights"] = batch["weights"].detach().float()
        if self.feedback_world_size > 1:
            # No more traffic than the dispatch itself, which sent these images out from rank 0.
            parts = {key: _all_gather_cat(value) for key, value in parts.items()}
            if self.batches_read == 0:  # this rank's copy is never read (Accelerate dispatches from rank 0)
                return
        parts = {key: value.to(self.synthesizer.context.device) for key, value in parts.items()}
        synthetic = SyntheticBatch(images=parts["images"], indices=parts["indices"], weights=parts.get("weights"))
        self.synthesizer.after_student_step(synthetic, parts["student_logits"], parts["teacher_logits"])

    def _warn_if_feedback_missing(self) -> None:
        # A few rounds without feedback: say so once, rather than letting priorities go stale silently.
        if (self.needs_feedback and not self._warned_no_feedback and self.feedback_calls == 0
                and self.batches_read > 2 * self.synthesize_every * self.batches_per_step + 1):
            self._warned_no_feedback = True
            warnings.warn(f"{type(self.synthesizer).__name__} learns from the student's logits on each batch it "
                          "served, but dataset.after_student_step(batch, student_logits) has not been called: call "
                          "it in your loss after the student's forward, or its replay priorities never change")

    def iter_batches(self) -> Iterator[dict[str, Tensor]]:
        """Whole batches (a plain loop that wants no DataLoader)."""
        produced = 0
        while self.num_batches is None or produced < self.num_batches:
            yield self.next_batch()
            produced += 1

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        for batch in self.iter_batches():
            for i in range(len(batch["pixel_values"])):
                yield {key: value[i] for key, value in batch.items()}

    @property
    def rounds(self) -> int:
        return self.synthesizer.rounds

    # --- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The synthesizer's and the source's state and the batch count: with the student's own
        checkpoint, what a resumed loop needs to continue the same stream."""
        return {"synthesizer": self.synthesizer.state_dict(), "source": self.source.state_dict(),
                "batches_read": self.batches_read, "synthesis_seconds": self.synthesis_seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.synthesizer.load_state_dict(state["synthesizer"])
        self.source.load_state_dict(state["source"])
        self.batches_read = state["batches_read"]
        self.synthesis_seconds = state.get("synthesis_seconds", 0.0)


def _all_gather_cat(tensor: Tensor) -> Tensor:
    """Every rank's `tensor` (same shape on each), concatenated in rank order along dim 0: the order
    in which Accelerate slices a dispatched batch across ranks."""
    gathered = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered)


def _trainer_callback_base() -> type:
    try:
        from transformers import TrainerCallback
    except ImportError:  # the class stays importable; using it says what to install
        class TrainerCallback:  # type: ignore[no-redef]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                raise ImportError("SyntheticDataCallback needs transformers: pip install 'accelerate_dfkd[hf]'")
    return TrainerCallback


class SyntheticDataCallback(_trainer_callback_base()):
    """The Trainer side of a SyntheticDataset: checks the Trainer's settings before the first step,
    tells the dataset how many batches make one optimizer step and the LR multiplier, adds the
    synthesis losses to the Trainer's training logs (`synthesis/<term>`, `synthesis/rounds`,
    `time/synthesis_s`), and saves the dataset's state into each Trainer checkpoint
    (`synthetic_dataset_rank<R>.pt`; load it with `dataset.load_state_dict(torch.load(...))`).

    Reporting integrations (`report_to`) run before user callbacks, so they log the Trainer's keys
    only; the synthesis keys reach `trainer.state.log_history`, `trainer_state.json` and the console.
    """

    def __init__(self, dataset: SyntheticDataset) -> None:
        self.dataset = dataset

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Optional[nn.Module] = None,
                       **kwargs: Any) -> None:
        ds = self.dataset
        if args.dataloader_num_workers != 0:
            raise ConfigError(f"dataloader_num_workers={args.dataloader_num_workers}: a SyntheticDataset must be "
                              "read in the training process; set TrainingArguments(dataloader_num_workers=0)")
        if args.per_device_train_batch_size != ds.batch_size:
            raise ConfigError(f"per_device_train_batch_size={args.per_device_train_batch_size} but the "
                              f"SyntheticDataset draws batches of {ds.batch_size}: make them equal, so synthesis "
                              "rounds land on optimizer-step boundaries")
        if model is not None and model is not ds.student:
            raise ConfigError("the SyntheticDataset's student is not the model this Trainer trains: build the "
                              "dataset with the same module you pass as Trainer(model=...), or adversarial "
                              "synthesis plays against a stale copy")
        if model is not None and args.remove_unused_columns:
            # The Trainer drops the keys model.forward does not take. Without pixel_values nothing is
            # left to train on; without teacher_logits only a loss on `labels` (a stock Trainer on a
            # transformers model, with_labels=True) still works.
            accepted = set(inspect.signature(model.forward).parameters)
            if "pixel_values" not in accepted:
                raise ConfigError(f"the Trainer would drop pixel_values ({type(model).__name__}.forward does not take "
                                  "it) from every batch: set TrainingArguments(remove_unused_columns=False)")
            if "teacher_logits" not in accepted:
                warnings.warn("remove_unused_columns=True: the Trainer drops teacher_logits from every batch, so "
                              "only the model's own loss on `labels` can train; a KD loss needs "
                              "remove_unused_columns=False")
        # Under a multi-process Trainer, Accelerate dispatches batches of an IterableDataset from rank 0
        # by default: rank 0 draws world_size batches per micro-step (see the module docstring).
        ds.batches_per_step = args.gradient_accumulation_steps * max(1, args.world_size)
        ds.feedback_world_size = max(1, args.world_size)

    def on_step_end(self, args: Any, state: Any, control: Any, lr_scheduler: Any = None, **kwargs: Any) -> None:
        if lr_scheduler is not None and args.learning_rate > 0:
            self.dataset.lr_scale = lr_scheduler.get_last_lr()[0] / args.learning_rate

    def on_log(self, args: Any, state: Any, control: Any, logs: Optional[dict] = None, **kwargs: Any) -> None:
        if logs is None or "loss" not in logs:  # training logs only, not evaluation metrics
            return
        ds = self.dataset
        extra = {f"synthesis/{k}": round(float(v), 6) for k, v in ds.last_synthesis_losses.items()}
        extra["synthesis/rounds"] = ds.rounds
        extra["time/synthesis_s"] = round(ds.synthesis_seconds, 3)
        logs.update(extra)
        # Trainer.log appended a copy of `logs` to the history before calling the callbacks.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            torch.save(self.dataset.state_dict(), folder / f"synthetic_dataset_rank{args.process_index}.pt")
