"""Regenerate the README's config reference table from the config dataclasses' help text.

    python scripts/config_reference.py          # rewrite README.md between the markers
    python scripts/config_reference.py --check  # exit 1 if README.md is out of date (used by the tests)
"""

import argparse
import sys
from pathlib import Path

from haps_ray.config import describe_config

BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"
README = Path(__file__).resolve().parent.parent / "README.md"


def render() -> str:
    lines = ["| field | default | meaning |", "|---|---|---|"]
    for name, default, help_text in describe_config():
        lines.append(f"| `{name}` | `{default}` | {help_text.replace('|', '/')} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = README.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    updated = f"{head}{BEGIN}\n{render()}\n{END}{tail}"
    if args.check:
        if updated != text:
            print("README.md config reference is stale: run python scripts/config_reference.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
