#!/usr/bin/env python
"""DFAD throughput benchmark: synthesis and distillation speed of the library's own code paths.

For each teacher -> student pair this builds the real objects (``build_model``, ``DFAD``,
``SynthesisContext``, ``DFAD.build_source``) and times DFAD rounds. One round is what the
Distiller runs between two synthesis boundaries:

* ``synth.synthesize(student)``: ``cfg.generator_steps`` (1) generator optimisation steps
  (generator forward, teacher and student forwards, adversarial loss, backward, Adam step);
* ``cfg.student_steps_per_round`` (5) student steps, each as ``Distiller._student_step`` does it
  without Accelerate: draw a batch from the generator source, teacher forward under ``no_grad``,
  student forward, ``synth.student_losses``, backward, SGD step.

Every timed region starts and ends with ``accelerate_dfkd.utils.synchronize(device)`` before the
clock is read (``time.perf_counter``); nothing inside calls ``.item()``. After ``--warmup`` rounds,
``--steps`` rounds are timed and the medians over rounds are reported:

* synthesis image-steps/s = batch * generator_steps / median synthesis seconds;
* distillation samples/s  = batch / median seconds per student step (batch drawing and teacher
  forward included);
* ms per DFAD round       = median wall time of a whole round (synthesis + student steps);
* peak memory             = CUDA: ``torch.cuda.max_memory_allocated`` (reset before each row);
                            CPU: increase of the process's ``ru_maxrss`` over the row (process-wide).

Teacher and student keep their random initial weights: throughput does not depend on them.

Examples::

    python benchmarks/dfad_throughput.py                                  # digits + mnist, CPU
    python benchmarks/dfad_throughput.py --device cuda --pairs digits,mnist,cifar \
        --batch_size 256 --precision bf16
    python benchmarks/dfad_throughput.py --teacher wrn40_2 --student wrn16_1 --image_size 32 \
        --channels 3 --nz 256 --ngf 64
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

# name -> the models and generator of one row (images are channels x image_size x image_size)
PRESETS: dict[str, dict[str, Any]] = {
    "digits": dict(teacher="digits_cnn", student="digits_cnn_half", generator="generator_a",
                   channels=1, image_size=8, nz=100, ngf=32),  # recipes/digits/dfad.yaml
    "mnist": dict(teacher="lenet5", student="lenet5_half", generator="generator_a",
                  channels=1, image_size=32, nz=100, ngf=64),
    "cifar": dict(teacher="resnet34_8x", student="resnet18_8x", generator="generator_a",
                  channels=3, image_size=32, nz=256, ngf=64),
}
DEFAULT_PAIRS = "digits,mnist"
NUM_CLASSES = 10
# Options that only describe a custom row.
CUSTOM_OPTIONS = ("teacher", "student", "generator", "image_size", "channels", "nz", "ngf")
CUSTOM_DEFAULTS = dict(generator="generator_a", image_size=32, channels=3, nz=256, ngf=64)


# --------------------------------------------------------------------------------------------
# the library, imported with retries (another engineer may be editing it while this runs)
# --------------------------------------------------------------------------------------------
def import_library(retries: int, wait_s: float) -> SimpleNamespace:
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    attempt = 0
    while True:
        try:
            from accelerate_dfkd.config import ConfigError
            from accelerate_dfkd.methods.dfad import DFAD, DFADConfig
            from accelerate_dfkd.models import build_model
            from accelerate_dfkd.synthesis import SynthesisContext
            from accelerate_dfkd.utils import logits_of, synchronize
            import accelerate_dfkd
        except Exception as err:  # ImportError, SyntaxError, NameError ... of a half-edited file
            attempt += 1
            if attempt > retries:
                sys.exit(f"error: cannot import accelerate_dfkd after {retries} retries: "
                         f"{type(err).__name__}: {err}")
            print(f"accelerate_dfkd import failed ({type(err).__name__}: {err}); the package may be "
                  f"mid-edit, retrying in {wait_s:.0f} s ({attempt}/{retries})", file=sys.stderr, flush=True)
            for name in [m for m in sys.modules if m == "accelerate_dfkd" or m.startswith("accelerate_dfkd.")]:
                del sys.modules[name]
            time.sleep(wait_s)
            continue
        return SimpleNamespace(DFAD=DFAD, DFADConfig=DFADConfig, build_model=build_model,
                               SynthesisContext=SynthesisContext, logits_of=logits_of,
                               synchronize=synchronize, ConfigError=ConfigError,
                               version=getattr(accelerate_dfkd, "__version__", "?"))


# --------------------------------------------------------------------------------------------
# machine description
# --------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} logical CPUs)"


def maxrss_mib() -> float:
    """The process's peak resident set size so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


# --------------------------------------------------------------------------------------------
# one row
# --------------------------------------------------------------------------------------------
def pair_label(name: str, spec: dict[str, Any]) -> str:
    label = (f"{name}: {spec['teacher']} -> {spec['student']} "
             f"({spec['channels']}x{spec['image_size']}x{spec['image_size']}")
    if name == "custom":
        label += f", {spec['generator']} nz {spec['nz']} ngf {spec['ngf']}"
    return label + ")"


def bench_pair(lib: SimpleNamespace, name: str, spec: dict[str, Any], args: argparse.Namespace,
               device: torch.device, layout: str = "contiguous") -> dict[str, Any]:
    B, C, S = args.batch_size, spec["channels"], spec["image_size"]
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = maxrss_mib()
    torch.manual_seed(args.seed)

    try:
        teacher = lib.build_model(spec["teacher"], num_classes=NUM_CLASSES, in_channels=C)
        teacher = teacher.to(device).eval().requires_grad_(False)
        student = lib.build_model(spec["student"], num_classes=NUM_CLASSES, in_channels=C).to(device)
        ctx = lib.SynthesisContext(device=device, mixed_precision=args.precision, seed=args.seed)
        cfg = lib.DFADConfig(generator=spec["generator"], nz=spec["nz"], ngf=spec["ngf"],
                             per_device_synthesis_batch_size=B)
        cfg.validate()
        synth = lib.DFAD(cfg, teacher, image_shape=(C, S, S), num_classes=NUM_CLASSES, context=ctx)
    except (ValueError, lib.ConfigError) as err:
        sys.exit(f"error: pair {pair_label(name, spec)!r}: {err}")

    if layout == "channels_last":  # what the Distiller does for `channels_last: true`
        synth.to_channels_last()
    batches = iter(synth.build_source(B))
    # The Distiller's student optimizer (DistillConfig defaults: lr 0.1, momentum 0.9, wd 5e-4).
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    # fp16 on CUDA: Accelerate scales the student's loss with a GradScaler; do the same.
    scaler = torch.amp.GradScaler("cuda") if (args.precision == "fp16" and device.type == "cuda") else None
    k = cfg.student_steps_per_round
    sync, logits_of = lib.synchronize, lib.logits_of
    last: dict[str, Any] = {}

    def student_step() -> None:
        # Distiller._student_step, without Accelerate (no accumulation, no clipping, no DDP).
        batch = next(batches).to(device)
        with ctx.autocast():
            with torch.no_grad():
                teacher_logits = logits_of(teacher(batch.images))
            student_logits = logits_of(student(batch.images))
        loss = sum(synth.student_losses(student_logits, teacher_logits, batch).values())
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        last["student_loss"] = loss.detach()

    def one_round() -> tuple[float, float, float]:
        student.train()
        sync(device)
        t0 = time.perf_counter()
        out = synth.synthesize(student)
        sync(device)
        t1 = time.perf_counter()
        for _ in range(k):
            student_step()
        sync(device)
        t2 = time.perf_counter()
        last["synthesis_losses"] = out.losses
        return t1 - t0, (t2 - t1) / k, t2 - t0

    for _ in range(args.warmup):
        one_round()
    synth_s, step_s, round_s = [], [], []
    for _ in range(args.steps):
        a, b, c = one_round()
        synth_s.append(a)
        step_s.append(b)
        round_s.append(c)

    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        peak_kind = "cuda_max_memory_allocated"
    else:
        peak = max(0.0, maxrss_mib() - rss_before)
        peak_kind = "process_maxrss_increase"

    # Sanity check outside the timed region: the losses of the last round are finite.
    final = {"student": float(last["student_loss"])}
    final.update({f"generator_{key}": float(v) for key, v in last["synthesis_losses"].items()})
    finite = all(v == v and abs(v) != float("inf") for v in final.values())
    if not finite:
        print(f"warning: non-finite loss in pair {name}: {final}", file=sys.stderr)

    med_synth, med_step, med_round = (statistics.median(x) for x in (synth_s, step_s, round_s))
    row = {
        "pair": pair_label(name, spec),
        "preset": name,
        **spec,
        "device": device.type,
        "memory_format": layout,
        "precision": args.precision,
        "effective_precision": effective_precision(args.precision, device),
        "batch": B,
        "generator_steps_per_round": cfg.generator_steps,
        "student_steps_per_round": k,
        "warmup_rounds": args.warmup,
        "timed_rounds": args.steps,
        "synthesis_image_steps_per_s": B * cfg.generator_steps / med_synth,
        "distillation_samples_per_s": B / med_step,
        "ms_per_round": med_round * 1e3,
        "median_synthesis_ms": med_synth * 1e3,
        "median_student_step_ms": med_step * 1e3,
        "min_synthesis_ms": min(synth_s) * 1e3,
        "min_student_step_ms": min(step_s) * 1e3,
        "min_round_ms": min(round_s) * 1e3,
        "peak_memory_mib": peak,
        "peak_memory_kind": peak_kind,
        "synthesis_ms": [x * 1e3 for x in synth_s],
        "student_step_ms": [x * 1e3 for x in step_s],
        "round_ms": [x * 1e3 for x in round_s],
        "final_losses": final,
        "losses_finite": finite,
    }
    return row


def effective_precision(precision: str, device: torch.device) -> str:
    if precision == "fp16" and device.type == "cpu":
        return "no"  # SynthesisContext.autocast() is a null context: fp32
    return precision


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------
def markdown_table(rows: list[dict[str, Any]], device: torch.device) -> str:
    mem_header = "peak CUDA mem (MiB)" if device.type == "cuda" else "peak RSS increase (MiB)*"
    headers = ["pair", "device", "memory format", "precision", "batch", "synthesis image-steps/s",
               "distillation samples/s", "ms / DFAD round (1 G + 5 S)", mem_header]
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join(["---"] * 5 + ["---:"] * 4) + "|"]
    for r in rows:
        precision = r["precision"]
        if r["effective_precision"] != precision:
            precision += " (ignored: fp32)"
        cells = [r["pair"], r["device"], r["memory_format"], precision, str(r["batch"]),
                 f"{r['synthesis_image_steps_per_s']:,.0f}", f"{r['distillation_samples_per_s']:,.0f}",
                 f"{r['ms_per_round']:,.1f}", f"{r['peak_memory_mib']:,.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--pairs", default=None,
                   help=f"comma-separated presets out of {','.join(PRESETS)} (default {DEFAULT_PAIRS}; "
                        "with --teacher/--student only the custom row unless --pairs is given)")
    g = p.add_argument_group("custom pair (one extra row; needs --teacher and --student)")
    g.add_argument("--teacher")
    g.add_argument("--student")
    g.add_argument("--generator", help=f"default {CUSTOM_DEFAULTS['generator']}")
    g.add_argument("--image_size", type=int, help=f"default {CUSTOM_DEFAULTS['image_size']}")
    g.add_argument("--channels", type=int, help=f"default {CUSTOM_DEFAULTS['channels']}")
    g.add_argument("--nz", type=int, help=f"default {CUSTOM_DEFAULTS['nz']}")
    g.add_argument("--ngf", type=int, help=f"default {CUSTOM_DEFAULTS['ngf']}")
    p.add_argument("--batch_size", type=int, default=256,
                   help="synthesis and student batch per step (default 256, DFAD_cifar.py)")
    p.add_argument("--steps", type=int, default=20, help="timed DFAD rounds (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--precision", choices=("no", "bf16", "fp16"), default="no")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory_format", choices=("contiguous", "channels_last", "both"), default="contiguous",
                   help="teacher and generator layout (DistillConfig.channels_last); 'both': two rows per pair, "
                        "side by side in one run")
    p.add_argument("--json", metavar="PATH", help="also write the rows (and the header) as JSON")
    p.add_argument("--import_retries", type=int, default=3,
                   help="retries when importing accelerate_dfkd fails (default 3)")
    p.add_argument("--import_wait", type=float, default=60.0, help="seconds between retries (default 60)")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
        p.error("--batch_size and --steps must be positive, --warmup non-negative")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be positive")
    return args


def select_pairs(args: argparse.Namespace, parser_error: Callable[[str], None]) -> list[tuple[str, dict]]:
    custom_given = [o for o in CUSTOM_OPTIONS if getattr(args, o) is not None]
    pairs: list[tuple[str, dict]] = []
    if args.pairs is not None or not custom_given:
        for name in (args.pairs or DEFAULT_PAIRS).split(","):
            name = name.strip().lower()
            if not name:
                continue
            if name not in PRESETS:
                parser_error(f"unknown pair {name!r}; known: {', '.join(PRESETS)}")
            pairs.append((name, dict(PRESETS[name])))
    if custom_given:
        if args.teacher is None or args.student is None:
            options = " ".join(f"--{o}" for o in custom_given)
            parser_error(f"{options}: these options describe a custom pair; pass --teacher and --student too")
        spec = {o: getattr(args, o) for o in CUSTOM_OPTIONS}
        for key, value in CUSTOM_DEFAULTS.items():
            if spec[key] is None:
                spec[key] = value
        pairs.append(("custom", spec))
    if not pairs:
        parser_error("no pair selected")
    return pairs


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)

    def fail(message: str) -> None:
        sys.exit(f"error: {message}")

    pairs = select_pairs(args, fail)
    if args.device == "cuda" and not torch.cuda.is_available():
        fail(f"--device cuda, but CUDA is not available in this torch build ({torch.__version__}) "
             "or no GPU is visible; run with --device cpu")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    lib = import_library(args.import_retries, args.import_wait)

    notes = []
    if device.type == "cpu" and args.precision == "bf16":
        notes.append("bf16 autocast on CPU is usually slower than fp32 (no native bf16 matmul on most "
                     "CPUs); these rows measure the code path, not a speed-up")
    if device.type == "cpu" and args.precision == "fp16":
        notes.append("fp16 is ignored on CPU, as Accelerate does: SynthesisContext.autocast() returns a "
                     "null context, so these rows run in fp32")
    if device.type == "cuda" and args.precision == "bf16" and not torch.cuda.is_bf16_supported():
        notes.append("this GPU does not support bf16 natively; autocast emulates it")

    header = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "accelerate_dfkd": lib.version,
        "threads": torch.get_num_threads(),
        "device": args.device,
        "device_name": device_name(device),
        "python": platform.python_version(),
        "warmup_rounds": args.warmup,
        "timed_rounds": args.steps,
        "notes": notes,
    }
    print(f"# DFAD throughput | {header['date']} | torch {header['torch']} | accelerate_dfkd "
          f"{header['accelerate_dfkd']} | threads {header['threads']} | {args.device}: {header['device_name']}")
    print(f"# median over {args.steps} timed rounds after {args.warmup} warm-up rounds; "
          "round = 1 generator step + 5 student steps")
    for note in notes:
        print(f"> note: {note}")
    print(flush=True)

    rows = []
    layouts = ("contiguous", "channels_last") if args.memory_format == "both" else (args.memory_format,)
    for name, spec in pairs:
        for layout in layouts:
            rows.append(bench_pair(lib, name, spec, args, device, layout))
            print(f"  done: {rows[-1]['pair']} ({layout})", file=sys.stderr, flush=True)
    print(markdown_table(rows, device))
    if device.type == "cpu":
        print("\n* process-wide: growth of the process's peak RSS (resource.getrusage ru_maxrss) "
              "during the row; a row after a larger one can show ~0.")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"header": header, "rows": rows}, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
