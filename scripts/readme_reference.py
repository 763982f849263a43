"""Regenerate the README's reference tables (config fields, Parquet schema of D) from the code's own docs.

    python scripts/readme_reference.py          # rewrite README.md between the markers
    python scripts/readme_reference.py --check  # exit 1 if README.md is out of date (used by the tests)
"""

import argparse
import sys
from pathlib import Path

from haps_ray.config import describe_config
from haps_ray.dataset import describe_schema

README = Path(__file__).resolve().parent.parent / "README.md"


def config_table() -> str:
    lines = ["| field | default | meaning |", "|---|---|---|"]
    for name, default, help_text in describe_config():
        lines.append(f"| `{name}` | `{default}` | {help_text.replace('|', '/')} |")
    return "\n".join(lines)


SECTIONS = {"config-reference": config_table, "dataset-schema": describe_schema}


def render(text: str) -> str:
    for name, make in SECTIONS.items():
        begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{begin}\n{make()}\n{end}{tail}"
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = README.read_text()
    updated = render(text)
    if args.check:
        if updated != text:
            print("README.md reference tables are stale: run python scripts/readme_reference.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
