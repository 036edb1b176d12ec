#!/usr/bin/env python
"""Replay bank memory: the process's resident memory as a pool grows, in memory vs on disk.

A pool method (DeepInversion, CMI, FastDFKD) adds one synthesis batch per round to a FIFO bank that
never wraps in a whole run (zju-vipa's pool is unbounded), and the student samples uniform batches from
it. This script does exactly that with the library's own buffers, `build_replay_buffer(storage=...)`:
every round it adds `--batch` random images of `--shape` and draws one `--batch` sample through a
`ReplaySource`, and every `--report_every` rounds it reads the process's memory from
/proc/self/status:

* RSS       VmRSS, everything resident (anonymous memory + mapped file pages);
* anon      RssAnon, the process's private memory: what a growing in-memory bank grows;
* on disk   allocated bytes of the shard files (disk mode).

Each storage runs in its own fresh Python process (the numbers of one do not leak into the other), one
thread. Both columns start after the imports and the first round, so the table shows the growth that
is due to the bank. The disk bank's shard pages live in the kernel's page cache, which is reclaimable
and not part of the process: its RSS stays flat.

Examples::

    python benchmarks/replay_bank_memory.py                                   # CIFAR pool, 200 x 256, uint8
    python benchmarks/replay_bank_memory.py --dtype float16 --rounds 100
    python benchmarks/replay_bank_memory.py --shape 3,224,224 --batch 64 --rounds 100   # ImageNet-sized images
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _run_one(args: argparse.Namespace) -> None:
    """Child process: one storage, JSON lines on stdout."""
    import torch

    from accelerate_dfkd.synthesis import ReplaySource, build_replay_buffer

    torch.set_num_threads(1)
    shape = tuple(int(s) for s in args.shape.split(","))
    capacity = args.rounds * args.batch
    with tempfile.TemporaryDirectory(dir=args.tmp_dir) as tmp:
        buffer = build_replay_buffer(capacity, storage=args.storage, directory=tmp, dtype=args.dtype)
        source = ReplaySource(buffer, args.batch, torch.Generator().manual_seed(0))
        gen = torch.Generator().manual_seed(1)
        images = torch.rand(args.batch, *shape, generator=gen)  # one batch, re-offered: generation is not measured
        add_s = sample_s = 0.0
        base = None
        for round_ in range(1, args.rounds + 1):
            images.add_(0.001).remainder_(1.0)
            start = time.perf_counter()
            buffer.add(images)
            add_s += time.perf_counter() - start
            start = time.perf_counter()
            source.next_batch()
            sample_s += time.perf_counter() - start
            if base is None:
                base = (_status_kib("VmRSS"), _status_kib("RssAnon"))
            if round_ % args.report_every == 0 or round_ == args.rounds:
                disk = buffer.disk_bytes() if hasattr(buffer, "disk_bytes") else 0
                print(json.dumps({"round": round_, "images": len(buffer),
                                  "rss_mib": (_status_kib("VmRSS") - base[0]) / 1024,
                                  "anon_mib": (_status_kib("RssAnon") - base[1]) / 1024,
                                  "disk_mib": disk / 2**20, "add_ms": 1000 * add_s / round_,
                                  "sample_ms": 1000 * sample_s / round_}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="3,32,32", help="C,H,W of one image (default CIFAR)")
    parser.add_argument("--batch", type=int, default=256, help="images added and sampled per round")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--dtype", default="uint8", choices=["uint8", "float16", "float32"])
    parser.add_argument("--report_every", type=int, default=25)
    parser.add_argument("--tmp_dir", default=None, help="where the disk bank's shards go (default: system temp)")
    parser.add_argument("--storage", default=None, help=argparse.SUPPRESS)  # internal: run one storage
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    if args.storage:
        _run_one(args)
        return

    rows: dict[str, list[dict]] = {}
    for storage in ("memory", "disk"):
        cmd = [sys.executable, __file__, "--storage", storage] + [
            f"--{k}={v}" for k, v in vars(args).items() if v is not None and k not in ("storage", "json")]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        rows[storage] = [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    import torch

    pixels = math.prod(int(s) for s in args.shape.split(","))
    item_mib = torch.tensor([], dtype=getattr(torch, args.dtype)).element_size() * pixels / 2**20
    print(f"# replay bank memory: images {args.shape} {args.dtype} ({item_mib * 1024:.1f} KiB each), "
          f"{args.batch} added + {args.batch} sampled per round, torch {torch.__version__}, 1 thread")
    print("| images | bank size MiB | memory: RSS growth MiB | disk: RSS growth MiB | disk: anon growth MiB "
          "| disk: shards on disk MiB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for mem, disk in zip(rows["memory"], rows["disk"]):
        print(f"| {mem['images']} | {mem['images'] * item_mib:.0f} | {mem['rss_mib']:.0f} | {disk['rss_mib']:.0f} "
              f"| {disk['anon_mib']:.0f} | {disk['disk_mib']:.0f} |")
    last_m, last_d = rows["memory"][-1], rows["disk"][-1]
    print(f"\nper round: memory add {last_m['add_ms']:.2f} ms, sample {last_m['sample_ms']:.2f} ms; "
          f"disk add {last_d['add_ms']:.2f} ms, sample {last_d['sample_ms']:.2f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
