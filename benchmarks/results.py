"""Writing one benchmark's section of benchmarks/RESULTS.md in place.

    write_section(Path("benchmarks/RESULTS.md"), "Episodes", markdown)   # replaces "## Episodes" up to the next "## "
"""

from __future__ import annotations

import re
from pathlib import Path


def write_section(path: Path, heading: str, text: str) -> None:
    """Replace the `## <heading>` section of `path` (up to the next `## ` heading) with `text`, or append it."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^## {re.escape(heading)}\n.*?(?=^## |\Z)", re.M | re.S)
    new = pattern.sub(lambda _: text + "\n", old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    path.write_text(new)
