"""PNG plots for the report (matplotlib, Agg backend). Each function takes plain data and a
path, writes one PNG, and returns the path."""

from __future__ import annotations

import math

from pathlib import Path

ROLE_COLORS = {
    "q_proj": "#1f77b4", "k_proj": "#aec7e8", "v_proj": "#ff7f0e", "o_proj": "#ffbb78",
    "gate_proj": "#2ca02c", "up_proj": "#98df8a", "down_proj": "#d62728", "conv": "#9467bd",
    "fc": "#8c564b", "lm_head": "#e377c2", "embed": "#7f7f7f",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _color(role: str) -> str:
    return ROLE_COLORS.get(role, "#17becf" if role.startswith("experts") else "#bcbd22")


def _legend(ax, roles: list[str]) -> None:
    from matplotlib.patches import Patch

    seen = list(dict.fromkeys(roles))
    ax.legend(handles=[Patch(color=_color(r), label=r) for r in seen], fontsize=7, ncol=min(len(seen), 7),
              loc="upper left", frameon=False)


def _unit_bars(values: list[float], roles: list[str], path: Path, ylabel: str, title: str, xlabel: str,
               log: bool, height: float) -> Path:
    """One bar per unit in model order, coloured by projection type."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(8, len(values) * 0.05), height))
    ax.bar(range(len(values)), values, color=[_color(r) for r in roles], width=1.0)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    _legend(ax, roles)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sensitivity_bars(units: list[dict], option: str, path: Path, title: str) -> Path:
    """Estimated error of `option` per unit (log scale), units in model order, coloured by
    projection type; a unit that cannot take the option (its shape) gets no bar."""
    errs = [max(next((o["error"] for o in u["options"] if o["option"] == option), math.nan), 1e-30) for u in units]
    return _unit_bars(errs, [u["role"] for u in units], path, f"estimated error at {option}", title,
                      "unit (model order: blocks left to right)", log=True, height=3.6)


def bits_per_unit(units: list[dict], bits_per_weight: list[float], path: Path, title: str) -> Path:
    """The chosen all-in bits per weight of every unit, coloured by projection type."""
    return _unit_bars(bits_per_weight, [u["role"] for u in units], path, "bits per weight (all-in)", title,
                      "unit (model order)", log=False, height=3.2)


def frontier_plot(curve: list[dict], measured: list[dict], uniform: list[dict], metric: str, path: Path,
                  title: str) -> Path:
    """Predicted error along the frontier (left axis) and measured KL of plans along it and
    of uniform formats (right axis), against all-in bits per weight."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([p["bits_per_weight"] for p in curve], [p["predicted_error"] for p in curve], "-", color="#1f77b4",
            label="predicted error (frontier)")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (all-in, quantized units)")
    ax.set_ylabel("predicted error (sum over units)", color="#1f77b4")
    ax2 = ax.twinx()
    if measured:
        ax2.plot([m["bits_per_weight"] for m in measured], [m["measured"] for m in measured], "o", color="#d62728",
                 label="measured, mixed plans")
    if uniform:
        ax2.plot([m["bits_per_weight"] for m in uniform], [m["measured"] for m in uniform], "s", color="#7f7f7f",
                 label="measured, uniform formats")
    ax2.set_yscale("log")
    ax2.set_ylabel(f"measured {metric}", color="#d62728")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="upper right", frameon=False)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
