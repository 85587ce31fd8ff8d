"""Print README.md's table of the model server's settings, made from their declarations in
service/config.py; `--update` writes it into README.md in place of the old one.

    .venv/bin/python scripts/settings_table.py [--update]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.config import markdown_table  # noqa: E402

README = ROOT / "README.md"
HEADING = "#### Model server ("  # the table follows this heading, after one blank line


def readme_table(text: str) -> tuple[int, int]:
    """Where README.md's settings table is: the [start, end) offsets of its lines."""
    heading = text.index(HEADING)
    start = text.index("\n|", heading) + 1
    end = text.find("\n\n", start)
    return start, (len(text) if end < 0 else end + 1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--update", action="store_true", help="write the table into README.md")
    args = p.parse_args()
    table = markdown_table()
    if not args.update:
        sys.stdout.write(table)
        return 0
    text = README.read_text()
    start, end = readme_table(text)
    README.write_text(text[:start] + table + text[end:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
