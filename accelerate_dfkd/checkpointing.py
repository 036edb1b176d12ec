"""Atomic, rotating checkpoints of a whole run.

Layout of `OUTPUT_DIR/checkpoints/step_000100/`:
    model.safetensors, optimizer.bin, custom_checkpoint_*.pkl, random_states_<rank>.pkl
        written by `accelerator.save_state` (student, its optimizer and LR schedule, RNGs)
    rank_<r>.pt        written by every rank: its synthesizer (generator, optimizers, latents,
                       buffers, random streams) and its source's state (DESIGN.md fact 3)
    trainer_state.json written last: step counters, timings, best-so-far; marks completion

Everything is first written to `checkpoints/.tmp-step_000100/`, then renamed into place in one
`os.replace`. A run killed at any moment leaves either the previous checkpoints or the new one,
never a half-written folder under a real name; stale temporary folders are removed by the next save.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from .config import ConfigError
from .utils import atomic_torch_save, atomic_write_bytes

STATE_FILE = "trainer_state.json"


def rank_file(checkpoint: Path, rank: int) -> Path:
    return checkpoint / f"rank_{rank}.pt"


def is_complete(checkpoint: Path) -> bool:
    return checkpoint.is_dir() and (checkpoint / STATE_FILE).is_file() and not checkpoint.name.startswith(".")


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if is_complete(p)]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def resolve_resume(spec: str, output_dir: Path) -> Optional[Path]:
    """`latest` -> the newest complete checkpoint of `output_dir` (None if there is none yet: a run
    killed before its first checkpoint just starts over); a path -> that checkpoint, which must exist."""
    if spec == "latest":
        found = list_checkpoints(output_dir / "checkpoints")
        return found[-1] if found else None
    path = Path(spec)
    if is_complete(path):
        return path
    if path.is_dir() and list_checkpoints(path / "checkpoints"):
        return list_checkpoints(path / "checkpoints")[-1]  # an output_dir was given
    if path.is_dir() and list_checkpoints(path):
        return list_checkpoints(path)[-1]                   # a checkpoints/ folder was given
    raise ConfigError(f"--resume_from_checkpoint {spec}: no complete checkpoint there (a checkpoint folder holds "
                      f"{STATE_FILE}). Pass a checkpoint folder such as OUTPUT_DIR/checkpoints/step_000100, or "
                      "'latest' to resume the newest checkpoint of --output_dir")


def save_checkpoint(accelerator: Any, root: Path, step: int, rank_state: dict[str, Any],
                    trainer_state: dict[str, Any], total_limit: int) -> Path:
    """Collective: every rank must call it. Returns the final checkpoint folder."""
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp-step_{step:06d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step_*"):  # left behind by a killed save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    rank_state = dict(rank_state, world_size=accelerator.num_processes, rank=accelerator.process_index)
    atomic_torch_save(rank_state, rank_file(tmp, accelerator.process_index))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_bytes(tmp / STATE_FILE, json.dumps(trainer_state, indent=1).encode())
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step (after a resume): swap, never leave a gap
            old = root / f".old-step_{step:06d}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(root)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Any, checkpoint: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore what `accelerator.save_state` wrote and return (this rank's state, trainer state)."""
    rank_path = rank_file(checkpoint, accelerator.process_index)
    saved_ranks = len(list(checkpoint.glob("rank_*.pt")))
    if saved_ranks != accelerator.num_processes or not rank_path.is_file():
        raise ConfigError(f"checkpoint {checkpoint} was written by {saved_ranks} process(es) but this run has "
                          f"{accelerator.num_processes}: resume with the same number of processes")
    accelerator.load_state(str(checkpoint))
    # CPU first: state_dict loaders move tensors to their modules' devices themselves.
    rank_state = torch.load(rank_path, map_location="cpu", weights_only=True)
    trainer_state = json.loads((checkpoint / STATE_FILE).read_text())
    return rank_state, trainer_state


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
