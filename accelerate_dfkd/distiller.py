"""The Distiller: one Accelerate loop, readable top to bottom.

    for each student optimizer step:
        every `student_steps_per_round` steps: synthesizer.synthesize(student)   # trains G / z / x
        batch <- source (this rank's own synthetic samples)
        student step on the method's loss hook (gradient accumulation, mixed precision, DDP)
        log / evaluate on real held-out data / checkpoint

Every optimizer step of the run is visible here or inside `synthesize()`; reading the source never
trains anything. Each rank synthesizes its own samples from its own random stream (seed + rank);
generator gradients are averaged across ranks so generators stay identical, and the student is
DDP-wrapped by Accelerate. Facts about this stack that shaped the code are cited as
"environment.md" (../shared/reference/environment.md) and "DESIGN.md fact N".
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from accelerate import Accelerator, DistributedType
from accelerate.logging import get_logger
from safetensors.torch import save_file
from torch import Tensor, nn

from . import checkpointing
from .callbacks import (BestStudentCallback, Callback, CallbackHandler, ImageGridCallback, ProgressCallback,
                        TimingCallback, TrainerState)
from .config import ConfigError, DistillConfig, MethodConfig, flat_dict
from .ema import StudentEMA
from .evaluation import LabeledImages, evaluate_classifier, resolve_input_normalization
from .hooks import has_batchnorm
from .methods import METHODS
from .report import ReportCallback
from .teachers import check_classifier_output
from .synthesis import SynthesisContext, Synthesizer, SyntheticBatch, SyntheticSource
from .utils import logits_of

logger = get_logger(__name__)


def make_accelerator(config: DistillConfig) -> Accelerator:
    """An Accelerator that is really distributed on a GPU-less machine too.

    Without `cpu=True`, ranks started by torchrun or `accelerate launch --multi_gpu` on a machine
    without CUDA silently run alone, each believing it is rank 0 (environment.md section 2).
    `mixed_precision: null` (the default) leaves the choice to the launcher.
    """
    on_cpu = not torch.cuda.is_available()
    # A DeepSpeed launch must not get cpu=True: Accelerate then drops DeepSpeed silently. Without it,
    # DeepSpeed runs on CPU with one process (environment.md 1.3; more processes are broken there).
    deepspeed_launch = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    log_with = None if config.report_to == "none" else config.report_to
    accelerator = Accelerator(cpu=on_cpu and not deepspeed_launch, mixed_precision=config.mixed_precision,
                              gradient_accumulation_steps=config.gradient_accumulation_steps,
                              log_with=log_with, project_dir=config.output_dir)
    precision = str(accelerator.mixed_precision)
    if on_cpu and precision == "fp16":
        warnings.warn("mixed_precision=fp16 has no effect on CPU (Accelerate silently runs fp32 there); "
                      "use a GPU, or bf16 (which runs on CPU but is 10-20x slower without AVX512-BF16/AMX)")
    elif on_cpu and precision == "bf16":
        warnings.warn("mixed_precision=bf16 on CPU runs, but 10-20x slower than fp32 on CPUs without native bf16")
    if accelerator.state.deepspeed_plugin is not None:
        # No DataLoader goes through prepare(), so DeepSpeed cannot infer its micro-batch size.
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = \
            config.per_device_train_batch_size
    return accelerator


def lr_multiplier(config: DistillConfig, step: int) -> float:
    """The student's LR schedule as a multiplier of `learning_rate` at optimizer step `step`.
    The generator follows the same multiplier where its method says so (DFAD decays both)."""
    if config.lr_scheduler == "multistep":
        return config.lr_gamma ** sum(step >= m for m in config.lr_milestones)
    if config.lr_scheduler == "cosine":
        floor = config.lr_min / config.learning_rate
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step, config.max_steps) / config.max_steps))
    return 1.0


class Distiller:
    """Distils `teacher` into `student` with a method's synthetic data, under Accelerate.

    `teacher` and `student` are any nn.Modules returning logits (or an object with `.logits`);
    `eval_data` is the real held-out set (None: no evaluation); `eval_metrics` ({name: metric}:
    torchmetrics metrics, `evaluate` modules, see evaluation.evaluate_classifier) are logged as
    eval/<name> next to the built-in eval/top1 and eval/top5. `train()` returns the results dict
    that is also written to OUTPUT_DIR/results.json.
    """

    def __init__(self, config: DistillConfig, method_config: MethodConfig, *, teacher: nn.Module,
                 student: nn.Module, eval_data: Optional[LabeledImages] = None,
                 callbacks: Sequence[Callback] = (), accelerator: Optional[Accelerator] = None,
                 eval_metrics: Optional[dict[str, Any]] = None) -> None:
        self.config, self.method_config = config, method_config
        self.output_dir = Path(config.output_dir)
        self.accelerator = accelerator or make_accelerator(config)
        self.eval_data = eval_data
        self.eval_metrics = dict(eval_metrics or {})
        self._last_scores: dict[str, float] = {}  # of the last _top1() call: top1, top5, eval_metrics
        self._teacher_scores: dict[str, float] = {}
        self.synthesizer_class = METHODS[config.method]
        if not isinstance(method_config, self.synthesizer_class.config_class):
            raise ConfigError(f"method {config.method!r} needs a {self.synthesizer_class.config_class.__name__}, "
                              f"got {type(method_config).__name__}")
        image_shape = (config.in_channels, config.image_size, config.image_size)
        check_classifier_output(teacher, "teacher", image_shape, config.num_classes, task=config.task)
        check_classifier_output(student, "student", image_shape, config.num_classes, task=config.task)
        # The headline metric: top-1 (classification) or mean IoU (segmentation), logged as eval/<metric> and
        # written as <who>_<metric> in results.json; the TrainerState fields *_top1 hold it, whichever it is.
        self.metric = "top1" if config.task == "classification" else "miou"
        if eval_data is not None and (eval_data.labels.dim() == 3) != (config.task == "segmentation"):
            raise ConfigError(f"eval set {eval_data.name} has labels of shape {tuple(eval_data.labels.shape[1:])} per "
                              f"item, which does not fit task={config.task}: per-pixel labels go with segmentation, "
                              "one class per image with classification; choose another eval_dataset or task")
        if method_config.warmup_rounds < 0:
            raise ConfigError(f"warmup_rounds must be >= 0 (0: no warm-up), got {method_config.warmup_rounds}")
        if self.synthesizer_class.needs_batchnorm_teacher and not has_batchnorm(teacher):
            raise ConfigError(f"method {config.method!r} matches the teacher's BatchNorm statistics, but "
                              f"{type(teacher).__name__} has no BatchNorm2d layer: use a teacher with BatchNorm, "
                              "or a method without a BN-statistics term (e.g. dfad)")

        acc = self.accelerator
        # Frozen and never wrapped: no DDP, no optimizer, not part of save_state (DESIGN.md fact 4).
        self.teacher = teacher.eval().requires_grad_(False).to(acc.device)
        # Same seed on every rank: identical generator initialisation (its gradients are averaged).
        torch.manual_seed(config.seed)
        # The teacher's input normalisation (recipe > the teacher's declared one > the eval set's), for
        # methods that make [0, 1] images; None when unknown.
        normalization = resolve_input_normalization(config.image_mean, config.image_std, teacher, eval_data)
        mean, std = normalization or (None, None)
        self.synthesizer: Synthesizer = self.synthesizer_class(
            method_config, self.teacher, image_shape=image_shape, num_classes=config.num_classes,
            context=SynthesisContext.from_accelerator(acc, config.seed, image_mean=mean, image_std=std),
            task=config.task)
        self.source: SyntheticSource = self.synthesizer.build_source(config.per_device_train_batch_size)
        if config.channels_last:
            self.synthesizer.to_channels_last()

        optimizer = torch.optim.SGD(student.parameters(), lr=config.learning_rate, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
        # Not prepared: a prepared scheduler steps once per process per call; ours steps once per
        # optimizer step. Registered so that save_state/load_state carry it.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(config, step))
        if config.student_ema_decay is not None:
            self._check_ema_supported()  # before prepare(), which would shard the weights
        self.student, self.optimizer = acc.prepare(student, optimizer)
        acc.register_for_checkpointing(self.scheduler)
        self.ema: Optional[StudentEMA] = None
        if config.student_ema_decay is not None:
            self.ema = StudentEMA(acc.unwrap_model(self.student), config.student_ema_decay)

        self.state = TrainerState(max_steps=config.max_steps, output_dir=self.output_dir,
                                  is_main_process=acc.is_main_process, device=acc.device)
        builtins: list[Callback] = [TimingCallback(), BestStudentCallback(f"eval/{self.metric}")]
        if config.progress_bar:
            builtins.append(ProgressCallback(every=config.logging_steps or 10))
        if config.image_grid_rounds:
            builtins.append(ImageGridCallback(config.image_grid_rounds, upscale=max(1, 64 // config.image_size)))
        if config.write_report:  # OUTPUT_DIR/report.md; `accelerate-dfkd report DIR` writes it later
            builtins.append(ReportCallback(acc, upscale=max(1, 64 // config.image_size)))
        self.callbacks = CallbackHandler([*builtins, *callbacks])
        self._last_synthesis_losses: dict[str, Tensor] = {}
        self._last_online_top1: Optional[float] = None

    # ------------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        cfg, acc, state = self.config, self.accelerator, self.state
        resume = self._prepare_output_dir()
        if self.eval_data is not None:
            state.teacher_top1 = self._top1(self.teacher)
            self._teacher_scores = dict(self._last_scores)
        if resume is not None:
            self._load(resume)
        if cfg.report_to != "none":
            acc.init_trackers("accelerate_dfkd", config=flat_dict(cfg, self.method_config))
        self.callbacks.on_train_start(state)

        batches = iter(self.source)
        # Warm-up: synthesis rounds without student steps (FastDFKD). Checkpoints are only written after
        # student steps, so a resumed run is always past its warm-up.
        while state.global_step == 0 and state.rounds < self.method_config.warmup_rounds:
            self._synthesis_round()
        while state.global_step < cfg.max_steps:
            if state.global_step % self.method_config.student_steps_per_round == 0:
                self._synthesis_round()
            losses = self._student_step(batches)
            state.global_step += 1
            self.callbacks.on_step_end(state, losses)
            self._maybe_log(losses)
            if cfg.eval_steps and state.global_step % cfg.eval_steps == 0 and state.global_step < cfg.max_steps:
                self._evaluate()
            if cfg.save_steps and state.global_step % cfg.save_steps == 0 and state.global_step < cfg.max_steps:
                self._save()

        final_top1 = self._evaluate() if self.eval_data is not None else None
        self._save()
        results = self._results(final_top1)
        self._write_outputs(results)
        self.callbacks.on_train_end(state, results)
        # Ranks leave together, and the process group dies here rather than at interpreter exit.
        # DDP's reducer holds a reference to the gloo group, so destroy_process_group alone leaves
        # it alive; finalizing it during interpreter shutdown aborted a rank now and then in CI
        # ("terminate called without an active exception", pytorch/pytorch#179291). Unwrapping
        # the student and dropping Accelerate's references first lets the group die while Python
        # is still whole.
        acc.wait_for_everyone()
        self.student = acc.unwrap_model(self.student)
        acc.free_memory()
        acc.end_training()
        return results

    # --- the two kinds of step -----------------------------------------------------------------
    def _synthesis_round(self) -> None:
        self.callbacks.on_synthesis_start(self.state)
        student = self.accelerator.unwrap_model(self.student)  # no DDP all-reduce for a frozen student
        output = self.synthesizer.synthesize(student, lr_scale=lr_multiplier(self.config, self.state.global_step))
        self.state.rounds += 1
        self._last_synthesis_losses = output.losses
        self.callbacks.on_synthesis_end(self.state, output)

    def _student_step(self, batches: Iterator[SyntheticBatch]) -> dict[str, Tensor]:
        """One optimizer step of the student over `gradient_accumulation_steps` micro-batches. The
        synthesis round before it ran once, on the step boundary, so accumulation never drops or
        repeats a generator step (DESIGN.md fact 2)."""
        acc, cfg = self.accelerator, self.config
        self.callbacks.on_step_start(self.state)
        self.student.train()
        totals: dict[str, Tensor] = {}
        for _ in range(cfg.gradient_accumulation_steps):
            batch = next(batches).to(acc.device)
            with acc.accumulate(self.student):
                with acc.autocast(), self.synthesizer.student_step_hooks(self.teacher, acc.unwrap_model(self.student)):
                    with torch.no_grad():
                        teacher_logits = logits_of(self.teacher(batch.images))
                    student_logits = logits_of(self.student(batch.images))
                    terms = self.synthesizer.student_losses(student_logits, teacher_logits, batch)
                acc.backward(sum(terms.values()))
                # Feedback from this micro-batch to the method's data (SSD-KD: replay priorities).
                self.synthesizer.after_student_step(batch, student_logits.detach(), teacher_logits.detach())
                if cfg.max_grad_norm and acc.sync_gradients:
                    acc.clip_grad_norm_(self.student.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            for key, value in terms.items():
                totals[key] = totals.get(key, 0) + value.detach() / cfg.gradient_accumulation_steps
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(acc.unwrap_model(self.student))
        return totals

    def _check_ema_supported(self) -> None:
        acc = self.accelerator
        plugin = acc.state.deepspeed_plugin
        zero_stage = plugin.deepspeed_config.get("zero_optimization", {}).get("stage") if plugin is not None else None
        sharded = acc.distributed_type == DistributedType.FSDP or zero_stage == 3
        if sharded:
            raise ConfigError("student_ema_decay needs the student's full weights on every process, but FSDP and "
                              "DeepSpeed ZeRO-3 shard them: use DDP or ZeRO stage 1/2, or drop student_ema_decay")

    def delivered_student(self) -> nn.Module:
        """The student a run evaluates and saves: the weight average with `student_ema_decay`, else the
        online student."""
        return self.ema.module if self.ema is not None else self.accelerator.unwrap_model(self.student)

    # --- evaluation, logging --------------------------------------------------------------------
    def _top1(self, model: nn.Module) -> float:
        """Top-1 of `model`; every score (top5, eval_metrics) is kept in `_last_scores`."""
        acc = self.accelerator
        self._last_scores = evaluate_classifier(
            model, self.eval_data, num_classes=self.config.num_classes,
            batch_size=self.config.per_device_eval_batch_size, device=acc.device,
            process_index=acc.process_index, num_processes=acc.num_processes, metrics=self.eval_metrics)
        return self._last_scores[self.metric]

    def _average_buffers(self, include_synthesizer: bool = False) -> None:
        """Average BatchNorm running statistics over ranks. DDP broadcasts rank 0's buffers before
        each forward, then every rank updates them on its own batch (and each rank's generator on
        its own latents), so they drift apart; evaluating and saving the average gives one student
        (and one generator) everywhere. A no-op in a single process."""
        if self.accelerator.num_processes <= 1:
            return
        modules = [self.accelerator.unwrap_model(self.student)]
        if self.ema is not None:
            modules.append(self.ema.module)
        if include_synthesizer:
            modules += list(self.synthesizer.modules().values())
        for module in modules:
            for buf in module.buffers():
                if buf.is_floating_point():
                    dist.all_reduce(buf)
                    buf /= self.accelerator.num_processes

    def _evaluate(self) -> Optional[float]:
        if self.eval_data is None:
            return None
        self._average_buffers()
        online_top1 = self._top1(self.accelerator.unwrap_model(self.student)) if self.ema is not None else None
        student = self.delivered_student()
        top1 = self._top1(student)  # last, so that _last_scores are the delivered student's
        self.state.eval_history.append((self.state.global_step, top1))
        # PRE-DFKD's robustness metrics, running: a user without a validation set gets the final
        # value, so the spread over training is logged next to it, not only the maximum.
        history = [value for _, value in self.state.eval_history]
        m = self.metric
        metrics = {f"eval/{m}": top1, f"eval/best_{m}": max(history), f"eval/mean_{m}": statistics.fmean(history),
                   f"eval/var_{m}": statistics.pvariance(history)}
        metrics.update({f"eval/{name}": value for name, value in self._last_scores.items() if name != m})
        if online_top1 is not None:  # what the EMA is worth, measured in the same evaluation
            metrics[f"eval/online_{m}"] = online_top1
            self._last_online_top1 = online_top1
        self.callbacks.on_evaluate(self.state, metrics, student=student)
        self._log_scalars(metrics)
        return top1

    def _maybe_log(self, losses: dict[str, Tensor]) -> None:
        step = self.state.global_step
        if not self.config.logging_steps or step % self.config.logging_steps:
            return
        scalars = {f"student/{k}": float(v) for k, v in losses.items()}  # the only host syncs: every N steps
        scalars.update({f"synthesis/{k}": float(v) for k, v in self._last_synthesis_losses.items()})
        scalars["train/lr"] = self.scheduler.get_last_lr()[0]
        scalars["time/synthesis_s"] = self.state.synthesis_seconds
        scalars["time/distill_s"] = self.state.distill_seconds
        self._log_scalars(scalars)

    def _log_scalars(self, scalars: dict[str, float]) -> None:
        if self.config.report_to != "none":
            self.accelerator.log(scalars, step=self.state.global_step)
        if self.accelerator.is_main_process:
            with open(self.output_dir / "log.jsonl", "a") as fh:
                fh.write(json.dumps({"step": self.state.global_step, **scalars}) + "\n")

    # --- checkpoints, outputs -------------------------------------------------------------------
    def _prepare_output_dir(self) -> Optional[Path]:
        """Decide between a fresh start and a resume before anything is written, so a bad
        `--resume_from_checkpoint` or a clash with an earlier run loses nothing."""
        cfg, acc = self.config, self.accelerator
        resume = None
        if cfg.resume_from_checkpoint:
            resume = checkpointing.resolve_resume(cfg.resume_from_checkpoint, self.output_dir)
            if resume is None:
                logger.warning(f"no checkpoint in {self.output_dir} yet: starting from step 0", main_process_only=True)
        previous = checkpointing.list_checkpoints(self.output_dir / "checkpoints")
        if resume is None and (previous or (self.output_dir / "results.json").exists()):
            if not cfg.overwrite_output_dir:
                raise ConfigError(
                    f"output_dir {self.output_dir} already holds a run. Resume it with --resume_from_checkpoint "
                    "latest, choose another --output_dir, or pass --overwrite_output_dir true to replace it")
            acc.wait_for_everyone()
            if acc.is_main_process:
                shutil.rmtree(self.output_dir / "checkpoints", ignore_errors=True)
                for name in ("results.json", "log.jsonl", "student.safetensors", "student_online.safetensors",
                             "best_student.safetensors", "report.md"):
                    (self.output_dir / name).unlink(missing_ok=True)
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        return resume

    def _save(self) -> None:
        self._average_buffers(include_synthesizer=True)
        rank_state = {"synthesizer": self.synthesizer.state_dict(), "source": self.source.state_dict()}
        if self.ema is not None:
            rank_state["student_ema"] = self.ema.state_dict()
        path = checkpointing.save_checkpoint(self.accelerator, self.output_dir / "checkpoints", self.state.global_step,
                                             rank_state, self.state.to_json(), self.config.save_total_limit)
        self.callbacks.on_save(self.state, path)

    def _load(self, checkpoint: Path) -> None:
        rank_state, trainer_state = checkpointing.load_checkpoint(self.accelerator, checkpoint)
        self.synthesizer.load_state_dict(rank_state["synthesizer"])
        self.source.load_state_dict(rank_state["source"])
        if self.ema is not None and "student_ema" in rank_state:
            self.ema.load_state_dict(rank_state["student_ema"])
        elif self.ema is not None:
            # A run that turns the EMA on when resuming: the average starts from the resumed student.
            self.ema = StudentEMA(self.accelerator.unwrap_model(self.student), self.ema.decay)
            logger.warning(f"{checkpoint} has no student EMA: it starts from the resumed student", main_process_only=True)
        elif "student_ema" in rank_state:
            logger.warning(f"{checkpoint} holds a student EMA but this run has no student_ema_decay: the average is "
                           "dropped and the online student is delivered", main_process_only=True)
        teacher_top1 = self.state.teacher_top1
        self.state.load_json(trainer_state)
        self.state.teacher_top1 = teacher_top1 if teacher_top1 is not None else self.state.teacher_top1
        logger.info(f"resumed from {checkpoint} at step {self.state.global_step}", main_process_only=True)

    def _results(self, final_top1: Optional[float]) -> dict[str, Any]:
        state, acc = self.state, self.accelerator
        history = [top1 for _, top1 in state.eval_history]
        times = torch.tensor([state.synthesis_seconds, state.distill_seconds], device=acc.device)
        times = acc.reduce(times, reduction="mean") if acc.num_processes > 1 else times
        m = self.metric  # top1 or miou: the keys say which
        return {
            "method": self.config.method,
            "teacher": self.config.teacher,
            "student": self.config.student,
            "metric": m,
            f"teacher_{m}": state.teacher_top1,
            f"student_{m}": final_top1,
            # with student_ema_decay: the online (not averaged) student's final score, for comparison
            f"online_student_{m}": self._last_online_top1 if self.ema is not None and final_top1 is not None else None,
            f"best_student_{m}": state.best_top1,
            "best_step": state.best_step,
            f"mean_student_{m}": statistics.fmean(history) if history else None,
            f"var_student_{m}": statistics.pvariance(history) if len(history) > 1 else None,
            "student_over_teacher": (final_top1 / state.teacher_top1
                                     if final_top1 is not None and state.teacher_top1 else None),
            "steps": state.global_step,
            "synthesis_rounds": state.rounds,
            "world_size": acc.num_processes,
            "distributed_type": str(acc.distributed_type.value),  # e.g. MULTI_CPU, MULTI_GPU, DEEPSPEED
            "synthesis_seconds": float(times[0]),
            "distill_seconds": float(times[1]),
            "wall_seconds": state.wall_seconds,  # the main process's (results.json is written by it)
            "eval_history": state.eval_history,
            # every score of the teacher and of the final student: top1, top5, eval_metrics
            "teacher_scores": self._teacher_scores,
            "student_scores": self._last_scores if final_top1 is not None else {},
            "config": {**asdict(self.config), **asdict(self.method_config)},
        }

    def _write_outputs(self, results: dict[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        delivered = {"student.safetensors": self.delivered_student()}
        if self.ema is not None:
            delivered["student_online.safetensors"] = self.accelerator.unwrap_model(self.student)
        for name, model in delivered.items():
            tmp = self.output_dir / f".{name}.tmp"
            save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
            tmp.replace(self.output_dir / name)
        from .utils import atomic_write_bytes

        atomic_write_bytes(self.output_dir / "results.json", json.dumps(results, indent=2).encode())
