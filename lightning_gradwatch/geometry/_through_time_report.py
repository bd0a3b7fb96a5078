"""What GradientsThroughTime found at a probe, and its picture: each recurrent module's sensitivity against the lag,
on a log axis, the last probes overlaid (TensorBoard and the health report's folder; needs matplotlib)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl

from lightning_gradwatch._gradient_flow import matplotlib_pyplot
from lightning_gradwatch._reporting import tensorboard_writers


@dataclass
class HorizonReading:
    """One recurrent module at one probe: the sequence ``length``, the ``horizon`` (the first lag whose sensitivity
    is below the threshold, the shortest of its directions), that direction's ``decay`` per timestep, the largest
    sensitivity past lag 0 (``peak``, at ``peak_lag``) and each direction's profile (lag 0 first)."""

    name: str
    length: int
    horizon: int
    decay: float
    peak: float
    peak_lag: int
    profiles: list[list[float]] = field(default_factory=list)
    #: ``peak`` is that of the product of the state Jacobians (how the recurrence amplifies a change of its state),
    #: not of the input profile (measured so where the module runs in one direction)
    peak_of_state: bool = False


Probes = list[tuple[int, list[HorizonReading]]]


def profile_figure(history: Probes) -> Any:
    """A matplotlib figure of the probes' profiles (one panel per module), or ``None`` without matplotlib."""
    plt = matplotlib_pyplot()
    if plt is None or not history:
        return None
    names = [r.name for r in history[-1][1]]
    fig, axes = plt.subplots(1, len(names), figsize=(5.0 * len(names), 3.6), dpi=100, squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, name in zip(axes[0], names, strict=True):
        for i, (step, readings) in enumerate(history):
            color = cmap(i / max(1, len(history) - 1))
            for r in (r for r in readings if r.name == name):
                for d, profile in enumerate(r.profiles):
                    points = [(k, v) for k, v in enumerate(profile) if v > 0 and math.isfinite(v)]
                    if points:
                        xs, ys = zip(*points, strict=True)
                        label = f"step {step}" + (" (backward)" if d else "")
                        ax.plot(xs, ys, color=color, linestyle="--" if d else "-", label=label)
        ax.set_yscale("log")
        ax.set_xlabel("lag (timesteps back from the last output)")
        ax.set_ylabel("sensitivity / lag 0")
        ax.set_title(f"{name}: gradient through time", fontsize=9)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def draw_profiles(history: Probes, path: str) -> bool:
    """Save the picture to ``path`` (PNG); ``False`` when it cannot be drawn."""
    fig = profile_figure(history)
    if fig is None:
        return False
    fig.savefig(path)
    matplotlib_pyplot().close(fig)
    return True


def write_profiles(trainer: pl.Trainer, history: Probes, step: int) -> None:
    """The picture as ``gradwatch/through_time/profile`` in every TensorBoard logger (rank zero)."""
    writers = tensorboard_writers(trainer)
    if not writers:
        return
    fig = profile_figure(history)
    if fig is None:
        return
    for writer in writers:
        writer.add_figure("gradwatch/through_time/profile", fig, global_step=step, close=False)
    matplotlib_pyplot().close(fig)
