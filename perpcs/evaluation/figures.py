"""matplotlib for the evaluation tools: files only (the Agg backend), each PNG written atomically."""
from __future__ import annotations

import io
from pathlib import Path

from perpcs.atomic import write_bytes_atomic


def pyplot():
    import matplotlib
    matplotlib.use("Agg")    # files only, no display
    import matplotlib.pyplot as plt
    return plt


def save_png(fig, path, dpi: int, **savefig_kwargs) -> Path:
    """The figure as a PNG at ``path`` (beside it, then renamed: a half-written plot is never left)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, **savefig_kwargs)
    write_bytes_atomic(path, buffer.getvalue())
    return Path(path)
