"""Shared pieces of the two training loops: budget, schedule, resumable state, plots.

A run lives in one folder. `state.pt` holds everything needed to continue
(model, optimizers, step, seconds trained, RNG, loss history); a chunk trains
until its own time limit, saves, and exits; the next chunk resumes. The
schedule is a function of overall progress in [0, 1], measured in steps
when a step budget is given, else in training seconds, so chunks of any
length continue one schedule.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tilecomp.errors import TilecompError

STATE_FILE = "state.pt"


@dataclass
class Budget:
    steps: int | None = None            # total optimizer steps over all chunks, or
    minutes: float | None = None        # total training minutes over all chunks
    chunk_minutes: float = 9.0          # this invocation stops (and saves) after this long
    chunk_steps: int | None = None      # ... or after this many steps

    def __post_init__(self):
        if (self.steps is None) == (self.minutes is None):
            raise TilecompError("training budget: give exactly one of --steps or --minutes")

    def progress(self, step: int, seconds: float) -> float:
        if self.steps is not None:
            return min(1.0, step / self.steps)
        return min(1.0, seconds / (60.0 * self.minutes))


@dataclass
class History:
    """Loss curves: (step, value) pairs."""
    train: list[tuple[int, float]] = field(default_factory=list)
    heldout: list[tuple[int, float]] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "History":
        return cls(train=[tuple(x) for x in d["train"]], heldout=[tuple(x) for x in d["heldout"]],
                   extra=d.get("extra", {}))


def lr_factor(progress: float, warmup: float = 0.03, floor: float = 0.1) -> float:
    """Linear warm-up over the first `warmup` of training, then cosine down to `floor`."""
    if progress < warmup:
        return max(progress / warmup, 1e-3)
    t = (progress - warmup) / max(1e-9, 1.0 - warmup)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def set_lr(optimizers, factor: float):
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * factor


def save_state(run_dir: Path, state: dict):
    """Atomic write of the run state (a crash mid-save keeps the previous one)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    tmp.replace(run_dir / STATE_FILE)


def load_state(run_dir: Path) -> dict | None:
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise TilecompError(f"{path}: cannot read the training state ({e})") from None


class Clock:
    """Seconds trained so far (carried across chunks) and this chunk's limits."""

    def __init__(self, seconds_before: float, step_before: int, budget: Budget):
        self.before = seconds_before
        self.start = time.monotonic()
        self.deadline = self.start + 60.0 * budget.chunk_minutes
        self.last_step = None if budget.chunk_steps is None else step_before + budget.chunk_steps

    @property
    def seconds(self) -> float:
        return self.before + time.monotonic() - self.start

    def chunk_over(self, step: int) -> bool:
        if self.last_step is not None and step >= self.last_step:
            return True
        return time.monotonic() >= self.deadline


def plot_history(history: History, path: Path, title: str):
    """Loss curves as a PNG (matplotlib, headless)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if history.train:
        steps, values = zip(*history.train)
        ax.plot(steps, values, label="train", linewidth=0.8)
    if history.heldout:
        steps, values = zip(*history.heldout)
        ax.plot(steps, values, label="held-out", marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(path: Path, obj):
    Path(path).write_text(json.dumps(obj, indent=1))


def pick_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device):
    """bf16 autocast on GPU; plain fp32 on CPU (tests)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
