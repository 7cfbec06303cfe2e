"""Training metrics: exact sums across ranks and steps, metrics.jsonl, TensorBoard, curves PNG, log lines."""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist

from vaemo.plotting import pyplot


def collective_device() -> torch.device:
    """Where a tensor for a collective must live: NCCL reduces CUDA tensors only, gloo CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Accumulator:
    """Sums of one rank's step statistics between two reports; `reduce` sums them over all ranks."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)

    def add(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.sums[key] += float(value)

    def reduce(self) -> dict[str, float]:
        """Collective: every rank calls it. Keys may differ between ranks; the union is summed. (It reduces
        at world size 1 too, so that one GPU runs the collectives a cluster runs.)"""
        if not (dist.is_available() and dist.is_initialized()):
            return dict(self.sums)
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, sorted(self.sums))
        keys = sorted(set().union(*gathered))
        values = torch.tensor([self.sums.get(k, 0.0) for k in keys], dtype=torch.float64, device=collective_device())
        dist.all_reduce(values)
        return dict(zip(keys, values.tolist()))

    def reset(self) -> None:
        self.sums.clear()

    def unreported(self) -> dict[str, float]:
        """What a checkpoint keeps for a resume's first record: the sums since the last report, but the counts
        that rates divide by the interval's wall time (which starts again at the resume)."""
        return {key: value for key, value in self.sums.items() if key not in PER_WALL_TIME}


PER_WALL_TIME = ("clips", "tokens")


def interval_record(
    step: int, totals: dict[str, float], terms: dict[str, float], world_size: int, lr: float, wall: float, elapsed: float
) -> dict:
    """One metrics record from an interval's summed statistics."""
    steps = max(totals.get("steps", 0.0) / world_size, 1.0)
    busy = totals.get("data_wait_s", 0.0) + totals.get("compute_s", 0.0)
    record = {
        "step": step,
        "loss": totals.get("loss", 0.0) / world_size / steps,
        "lr": lr,
        **terms,
        "samples_per_s": totals.get("clips", 0.0) / max(wall, 1e-9),
        "tokens_per_s": totals.get("tokens", 0.0) / max(wall, 1e-9),
        "data_wait_s": totals.get("data_wait_s", 0.0) / world_size / steps,
        "compute_s": totals.get("compute_s", 0.0) / world_size / steps,
        "data_wait_frac": totals.get("data_wait_s", 0.0) / busy if busy else 0.0,
        "elapsed_s": elapsed,
    }
    skips = {k[len("skip/") :]: int(v) for k, v in totals.items() if k.startswith("skip/") and v}
    if skips:
        record["skips"] = skips
    return record


class MetricsWriter:
    """Rank 0's outputs: RUN_DIR/metrics.jsonl, TensorBoard events under RUN_DIR/tb, the progress queue.

    A run that starts again at `start_step` (a resume, or Ray's restart of the worker group from its last
    checkpoint) first drops what an earlier start recorded after that step, in both: the steps it trains
    again are then recorded once, and a plot of the run has one line, not two. Each start is one line of
    RUN_DIR/workers/starts.jsonl (the step, the checkpoint, the time)."""

    def __init__(self, run_dir: Path, queue=None, start_step: int = 0, start: dict | None = None):
        self.path = run_dir / "metrics.jsonl"
        self.queue = queue
        keep_records_up_to(self.path, start_step)
        with open(run_dir / "workers" / "starts.jsonl", "a") as f:
            f.write(json.dumps({"step": start_step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(start or {})}) + "\n")
        from tensorboardX import SummaryWriter

        # TensorBoard hides the events of an earlier start from purge_step on. (tensorboardX names a file by
        # the second it opened it: a start within the same second as the last would write over its file.)
        self.tb = SummaryWriter(
            str(run_dir / "tb"), flush_secs=10, purge_step=start_step + 1, filename_suffix=f".{os.getpid()}.{start_step}"
        )

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "step":
                self.tb.add_scalar(key, value, record["step"])
        if self.queue is not None:
            try:
                self.queue.put_nowait(record)
            except Exception:  # a full or gone display queue must never stop training
                pass

    def close(self) -> None:
        self.tb.close()


def keep_records_up_to(path: Path, step: int) -> None:
    """Rewrite a metrics.jsonl with its records of steps <= `step` alone (into place: a stop midway keeps the
    old file whole)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if recorded_step(line) <= step]
    if len(kept) == len(lines):
        return
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(line + "\n" for line in kept))
    partial.replace(path)


def recorded_step(line: str) -> float:
    """A metrics line's step; infinity for a line cut short (a process stopped while appending it), so that it
    is dropped with what came after the checkpoint."""
    try:
        return json.loads(line).get("step", 0)
    except (ValueError, AttributeError):
        return float("inf")


LINE_KEYS = (
    ("loss", "loss {:.4f}"),
    ("lm", "lm {:.3f}"),
    ("kd", "kd {:.4f}"),
    ("agreement", "agree {:.2f}"),
    ("aux", "aux {:.3f}"),
    ("va", "va {:.3f}"),
    ("cat", "cat {:.3f}"),
    ("val_loss", "val {:.4f}"),
)
# The per-modality accuracies (val_<task>_<modality>_acc) stay in metrics.jsonl: the line shows each task's.
MODALITY_SUFFIXES = tuple(f"_{m}_acc" for m in ("visual", "audio", "audio_visual"))


def task_accuracies(record: dict) -> list[tuple[str, float]]:
    """(task, validation accuracy) of each task the record scores (emotion first, then by name)."""
    accuracies = [key for key in record if key.startswith("val_") and key.endswith("_acc")]
    tasks = [key[4:-4] for key in accuracies if not key.endswith(MODALITY_SUFFIXES)]
    return [(task, record[f"val_{task}_acc"]) for task in sorted(tasks, key=lambda task: (task != "emotion", task))]


def format_line(record: dict, max_steps: int, stage: int | None = None) -> str:
    """One compact line: `stage1 step 120/600 loss 1.2345 kd 1.2 agree 0.81 | 52 clips/s ...`."""
    head = f"stage{stage} " if stage is not None else ""
    parts = [f"{head}step {record['step']}/{max_steps}"]
    parts += [fmt.format(record[key]) for key, fmt in LINE_KEYS if key in record]
    parts += [f"val-{'emo' if task == 'emotion' else task} {accuracy:.2f}" for task, accuracy in task_accuracies(record)]
    rate = record.get("samples_per_s", 0.0)
    parts.append(f"| {rate:.1f} clips/s {record.get('tokens_per_s', 0.0) / 1000:.1f}k tok/s")
    parts.append(f"data-wait {100 * record.get('data_wait_frac', 0.0):.0f}%")
    if record.get("skips"):
        parts.append("skips " + ",".join(f"{k}={v}" for k, v in sorted(record["skips"].items())))
    if rate > 0 and "elapsed_s" in record and record["step"] < max_steps:
        per_step = record["elapsed_s"] / max(record["step"], 1)
        parts.append(f"eta {per_step * (max_steps - record['step']) / 60:.1f}m")
    return " ".join(parts)


def plot_curves(metrics_file: Path, png: Path, title: str = "") -> None:
    """Loss terms, validation, throughput and data wait over steps."""
    plt = pyplot()
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    if not records:
        return
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in records:
        for key, value in r.items():
            if isinstance(value, (int, float)) and key not in ("step", "elapsed_s"):
                series[key].append((r["step"], value))
    accuracy = [k for k in series if k.endswith("_acc") or k.endswith("agreement")]
    panels = [
        ("loss terms", [k for k in ("loss", "lm", "kd", "aux", "va", "cat") if k in series]),
        ("validation loss", [k for k in series if k.startswith("val_") and k not in accuracy]),
        ("accuracy / agreement", accuracy),
        ("throughput (clips/s)", ["samples_per_s"]),
        ("data wait fraction", ["data_wait_frac"]),
    ]
    panels = [(name, keys) for name, keys in panels if keys]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, (name, keys) in zip(axes[0], panels):
        for key in keys:
            xs, ys = zip(*series[key])
            ax.plot(xs, ys, label=key, marker="." if len(xs) < 30 else None)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self.start = now - self.start, now
        return elapsed
