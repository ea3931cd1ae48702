"""Reporting a summary: the plain-text table, the trade-off plot, and the machine it ran on."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from typing import Any

__all__ = ["format_table", "machine_info", "plot_summary"]


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
    }
    if hasattr(os, "sched_getaffinity"):
        info["usable_cores"] = len(os.sched_getaffinity(0))
    try:
        import llama_cpp

        from sia_edge import kernels

        info["llama_cpp_python"] = llama_cpp.__version__
        info["kernel_isa"] = kernels.active_isa()
    except (ImportError, AttributeError):
        pass
    return info


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """The summary as a plain-text table, one block per prompt set."""
    cols = [("mode", "mode", "s", 16), ("n", "n", "d", 4), ("reward", "mean_reward", "+.3f", 7),
            ("refusal", "refusal_rate", ".1%", 7), ("over-ref", "over_refusal_rate", ".1%", 8),
            ("toxic", "toxic_rate", ".1%", 6),
            ("interv.", "intervention_rate", ".1%", 7), ("V tok/tok", "value_tokens_per_token", ".2f", 9),
            ("ms/tok", "ms_per_token", ".1f", 7), ("drift", "drift", ".3f", 7), ("tokens", "mean_tokens", ".1f", 6)]
    out: list[str] = []
    for name in dict.fromkeys(r["set"] for r in results):
        rows = [r for r in results if r["set"] == name]
        out.append(f"{name} ({rows[0]['kind']}, {rows[0]['n']} prompts)")
        out.append("  ".join(h.rjust(wd) if i else h.ljust(wd) for i, (h, _, _, wd) in enumerate(cols)))
        for r in rows:
            cells = [_fmt(r[key], spec) for _, key, spec, _ in cols]
            widths = [wd for *_, wd in cols]
            out.append("  ".join(c.rjust(wd) if i else c.ljust(wd)
                                 for i, (c, wd) in enumerate(zip(cells, widths, strict=True))))
        out.append("")
    return "\n".join(out)


FAMILY_COLOURS = {"off": "#444444", "sparse": "#1f77b4", "full-entropy": "#17becf", "shift": "#1a9850",
                  "dense": "#d62728", "random": "#ff7f0e", "bon": "#2ca02c", "sparse+bon": "#9467bd"}
SPARE_COLOURS = ["#8c564b", "#e377c2", "#bcbd22", "#7f7f7f", "#aec7e8", "#ffbb78", "#98df8a"]


def plot_summary(results: Sequence[dict[str, Any]], path: str | os.PathLike[str], *, title: str = "") -> None:
    """Reward and refusal rate against intervention rate and against ms per token: one colour per
    mode family, one line style per prompt set (the paper's trade-off figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    sets = list(dict.fromkeys(r["set"] for r in results))
    families = list(dict.fromkeys(r["family"] for r in results))
    styles: list[Any] = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D"]
    spare = iter(SPARE_COLOURS * (1 + len(families) // len(SPARE_COLOURS)))
    colours = {f: FAMILY_COLOURS.get(f) or next(spare) for f in families}
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), squeeze=False)
    panels = [(0, 0, "intervention_rate", "mean_reward"), (0, 1, "ms_per_token", "mean_reward"),
              (1, 0, "intervention_rate", "refusal_rate"), (1, 1, "ms_per_token", "refusal_rate")]
    labels = {"intervention_rate": "intervention rate (junctions / token)", "ms_per_token": "ms per answer token",
              "mean_reward": "mean reward", "refusal_rate": "refusal rate"}
    for row, col, x, y in panels:
        ax = axes[row][col]
        for si, s in enumerate(sets):
            for f in families:
                pts = sorted((r[x], r[y], r["mode"]) for r in results
                             if r["set"] == s and r["family"] == f and r[x] is not None and r[y] is not None)
                if not pts:
                    continue
                ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle=styles[si % len(styles)],
                        marker=markers[si % len(markers)], color=colours[f], markersize=5)
                if f in ("sparse", "random", "full-entropy", "shift") and len(pts) > 1:
                    for px, py, lab in pts:
                        ax.annotate(lab.split("@", 1)[-1], (px, py), fontsize=6, xytext=(3, 3),
                                    textcoords="offset points", color=colours[f])
        ax.set_xlabel(labels[x])
        ax.set_ylabel(labels[y])
        ax.grid(alpha=0.3)
        if y == "refusal_rate":
            ax.set_ylim(-0.03, 1.03)
    handles = [Line2D([], [], color=colours[f], marker="o", label=f) for f in families]
    handles += [Line2D([], [], color="black", linestyle=styles[i % len(styles)], marker=markers[i % len(markers)],
                       label=s) for i, s in enumerate(sets)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), frameon=False)
    fig.suptitle(title or "sia-edge: quality against steering cost")
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    fig.savefig(path, dpi=120)
    plt.close(fig)

