#!/usr/bin/env python
"""Write .env.example and the README's configuration table from ivr_daemon.config.VARIABLES."""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ivr_daemon.config import VARIABLES  # noqa: E402


def table_cell(text: str) -> str:
    """A GitHub-flavoured Markdown table cell: a bare ``|`` would end the cell, even inside code."""
    return text.replace("|", "\\|")


def main() -> int:
    lines = ["# ivr_daemon settings: copy to .env and edit. Real environment variables win over this file.",
             "# Every value shown is the embedded default.", ""]
    for name, _field, default, meaning in VARIABLES:
        lines += [f"# {meaning}", f'{name}="{default}"' if " " in default else f"{name}={default}", ""]
    (ROOT / ".env.example").write_text("\n".join(lines))

    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, _field, default, meaning in VARIABLES:
        shown = f"`{default if len(default) < 40 else default[:37] + '...'}`" if default else "(empty)"
        rows.append(f"| `{name}` | {table_cell(shown)} | {table_cell(meaning)} |")
    readme = (ROOT / "README.md").read_text()
    readme = re.sub(r"\| variable \| default \| meaning \|\n(?:\|.*\|\n)+", "\n".join(rows) + "\n", readme, count=1)
    (ROOT / "README.md").write_text(readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
