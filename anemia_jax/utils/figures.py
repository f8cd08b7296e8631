"""PNG figures with matplotlib, an optional dependency (``pip install 'anemia_jax[report]'``).

matplotlib is imported only when a figure is asked for (`pyplot`), with the non-interactive Agg backend, and its
absence raises an ImportError saying what to install. `save` writes a figure atomically (complete under its name or
absent) and closes it.
"""

from __future__ import annotations

import math
import pathlib

from anemia_jax.utils import atomic

__all__ = ["grid", "pyplot", "save"]

_DPI = 110


def pyplot():
    """matplotlib.pyplot with the Agg backend; ImportError (saying what to install) without matplotlib."""
    try:
        import matplotlib  # noqa: PLC0415 -- optional dependency, imported only when a figure is asked for
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install 'anemia_jax[report]' (or pip install "
                          "'matplotlib>=3.9').") from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def grid(plt, count: int, size: float = 3.6):
    """A figure of ``count`` square panels of ``size`` inches, at most 3 per row; returns ``(fig, axes)``."""
    cols = min(count, 3)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    for ax in axes.ravel()[count:]:
        ax.set_visible(False)
    return fig, axes.ravel()


def save(fig, path: str | pathlib.Path) -> pathlib.Path:
    """Writes ``fig`` as a PNG at ``path`` (atomically) and closes it; returns the path."""
    path = pathlib.Path(path)
    atomic.ensure_dir(path.parent)
    fig.tight_layout()
    try:
        with atomic.open_atomic(path, "wb") as f:  # complete under its name or absent
            fig.savefig(f, dpi=_DPI, format="png")
    finally:
        pyplot().close(fig)  # pyplot keeps every open figure alive otherwise
    return path
