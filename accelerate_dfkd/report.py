"""The run report: `OUTPUT_DIR/report.md`, one page that says how a run went.

    report.md              the results table, then the plots and the image grid, linked by relative paths
    report/top1.png        evaluation top-1 (miou.png: mean IoU, segmentation) over steps, teacher and best marked
    report/losses.png      every loss term (student/*, synthesis/*) over steps, one panel each
    report/synthetic.png   the last synthesis round's images (main process)

Written at the end of every run by `ReportCallback` (main process only), and offline from a run's
files with `accelerate-dfkd report OUTPUT_DIR` (results.json + log.jsonl; the image grid is the one
the run left behind). The same grid goes to TensorBoard when it is a configured tracker; the scalars
are already there (the Distiller logs them through `accelerator.log`).

Plots are drawn with matplotlib on its Agg canvas (no display, no pyplot global state): a plot a
reader can use needs numbered, labelled axes and a legend, which means fonts.
"""

from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from torch import Tensor

from .callbacks import Callback, TrainerState
from .imaging import encode_png, make_grid
from .utils import atomic_write_bytes

logger = logging.getLogger(__name__)

REPORT_NAME = "report.md"
PLOTS_DIR = "report"          # next to report.md, so every link is a relative path
LOSS_PREFIXES = ("student/", "synthesis/")
# results.json's "metric" (absent before segmentation: top1) -> (short name, axis label)
METRIC_NAMES = {"top1": ("top-1", "top-1 accuracy (%)"), "miou": ("mIoU", "mean IoU (%)")}


def metric_of(results: dict[str, Any]) -> tuple[str, str, str]:
    """(key, short name, axis label) of the run's headline metric."""
    key = results.get("metric") or "top1"
    short, label = METRIC_NAMES.get(key, (key, f"{key} (%)"))
    return key, short, label


# --- reading a run ----------------------------------------------------------------------------
def read_log(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """log.jsonl -> {key: [(step, value), ...]} sorted by step. A resumed run logs again the steps
    after its checkpoint: the later line wins. A line cut short by a killed run is skipped."""
    series: dict[str, dict[int, float]] = {}
    path = Path(path)
    if not path.is_file():
        return {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            continue
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(key, {})[step] = float(value)
    return {key: sorted(points.items()) for key, points in series.items()}


def _number(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def results_table(results: dict[str, Any]) -> str:
    """One Markdown row with the run's headline numbers (the recipes/README.md quantities)."""
    m, name, _ = metric_of(results)
    best = _number(results.get(f"best_student_{m}"))
    if results.get("best_step") is not None:
        best += f" (step {results['best_step']})"
    columns = [
        ("method", results.get("method")),
        ("teacher -> student", f"{results.get('teacher', '?')} -> {results.get('student', '?')}"),
        (f"teacher {name}", _number(results.get(f"teacher_{m}"))),
        (f"student {name} final", _number(results.get(f"student_{m}"))),
        ("best", best),
        ("mean", _number(results.get(f"mean_student_{m}"))),
        ("variance", _number(results.get(f"var_student_{m}"))),
        ("steps", results.get("steps")),
        ("world size", results.get("world_size")),
        ("synthesis s", _number(results.get("synthesis_seconds"), 1)),
        ("distillation s", _number(results.get("distill_seconds"), 1)),
        ("wall s", _number(results.get("wall_seconds"), 1)),  # absent from runs older than the field
    ]
    head = "| " + " | ".join(header for header, _ in columns) + " |"
    rule = "|" + "---|" * len(columns)
    row = "| " + " | ".join("n/a" if value is None else str(value) for _, value in columns) + " |"
    return "\n".join([head, rule, row])


# --- drawing --------------------------------------------------------------------------------
def _figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas, or None (with a warning) when matplotlib is missing:
    a report must never fail a run that has finished."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed: report.md is written without plots "
                       "(pip install matplotlib, then `accelerate-dfkd report OUTPUT_DIR`)")
        return None
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def plot_evaluation(history: list[tuple[int, float]], path: Path, teacher_score: Optional[float] = None,
                    title: str = "", lr_milestones: tuple[int, ...] = (),
                    ylabel: str = "top-1 accuracy (%)",
                    online: Sequence[tuple[int, float]] = ()) -> Optional[Path]:
    """Student top-1 (or the run's metric) on the real held-out set at each evaluation; the teacher
    as a dashed line and the LR decay steps as dotted ones (jumps in accuracy often sit there).
    `online`: with student_ema_decay, the online student's scores, drawn next to the average's."""
    figure = _figure(8, 4.5) if history else None
    if figure is None:
        return None
    ax = figure.add_subplot()
    steps, scores = zip(*history)
    ax.plot(steps, scores, marker="o", markersize=4, linewidth=1.5,
            label="student (weight average)" if online else "student")
    if online:
        ax.plot(*zip(*online), marker=".", linewidth=1, color="tab:green", label="online student")
    best = max(range(len(scores)), key=scores.__getitem__)
    ax.plot([steps[best]], [scores[best]], marker="*", markersize=14, linestyle="none", color="tab:red",
            label=f"best {scores[best]:.2f}% (step {steps[best]})")
    if teacher_score is not None:
        ax.axhline(teacher_score, linestyle="--", color="0.35", label=f"teacher {teacher_score:.2f}%")
    for i, milestone in enumerate(lr_milestones):
        ax.axvline(milestone, linestyle=":", color="0.5", label="LR decay" if i == 0 else None)
    ax.set_xlabel("student optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    # below the axes: the teacher's line spans the whole width, so no corner inside is always free
    figure.legend(loc="outside lower center", ncols=4, frameon=False)
    return _save(figure, path)


def plot_losses(log: dict[str, list[tuple[int, float]]], path: Path) -> Optional[Path]:
    """One panel per loss term, each with its own y-axis (terms differ by orders of magnitude)."""
    keys = sorted(k for k in log if k.startswith(LOSS_PREFIXES) and log[k])
    if not keys:
        return None
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    figure = _figure(4.2 * ncols, 3.0 * nrows)
    if figure is None:
        return None
    axes = figure.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, key in zip(axes, keys):
        steps, values = zip(*log[key])
        ax.plot(steps, values, linewidth=1.2, color="tab:blue" if key.startswith("student/") else "tab:orange")
        ax.set_title(key)
        ax.set_xlabel("student optimizer step")
        finite = [v for v in values if math.isfinite(v)]
        # a positive term that falls by orders of magnitude (BN statistics) is flat on a linear axis
        wide = bool(finite) and min(finite) > 0 and max(finite) > 100 * min(finite)
        if wide:
            ax.set_yscale("log")
        ax.set_ylabel("loss (log scale)" if wide else "loss")
        ax.grid(alpha=0.3)
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    return _save(figure, path)


def image_grid(images: Tensor, max_images: int = 64, upscale: int = 1) -> Optional[Tensor]:
    """(N, C, H, W) images -> an upscaled (C, H', W') uint8 grid, or None when they are not images
    (1 or 3 channels). Tiny images (8x8 digits) are unreadable at 1:1, hence `upscale`."""
    if images is None or images.dim() != 4 or images.shape[1] not in (1, 3):
        return None
    grid = make_grid(images[:max_images])
    if upscale > 1:
        grid = grid.repeat_interleave(upscale, dim=1).repeat_interleave(upscale, dim=2)
    return grid


# --- the report -----------------------------------------------------------------------------
def write_report(output_dir: str | Path, results: Optional[dict[str, Any]] = None,
                 synthetic_grid: Optional[Tensor] = None, synthetic_caption: str = "") -> Path:
    """Write OUTPUT_DIR/report.md and its plots from `results` (default: OUTPUT_DIR/results.json)
    and OUTPUT_DIR/log.jsonl. `synthetic_grid` (a uint8 grid from `image_grid`) replaces
    report/synthetic.png; without it the report links the grid the run left (report/synthetic.png,
    else the newest images/round_*.png)."""
    output_dir = Path(output_dir)
    if results is None:
        path = output_dir / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: `accelerate-dfkd report` needs the OUTPUT_DIR of a "
                                    "finished run (one that wrote results.json)")
        results = json.loads(path.read_text())
    log = read_log(output_dir / "log.jsonl")
    plots = output_dir / PLOTS_DIR
    m, name, ylabel = metric_of(results)
    history = [(int(s), float(v)) for s, v in results.get("eval_history") or []] or log.get(f"eval/{m}", [])
    title = f"{results.get('method')}, {results.get('teacher')} -> {results.get('student')}"
    config = results.get("config") or {}
    milestones = tuple(m for m in config.get("lr_milestones") or () if 0 < m < (results.get("steps") or 0)) \
        if config.get("lr_scheduler") == "multistep" else ()

    for stale in (f"{m}.png", "losses.png"):  # a plot this run cannot draw must not show an older run's
        (plots / stale).unlink(missing_ok=True)
    eval_plot = plot_evaluation(history, plots / f"{m}.png", results.get(f"teacher_{m}"), title, milestones, ylabel,
                                online=log.get(f"eval/online_{m}", []))
    losses_plot = plot_losses(log, plots / "losses.png")
    if synthetic_grid is not None:
        plots.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(plots / "synthetic.png", encode_png(synthetic_grid))
    grid_path = plots / "synthetic.png"
    if not grid_path.is_file():
        rounds = sorted((output_dir / "images").glob("round_*.png"))
        grid_path = rounds[-1] if rounds else None
        synthetic_caption = f"From `{grid_path.relative_to(output_dir)}`." if grid_path else ""

    def link(alt: str, path: Path) -> str:
        return f"![{alt}]({path.relative_to(output_dir).as_posix()})"

    n_evals = len(results.get("eval_history") or [])
    lines = [f"# Run report: {title}", "", results_table(results), "",
             f"{name} in % on the real held-out set; mean and variance over the run's {n_evals} evaluations. "
             "Synthesis and distillation seconds are device-synchronised, averaged over ranks; wall seconds are "
             "the training loop's, summed over resumed segments. Everything here is in `results.json` (with the "
             "full config) and `log.jsonl`.", "", f"## Evaluation {name}", ""]
    if eval_plot:
        lines.append(link(f"student {name} over steps", eval_plot))
    else:
        lines.append("No evaluation on real data in this run (eval_dataset: none)." if not history
                     else "No plot: matplotlib is not installed.")
    lines += ["", "## Loss terms", ""]
    if losses_plot:
        lines += ["Each term's value at every `logging_steps`-th step (log.jsonl): `student/*` train the student, "
                  "`synthesis/*` the synthetic data.", "", link("loss terms over steps", losses_plot)]
    else:
        lines.append("No loss terms in log.jsonl (logging_steps: 0)." if not any(k.startswith(LOSS_PREFIXES)
                                                                                    for k in log)
                     else "No plot: matplotlib is not installed.")
    lines += ["", "## Synthetic images", ""]
    if grid_path is not None:
        lines += [synthetic_caption or "The last synthesis round's images (main process), each min-max scaled.",
                  "", link("synthetic images", grid_path)]
    else:
        lines.append("This method's synthetic batches are not 1- or 3-channel images.")
    path = output_dir / REPORT_NAME
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path


class ReportCallback(Callback):
    """Writes OUTPUT_DIR/report.md at the end of the run (main process only), and sends the grid
    of the latest synthetic images to TensorBoard at each evaluation and at the end, when
    `accelerator` has a tensorboard tracker (other trackers get the scalars only)."""

    def __init__(self, accelerator=None, max_images: int = 64, upscale: int = 1) -> None:
        self.accelerator, self.max_images, self.upscale = accelerator, max_images, upscale
        self._images: Optional[Tensor] = None
        self._round = 0
        self._logged_step: Optional[int] = None

    def on_synthesis_end(self, state: TrainerState, output: Any) -> None:
        if state.is_main_process and output.images is not None:
            # a reference, not a copy: no device sync per round; the grid is made when it is needed
            self._images, self._round = output.images.detach()[: self.max_images], state.rounds

    def _grid(self, max_images: int) -> Optional[Tensor]:
        return image_grid(self._images, max_images, self.upscale) if self._images is not None else None

    def _log_grid(self, state: TrainerState) -> None:
        """The latest images to TensorBoard, at most ~1 megapixel per grid: an event file keeps every
        one, and 64 ImageNet-size images a grid would grow it by megabytes per evaluation."""
        trackers = [t for t in (self.accelerator.trackers if self.accelerator else []) if t.name == "tensorboard"]
        if not trackers or self._images is None or self._logged_step == state.global_step:
            return
        pixels = self._images.shape[-1] * self._images.shape[-2] * self.upscale ** 2
        grid = self._grid(min(self.max_images, max(8, 1024 * 1024 // pixels)))
        if grid is None:
            return
        for tracker in trackers:
            tracker.log_images({"synthesis/images": grid[None].numpy()}, step=state.global_step, dataformats="NCHW")
        self._logged_step = state.global_step

    def on_evaluate(self, state: TrainerState, metrics: dict[str, float], student: Any) -> None:
        if state.is_main_process:
            self._log_grid(state)

    def on_train_end(self, state: TrainerState, results: dict[str, Any]) -> None:
        if not state.is_main_process:
            return
        self._log_grid(state)
        grid = self._grid(self.max_images)
        caption = (f"Synthesis round {self._round} (the last), main process; each image min-max scaled."
                   if grid is not None else "")
        path = write_report(state.output_dir, results, synthetic_grid=grid, synthetic_caption=caption)
        logger.info(f"wrote {path}")
