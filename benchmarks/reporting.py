"""What every benchmark does with its result: JSON, the printed table, the PNG, and (with --docs) its docs section."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


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
