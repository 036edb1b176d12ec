"""`accelerate-dfkd RECIPE.yaml [--key value ...]`: recipe + overrides -> models -> Distiller.train().

Also `python -m accelerate_dfkd` and `accelerate launch -m accelerate_dfkd`. Every error about the
input (a mistyped key, a teacher that does not match its checkpoint, a missing data set, a resume
path with no checkpoint) is reported as one line naming the fix, with exit code 2, before anything
is written.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from .config import ConfigError, DistillConfig, describe_keys, load_recipe, parse_overrides

USAGE = """usage: accelerate-dfkd RECIPE.yaml [--key value ...]
       accelerate launch [launch args] -m accelerate_dfkd RECIPE.yaml [--key value ...]
       accelerate-dfkd --help-keys [--method NAME]    list every recipe key and its default
       accelerate-dfkd train-teacher RECIPE.yaml [--key value ...]   train a teacher on real data
       accelerate-dfkd report OUTPUT_DIR     rewrite OUTPUT_DIR/report.md from results.json + log.jsonl
       accelerate-dfkd synthesize RECIPE.yaml --num_images N --output PATH [--format disk|parquet]
                                             export a synthetic set as a `datasets` dataset (see --from_checkpoint)

Recipes: recipes/<dataset>/<method>.yaml. Any recipe key can be overridden on the command line,
e.g. --max_steps 20 --output_dir runs/x --seed 1 --resume_from_checkpoint latest."""


def run(recipe: Optional[str], overrides: dict[str, str]) -> dict:
    import torch

    from .distiller import Distiller
    from .evaluation import load_eval_set, resolve_input_normalization
    from .methods import METHODS
    from .teachers import load_student, load_teacher

    config, method_config = load_recipe(recipe, overrides)
    # Cheap checks first: nothing is trained, loaded or written before the input is known good.
    METHODS[config.method].check_image_shape(method_config, (config.in_channels, config.image_size, config.image_size))
    if config.resume_from_checkpoint and config.resume_from_checkpoint != "latest":
        from .checkpointing import resolve_resume

        resolve_resume(config.resume_from_checkpoint, Path(config.output_dir))
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    # Models are built before the Accelerator exists, from the same seed on every rank.
    # The built-in digits teacher is trained once and cached; in a multi-process launch the
    # ranks race to build it, which the atomic cache write makes harmless.
    resolve_input_normalization(config.image_mean, config.image_std)  # both or neither, before any loading
    eval_data = load_eval_set(config.eval_dataset, config.image_size, config.data_dir, in_channels=config.in_channels,
                              mean=config.image_mean, std=config.image_std, max_samples=config.eval_max_samples)
    torch.manual_seed(config.seed)
    shape = dict(num_classes=config.num_classes, in_channels=config.in_channels, image_size=config.image_size,
                 task=config.task)
    teacher = load_teacher(config.teacher, config.teacher_checkpoint, **shape)
    # Real images go to the teacher's input space: the recipe's image_mean/image_std, else the one the
    # teacher states (a transformers image processor's), else the eval set's default. The Distiller
    # resolves the same (mean, std) from these three and hands it to the synthesizer.
    normalization = resolve_input_normalization(config.image_mean, config.image_std, teacher, eval_data)
    if eval_data is not None and normalization is not None:
        eval_data = eval_data.renormalized(*normalization)
    torch.manual_seed(config.seed)
    student = load_student(config.student, config.student_checkpoint, **shape)
    distiller = Distiller(config, method_config, teacher=teacher, student=student, eval_data=eval_data)
    results = distiller.train()
    if distiller.accelerator.is_main_process and hasattr(student, "save_pretrained"):
        # a transformers student also as a from_pretrained folder, its image processor set to the
        # input space it learned in (the teacher's normalisation; integrations/hf_models.py)
        mean, std = normalization or (None, None)
        student.save_pretrained(Path(config.output_dir) / "student_hf", image_mean=mean, image_std=std,
                                image_size=config.image_size)
    if distiller.accelerator.is_main_process:
        m = results["metric"]  # top1, or miou for segmentation
        keys = ("method", f"teacher_{m}", f"student_{m}", f"best_student_{m}", "steps", "world_size",
                "synthesis_seconds", "distill_seconds")
        print("results: " + ", ".join(f"{k}={results[k]:.2f}" if isinstance(results[k], float) else f"{k}={results[k]}"
                                      for k in keys), flush=True)
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file is noise
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    try:
        if argv[0] == "--help-keys":
            from .methods import METHODS

            method = parse_overrides(argv[1:]).get("method", DistillConfig.method)
            if method not in METHODS:
                raise ConfigError(f"unknown method {method!r}; known: {sorted(METHODS)}")
            print(describe_keys(METHODS[method].config_class))
            return 0
        if argv[0] == "train-teacher":
            from .train_teacher import main as train_teacher_main

            argv = argv[1:]
            recipe, rest = (argv[0], argv[1:]) if argv and not argv[0].startswith("--") else (None, argv)
            train_teacher_main(recipe, parse_overrides(rest))
            return 0
        if argv[0] == "synthesize":
            from .integrations.datasets_io import synthesize_command

            argv = argv[1:]
            recipe, rest = (argv[0], argv[1:]) if argv and not argv[0].startswith("--") else (None, argv)
            synthesize_command(recipe, parse_overrides(rest))
            return 0
        if argv[0] == "report":
            from .report import write_report

            if len(argv) != 2:
                raise ConfigError("usage: accelerate-dfkd report OUTPUT_DIR (the folder of a finished run)")
            print(write_report(argv[1]))
            return 0
        recipe, rest = (argv[0], argv[1:]) if not argv[0].startswith("--") else (None, argv)
        run(recipe, parse_overrides(rest))
    except (ConfigError, FileNotFoundError) as err:
        rank = os.environ.get("RANK", "0")
        if rank == "0":
            print(f"accelerate-dfkd: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
