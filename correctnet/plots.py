"""Plots written by the pipeline (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .io import atomic_write  # noqa: E402


def plot_layer_profile(lipschitz: dict[str, float], profile: dict[str, dict[str, float]], path: str | Path,
                       title: str = "") -> Path:
    """Two panels: per-layer Lipschitz constants (bars) and relative output error under chips (line).

    ``profile`` is :func:`correctnet.lipschitz.error_profile`'s output (``"output"`` = model logits).
    """
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    names = list(lipschitz)
    a.bar(range(len(names)), [lipschitz[n] for n in names], color="tab:blue")
    a.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    a.set_ylabel("Lipschitz constant (spectral norm)")
    a.axhline(1.0, color="grey", lw=0.8, ls="--")
    keys = list(profile)
    means = [100 * profile[k]["mean"] for k in keys]
    stds = [100 * profile[k]["std"] for k in keys]
    b.errorbar(range(len(keys)), means, yerr=stds, marker="o", capsize=3, color="tab:red")
    b.set_xticks(range(len(keys)), keys, rotation=45, ha="right", fontsize=8)
    b.set_ylabel("relative error of layer output (%)")
    b.set_ylim(bottom=0)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"), overwrite=True)
    plt.close(fig)
    return path
