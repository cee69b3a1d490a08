"""What `transfertune eval` writes: the markdown table, the plot, gap closed, and sections of a docs file."""
from __future__ import annotations

import fcntl
import json
from pathlib import Path


def metric_of(row: dict) -> tuple[str, float] | None:
    for key in ("accuracy", "exact_match"):
        if key in row:
            return key, row[key]
    return None


MIN_ACCURACY_GAP = 0.05


def add_gap_closed(rows: list[dict]) -> None:
    """gap_closed_<metric> = (m - m(target)) / (m(target_ft) - m(target)) for every evaluated row. Left undefined
    for accuracy / exact match when fine-tuning moved the target by less than MIN_ACCURACY_GAP: a ratio over a
    difference of one or two examples is noise."""
    index = {(r["target"], r["task"], r["label"]): r for r in rows}
    for r in rows:
        base, oracle = index.get((r["target"], r["task"], "target")), index.get((r["target"], r["task"], "target_ft"))
        if not base or not oracle:
            continue
        for key in ("nll", "accuracy", "exact_match"):
            if key not in r or key not in base or key not in oracle:
                continue
            if abs(oracle[key] - base[key]) >= (MIN_ACCURACY_GAP if key != "nll" else 1e-9):
                r[f"gap_closed_{key}"] = round((r[key] - base[key]) / (oracle[key] - base[key]), 4)


def format_markdown(result: dict) -> str:
    """The results table; with a shifted split (EvalConfig.shifted), two more columns: the metric on it and the
    share kept (shifted / in distribution)."""
    rows = result["rows"]
    shifted = next((r["shifted_split"] for r in rows if r.get("shifted_split")), None)
    extra_head = f" acc / EM on {shifted} | kept |" if shifted else ""
    head = "| target | task | method | NLL | acc / EM | gap closed (NLL) | gap closed (acc/EM) | s/token |"
    lines = [head + extra_head,
             "|---|---|---|---|---|---|---|---|" + ("---|---|" if shifted else "")]
    fmt = lambda v, spec=".3f": "-" if v is None else format(v, spec)  # noqa: E731
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['target']} | {r['task']} | {r['label']} | n/a: {r['skipped']} |  |  |  |  |"
                         + ("  |  |" if shifted else ""))
            continue
        m = metric_of(r)
        gap_m = r.get(f"gap_closed_{m[0]}") if m else None
        per_token = r.get("seconds_per_token")
        line = (f"| {r['target']} | {r['task']} | {r['label']} | {fmt(r.get('nll'))} | {fmt(m[1] if m else None)} "
                f"| {fmt(r.get('gap_closed_nll'), '.2f')} | {fmt(gap_m, '.2f')} "
                f"| {'-' if per_token is None else f'{per_token * 1e3:.2f} ms'} |")
        if shifted:
            moved = r.get(f"shifted_{m[0]}") if m else None
            kept = r.get("share_kept")
            line += f" {fmt(moved) if r.get('shifted_split') else 'n/a'} | {'-' if kept is None else f'{kept:.0%}'} |"
        lines.append(line)
    notes = truncation_notes(rows)
    return "\n".join(lines + ([""] + [f"Note: {n}." for n in notes] if notes else []))


def truncation_notes(rows: list[dict]) -> list[str]:
    """One line per (target, task) whose held-out prompts lost tokens from the left to fit the context."""
    most: dict[tuple, tuple[int, int]] = {}
    for r in rows:
        if r.get("truncated_prompts"):
            key = (r["target"], r["task"])
            most[key] = max(most.get(key, (0, 0)), (r["truncated_prompts"], r["n"]))
    return [f"{task} on {target}: {k} of {n} held-out prompts lost tokens from the left to fit the context"
            for (target, task), (k, n) in most.items()]


def plot(result: dict, path: Path) -> None:
    """One panel of held-out NLL per task, and one of the NLL gap closed by target + value when it was measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "nll" in r]
    tasks = list(result.get("tasks") or result["config"]["tasks"])
    targets = result["config"]["targets"]
    gaps = {task: [(t, r["gap_closed_nll"]) for t in targets for r in rows if r["task"] == task and r["target"] == t
                   and r["method"] == "target+value" and r.get("gap_closed_nll") is not None] for task in tasks}
    gaps = {task: pts for task, pts in gaps.items() if pts}
    panels = len(tasks) + (1 if gaps else 0)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 4), squeeze=False)
    labels = list(dict.fromkeys(r["label"] for r in rows))
    for ax, task in zip(axes[0], tasks):
        width = 0.8 / max(1, len(targets))
        for i, target in enumerate(targets):
            vals = {r["label"]: r["nll"] for r in rows if r["task"] == task and r["target"] == target}
            ax.bar([x + i * width for x in range(len(labels))], [vals.get(lbl, 0) for lbl in labels], width,
                   label=target)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], labels, rotation=60, fontsize=7,
                      ha="right")
        ax.set_title(f"{task}: held-out NLL (lower is better)", fontsize=9)
        if labels:
            ax.legend(fontsize=7)
    if gaps:
        ax = axes[0][-1]
        for task, pts in gaps.items():
            ax.plot([t for t, _ in pts], [g for _, g in pts], marker="o", label=task)
        ax.axhline(0, color="gray", lw=0.8)
        ax.axhline(1, color="gray", lw=0.8, ls="--")
        ax.set_title("target + value: NLL gap closed vs target", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_docs(result: dict, table: str, path: Path, png: Path, section: str = "main",
               title: str | None = None, overwrite: bool = False) -> None:
    c = result["config"]
    v = c["value"]
    body = f"""## {title or section}

Written by `transfertune eval` (config below); do not edit by hand. ![{section}](results-{section}.png)

Source `{c['source']}`; split `{c['split']}`{shifted_note(c)} ({c['eval_examples']} examples per task); value model
{v['max_steps']} steps (l1 {v['l1_coef']}, entropy {v['entropy_coef']}{defer_note(result)}), source fine-tuning
{c['finetune_steps']} steps, target oracles {c['target_steps']} steps.{user_data_lines(result)}

{table}

<details><summary>config</summary>

```json
{json.dumps(c, indent=2)}
```
</details>
"""
    write_doc_section(path, section, body, png, overwrite=overwrite)


def defer_note(result: dict) -> str:
    """How the value model treated the tasks' "deferred" answer tails, when a task has them."""
    if not any(t.get("deferred") for t in result.get("tasks", {}).values()):
        return ""
    if result["config"]["value"].get("defer", True):
        return "; the answer after the rows' `deferred` mark is left to the base"
    return "; trained on whole responses, the rows' `deferred` tails included"


def user_data_lines(result: dict) -> str:
    """A line per task read from the user's files: where from, kind, and how it was split."""
    lines = []
    for name, t in (result.get("tasks") or {}).items():
        if "files" in t:
            how = "split as given" if t.get("presplit") else \
                f"split by {t['split_by']}, {t['heldout_fraction']:g} held out (seed {t['split_seed']})"
            sizes = ", ".join(f"{k} {v}" for k, v in t["sizes"].items())
            lines.append(f"- `{name}`: {t['kind']} from {', '.join(f'`{f}`' for f in t['files'])}; {how} ({sizes})")
    return "\n\n" + "\n".join(lines) if lines else ""


DOC_HEADING = "# Transfer results"


def check_doc_file(path: Path, section: str = "main", png: bool = True, heading: str = DOC_HEADING,
                   overwrite: bool = False) -> None:
    """Refuse a file that write_doc_section would change although transfertune did not write it: one that is
    not markdown (.md), or a markdown file with no `<!-- section: NAME -->` block that does not start with
    `heading` (an empty file is fine). For a new file, `results-NAME.png` beside it is not replaced unless
    `overwrite` (beside a file transfertune wrote, it is that file's plot)."""
    from transfertune.io.validate import InputError

    path = Path(path)
    if path.suffix.lower() not in (".md", ".markdown"):
        raise InputError(f"--docs {path} is not a markdown file (.md): the report is written into one as a section")
    if path.exists() or path.is_symlink():
        if not path.is_file():
            raise InputError(f"--docs {path} is not a regular file: give a markdown file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            text = None
        if text is None or (text.strip() and "<!-- section: " not in text and not text.startswith(heading)):
            raise InputError(f"--docs {path} is a file transfertune did not write (no <!-- section: NAME --> block, "
                             f"no '{heading}' heading): the report would be added to it. Choose a new file, or put "
                             f"the lines <!-- section: {section} --> and <!-- /section: {section} --> where it may go")
    elif png and not overwrite:
        image = path.parent / f"results-{section}.png"
        if image.exists() or image.is_symlink():
            raise InputError(f"--docs {path} is a new file, but {image} already exists beside it, where the plot of "
                             f"section {section} goes: pass --overwrite to replace it, or choose another --docs or "
                             f"--docs-section")


def write_doc_section(path: Path, section: str, body: str, png: Path | None = None,
                      heading: str = DOC_HEADING, overwrite: bool = False) -> None:
    """Replace (or append) the block between `<!-- section: NAME -->` markers, keeping the rest of the file;
    `png` is copied beside it as `results-NAME.png`, the name the body links to. A file transfertune did not
    write is refused (check_doc_file)."""
    import shutil

    check_doc_file(path, section, png is not None, heading, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    if png is not None:
        shutil.copyfile(png, path.parent / f"results-{section}.png")
    start, end = f"<!-- section: {section} -->", f"<!-- /section: {section} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    with path.open("a") as held:  # evals writing other sections of the same file may finish side by side
        fcntl.flock(held, fcntl.LOCK_EX)
        text = path.read_text() or heading + "\n"
        if start in text and end in text:
            text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
        path.write_text(text)


def shifted_note(config: dict) -> str:
    if not config.get("shifted"):
        return ""
    return (f", and the prompt-shifted `{config['shifted']}` (phrasings and stories nothing was trained or tuned on; "
            f"evaluation/builtin_tasks/SHIFTED.md) beside it, \"kept\" = shifted / in distribution")
