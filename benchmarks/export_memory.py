"""Peak memory of exporting a synthetic set: RSS before / peak during / after
`export_synthetic_dataset`, for CIFAR-shaped (3x32x32) images.

    OMP_NUM_THREADS=1 python benchmarks/export_memory.py --num_images 10000 --format disk

The teacher and student are a CIFAR ResNet-20 with random weights (memory does not depend on what
they learned), the method DFAD with its CIFAR generator (Generator-A, nz 256, ngf 64). "before" is
the process with its models built and one synthetic batch already drawn (a run that has synthesized
before it exports; the first batch's activations are the allocator's working set either way); the
peak is sampled every 2 ms by a thread during the export. Bar (issue 5): peak - before < 200 MB for
10,000 images; streaming means it does not grow with --num_images.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from accelerate_dfkd.integrations.datasets_io import export_synthetic_dataset, load_synthetic_dataset
from accelerate_dfkd.integrations.trainer import build_synthesizer
from accelerate_dfkd.models import build_model

MB = 2**20


def rss_anon() -> int:
    """Anonymous resident memory (heap, tensors; not memory-mapped file pages), from /proc."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """The largest RSS (and anonymous RSS) seen by a sampling thread while the `with` block runs."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.process, self.interval_s, self.peak, self.peak_anon = psutil.Process(), interval_s, 0, 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self.peak_anon = max(self.peak_anon, rss_anon())
            time.sleep(self.interval_s)

    def __enter__(self) -> "PeakRSS":
        self.peak, self.peak_anon = self.process.memory_info().rss, rss_anon()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        self.peak_anon = max(self.peak_anon, rss_anon())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_images", type=int, default=10_000)
    parser.add_argument("--format", choices=["disk", "parquet"], default="disk")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--synthesize_every", type=int, default=0,
                        help="a DFAD generator step before every N-th batch (0: sample the generator as it is)")
    parser.add_argument("--ngf", type=int, default=64, help="generator width (DFAD CIFAR: 64)")
    parser.add_argument("--output", default=None, help="default: a temporary folder, removed afterwards")
    args = parser.parse_args()

    torch.manual_seed(0)
    teacher = build_model("resnet20", num_classes=10, in_channels=3)
    student = build_model("resnet20", num_classes=10, in_channels=3)
    synthesizer = build_synthesizer("dfad", teacher, image_shape=(3, 32, 32), num_classes=10,
                                    per_device_synthesis_batch_size=args.batch_size, ngf=args.ngf)
    with torch.no_grad():  # warm-up: one batch drawn and labelled, as a run that synthesized before
        teacher(synthesizer.build_source(args.batch_size).next_batch().images)
        if args.synthesize_every:
            synthesizer.synthesize(student)

    rss_no_datasets = psutil.Process().memory_info().rss
    import datasets  # noqa: F401  (the export imports it; a fixed cost, measured apart)
    import pyarrow.parquet  # noqa: F401
    datasets_import = psutil.Process().memory_info().rss - rss_no_datasets

    workdir = Path(tempfile.mkdtemp(prefix="export-bench-"))
    default_name = "synthetic.parquet" if args.format == "parquet" else "synthetic"
    output = Path(args.output) if args.output else workdir / default_name
    process = psutil.Process()
    before, before_anon = process.memory_info().rss, rss_anon()
    run_peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    with PeakRSS() as peak:
        export_synthetic_dataset(synthesizer, student, output, num_images=args.num_images, format=args.format,
                                 batch_size=args.batch_size, synthesize_every=args.synthesize_every, overwrite=True)
    seconds = time.perf_counter() - start
    after = process.memory_info().rss
    size = sum(p.stat().st_size for p in output.rglob("*")) if output.is_dir() else output.stat().st_size
    rows = len(load_synthetic_dataset(output)[0])
    print(f"export of {args.num_images} images 3x32x32, format {args.format}, batch {args.batch_size}, "
          f"ngf {args.ngf}, "
          f"synthesize_every {args.synthesize_every}: {seconds:.1f} s, {size / MB:.1f} MB on disk, "
          f"{rows} rows read back")
    print(f"importing datasets + pyarrow: +{datasets_import / MB:.0f} MB (before the baseline)")
    print(f"RSS before {before / MB:.0f} MB (run peak so far {run_peak_before / MB:.0f} MB) | "
          f"export peak {peak.peak / MB:.0f} MB (+{(peak.peak - before) / MB:.0f} MB over before, "
          f"+{(peak.peak - run_peak_before) / MB:.0f} MB over the run's peak) | "
          f"after {after / MB:.0f} MB (+{(after - before) / MB:.0f} MB)")
    print(f"anonymous RSS (without memory-mapped file pages): before {before_anon / MB:.0f} MB | "
          f"export peak {peak.peak_anon / MB:.0f} MB (+{(peak.peak_anon - before_anon) / MB:.0f} MB)")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
