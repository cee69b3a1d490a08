"""What every benchmark does with its result: JSON, the printed table, the PNG, and (with --docs) its docs section."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def report(result: dict, args, format_table: Callable[[dict], str], plot: Callable[[dict, Path], None],
           write_docs: Callable[[dict, str, Path], None]) -> dict:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    table = format_table(result)
    print(table)
    plot(result, out.with_suffix(".png"))
    if args.docs:
        write_docs(result, table, out)
    print(f"\nwrote {out} and {out.with_suffix('.png')}")
    return result


def grouped_bars(ax, group_labels: list[str], series: list[tuple[str, list[float]]], fontsize: int = 8) -> None:
    """One group of bars per label, one bar per series (label, a value per group), centred on the group's tick."""
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series):
        ax.bar([x + (i - (len(series) - 1) / 2) * width for x in range(len(group_labels))], values, width, label=label)
    ax.set_xticks(range(len(group_labels)), group_labels, fontsize=fontsize)


def bar_chart(path: Path, group_labels: list[str], series: list[tuple[str, list[float]]], ylabel: str, title: str,
              baseline: float | None = None) -> None:
    """A grouped bar chart saved as a PNG (a horizontal line at `baseline` when given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    grouped_bars(ax, group_labels, series)
    if baseline is not None:
        ax.axhline(baseline, color="gray", lw=0.8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
