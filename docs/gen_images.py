"""Redraw the pictures under docs/images/ with normkit.explain (matplotlib needed).

    python docs/gen_images.py              # into docs/images/
    python docs/gen_images.py OUT_DIR      # somewhere else

Writes one PNG per name in ``normkit.explain.NORMS`` and ``overview.png`` (the five norms side by
side). ``normkit explain all --out DIR`` does the same from the command line.
"""

from __future__ import annotations

import sys
from pathlib import Path

from normkit import explain


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else Path(__file__).resolve().parent / "images"
    for path in explain.draw_all(out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
