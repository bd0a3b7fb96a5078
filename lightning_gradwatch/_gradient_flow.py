"""The gradient-flow picture: each layer's gradient RMS against its depth, on a log axis, a few steps overlaid.

The references' signature of vanishing and exploding gradients is this profile: falling (or rising) exponentially
from the output back to the input. Profiles come from GradientNormLogger's logging steps (no extra work on the
device); a handful spread over the run is kept (the first, then at doubling steps). Drawing needs matplotlib (the
``plots`` extra); without it a one-line notice says so and nothing is drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from lightning.pytorch.utilities import rank_zero_info

_NOTICE = "gradwatch: the gradient-flow picture needs matplotlib (pip install 'lightning-gradwatch[plots]'); skipped."


def matplotlib_pyplot() -> Any:
    """``matplotlib.pyplot`` with a non-interactive backend, or ``None`` (after one notice) when it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        if not GradientFlow.noticed:
            GradientFlow.noticed = True
            rank_zero_info(_NOTICE)
        return None
    return plt


@dataclass
class GradientFlow:
    """Kept profiles: ``(step, layer names in model order, RMS per layer)``, at most ``keep`` of them."""

    keep: int = 6
    milestones: list[tuple[int, list[str], list[float]]] = field(default_factory=list)
    latest: tuple[int, list[str], list[float]] | None = None
    noticed = False  # class-wide: the missing-matplotlib notice is printed once

    @property
    def profiles(self) -> list[tuple[int, list[str], list[float]]]:
        """The milestones (the first step, then each at least twice as far into the run) and the latest."""
        latest = [self.latest] if self.latest is not None and self.latest[0] != self.milestones[-1][0] else []
        return self.milestones + latest

    def add(self, step: int, names: list[str], rms: list[float]) -> None:
        """Remember this step's profile: as a milestone when it is twice as far into the run as the last one (the
        early steps, where most change happens, get more), and as the latest."""
        profile = (step, list(names), list(rms))
        if not self.milestones or step + 1 >= 2 * (self.milestones[-1][0] + 1):
            self.milestones.append(profile)
            if len(self.milestones) > self.keep - 1:
                del self.milestones[1]  # keep the first, thin the early middle
        self.latest = profile

    def figure(self) -> Any:
        """A matplotlib figure of the kept profiles, or ``None`` without matplotlib or profiles."""
        plt = matplotlib_pyplot()
        if plt is None or not self.profiles:
            return None
        names = self.profiles[-1][1]
        fig, ax = plt.subplots(figsize=(max(6.0, min(16.0, 0.25 * len(names))), 4.0), dpi=100)
        cmap = plt.get_cmap("viridis")
        for i, (step, layer_names, rms) in enumerate(self.profiles):
            index = {n: j for j, n in enumerate(layer_names)}
            points = [(index[n], v) for n, v in zip(layer_names, rms, strict=True) if v > 0 and math.isfinite(v)]
            if points:
                xs, ys = zip(*points, strict=True)
                color = cmap(i / max(1, len(self.profiles) - 1))
                ax.plot(xs, ys, marker="o", markersize=3, color=color, label=f"step {step}")
        ax.set_yscale("log")
        ax.set_xlabel("layer (input to output)")
        ax.set_ylabel("gradient RMS (non-zero elements)")
        ax.set_title("gradwatch: gradient flow across depth")
        stride = max(1, math.ceil(len(names) / 24))
        ax.set_xticks(range(0, len(names), stride))
        ax.set_xticklabels(names[::stride], rotation=60, ha="right", fontsize=7)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        return fig

    def save(self, path: str) -> bool:
        """Draw the picture to ``path`` (PNG); ``False`` when it cannot be drawn."""
        fig = self.figure()
        if fig is None:
            return False
        fig.savefig(path)
        matplotlib_pyplot().close(fig)
        return True
