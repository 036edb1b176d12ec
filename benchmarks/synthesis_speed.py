#!/usr/bin/env python
"""Synthesis time per image: FastDFKD (Fast-k) against DeepInversion-2k, side by side in one run.

The FastDFKD paper's headline (Table 1, "Speed Up"): synthesis time relative to DeepInv-2k, on average
247x (CIFAR-10) / 253x (CIFAR-100) for Fast-5 and 127x / 125x for Fast-10. Synthesis time only: the
student's training is not counted, on either side (zju-vipa `time_cost`, implementations.md section 6).

Both methods run the library's own code (`FastDFKD.synthesize`, `DeepInversion.synthesize`) with the same
teacher, the same student (both adversarial terms on, so both run the student), the same batch size, on
the same device. One Fast-k round = k inner steps (generator, teacher and student forward and backward,
one Adam step) + one meta step + the pool update. One DeepInversion round = N pixel steps (teacher and
student forward and backward, one Adam step) + a final scoring forward. A DeepInversion-2k round is too
long for a CPU, so it is timed with N = `--di_timed_iterations` and scaled to `--di_iterations` as
t_N * (2000 + 1) / (N + 1): the final forward-only scoring costs less than a step, so this estimate is
below the real 2k time and the ratio is a lower bound (pass `--di_timed_iterations 2000` on a GPU for the
real thing).

On a shared machine the two methods are timed interleaved (Fast round, DeepInversion round, Fast round,
...), so load changes hit both alike; medians over rounds are reported, and the load average is printed.
Teacher and student keep random weights (with non-trivial BatchNorm statistics): time does not depend on
them.

Examples::

    OMP_NUM_THREADS=1 python benchmarks/synthesis_speed.py                      # resnet56 -> resnet20, CPU
    python benchmarks/synthesis_speed.py --teacher digits_cnn --student digits_cnn_half --image_size 8 \\
        --channels 1 --ngf 32
    python benchmarks/synthesis_speed.py --device cuda --batch_size 256 --di_timed_iterations 2000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from accelerate_dfkd.methods.deepinversion import DeepInversion, DeepInversionConfig  # noqa: E402
from accelerate_dfkd.methods.fast_dfkd import FastDFKD, FastDFKDConfig  # noqa: E402
from accelerate_dfkd.models import build_model  # noqa: E402
from accelerate_dfkd.synthesis import SynthesisContext  # noqa: E402
from accelerate_dfkd.utils import synchronize  # noqa: E402


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def teacher_with_statistics(name: str, channels: int, size: int, num_classes: int, device: torch.device):
    """A zoo model with random weights whose BatchNorm running statistics are not the (0, 1) defaults."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=num_classes, in_channels=channels).to(device).train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(16, channels, size, size, device=device) * 1.5 + 0.2)
    return model.eval().requires_grad_(False)


def timed(fn, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="resnet56")
    parser.add_argument("--student", default="resnet20")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--num_classes", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--fast_k", type=int, default=5, help="FastDFKD inner steps per batch (Fast-k)")
    parser.add_argument("--nz", type=int, default=256)
    parser.add_argument("--ngf", type=int, default=64)
    parser.add_argument("--di_iterations", type=int, default=2000, help="DeepInversion-2k: steps per batch")
    parser.add_argument("--di_timed_iterations", type=int, default=20,
                        help="steps per timed DeepInversion round, scaled to --di_iterations")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of each method (interleaved)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds of each method first")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.di_timed_iterations < 1 or args.di_timed_iterations > args.di_iterations:
        parser.error("--di_timed_iterations must lie in [1, --di_iterations]")

    device = torch.device(args.device)
    shape = (args.channels, args.image_size, args.image_size)
    teacher = teacher_with_statistics(args.teacher, args.channels, args.image_size, args.num_classes, device)
    torch.manual_seed(1)
    student = build_model(args.student, num_classes=args.num_classes, in_channels=args.channels).to(device)
    context = SynthesisContext(device=device)
    b = args.batch_size
    fast = FastDFKD(FastDFKDConfig(per_device_synthesis_batch_size=b, generator_steps=args.fast_k, nz=args.nz,
                                   ngf=args.ngf, warmup_rounds=0, reset_first_layers=False, pool_capacity=b),
                    teacher, image_shape=shape, num_classes=args.num_classes,
                    context=SynthesisContext(device=device, image_mean=[0.5] * args.channels,
                                             image_std=[0.25] * args.channels))
    deepinv = DeepInversion(DeepInversionConfig(per_device_synthesis_batch_size=b,
                                                synthesis_iterations=args.di_timed_iterations, pool_capacity=b),
                            teacher, image_shape=shape, num_classes=args.num_classes, context=context)

    fast_s, di_s = [], []
    for i in range(args.warmup + args.rounds):
        t_fast = timed(lambda: fast.synthesize(student), device)
        t_di = timed(lambda: deepinv.synthesize(student), device)
        if i >= args.warmup:
            fast_s.append(t_fast)
            di_s.append(t_di)
    fast_batch = statistics.median(fast_s)
    di_timed_batch = statistics.median(di_s)
    n, full = args.di_timed_iterations, args.di_iterations
    di_batch = di_timed_batch * (full + 1) / (n + 1)
    ratio = di_batch / fast_batch

    threads = torch.get_num_threads()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_model()} ({os.cpu_count()} CPUs)"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"# synthesis_speed  {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}  torch {torch.__version__}  "
          f"threads {threads}  device {where}  load average {load}")
    print(f"# teacher {args.teacher} -> student {args.student}, images {args.channels}x{args.image_size}x"
          f"{args.image_size}, batch {b}, generator sigmoid_generator nz {args.nz} ngf {args.ngf}; "
          f"median of {args.rounds} interleaved rounds after {args.warmup} untimed")
    rows = [
        (f"Fast-{args.fast_k}", args.fast_k, "measured", fast_batch),
        (f"DeepInversion-{n}", n, "measured", di_timed_batch),
        (f"DeepInversion-{full}", full, "measured" if n == full else f"scaled from {n} x {full + 1}/{n + 1}",
         di_batch),
    ]
    header = (f"| {'method':<20} | {'steps/batch':>11} | {'s per batch':>11} | {'ms per image':>12} | "
              f"{'images/s':>9} | source")
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:]))
    for name, steps, source, seconds in rows:
        print(f"| {name:<20} | {steps:>11} | {seconds:>11.3f} | {1000 * seconds / b:>12.3f} | "
              f"{b / seconds:>9.3g} | {source}")
    print(f"DeepInversion-{full} / Fast-{args.fast_k} synthesis time per image: {ratio:.1f}x "
          f"(bar >= 100x; paper Table 1 average speed-up of Fast-5: 247x CIFAR-10, 253x CIFAR-100; "
          f"Fast-10: 127x / 125x)")
    figures = {"teacher": args.teacher, "student": args.student, "batch_size": b, "fast_k": args.fast_k,
               "fast_seconds_per_batch": fast_s, "di_timed_iterations": n, "di_seconds_per_timed_batch": di_s,
               "di_seconds_per_batch_scaled": di_batch, "ratio": ratio, "threads": threads, "device": where,
               "load_average": load}
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
