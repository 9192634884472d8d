"""Put benchmark result tables into the README: the tables are generated, never typed by hand.

    python benchmarks/readme.py           # rewrite README.md's result blocks from benchmarks/results/*.md
    python benchmarks/readme.py --check   # exit 1 if a block differs from its result file

A result block in README.md is

    <!-- results: NAME -->
    ...replaced by benchmarks/results/NAME.md...
    <!-- /results -->

and each `benchmarks/results/NAME.md` is written by a benchmark's `--out` option (its first line
names the command that made it), so rerunning the benchmark and then this script updates the README.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BLOCK = re.compile(r"(<!-- results: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)


def render(readme: str, results: Path = RESULTS) -> str:
    """`readme` with every result block replaced by its result file (a missing file is an error)."""
    def body(m: re.Match[str]) -> str:
        path = results / f"{m.group('name')}.md"
        if not path.is_file():
            raise SystemExit(f"error: README block {m.group('name')!r} has no result file {path}; run its benchmark "
                             "with --out")
        return m.group(1) + path.read_text().rstrip() + "\n" + m.group(4)
    return BLOCK.sub(body, readme)


def main(argv: list[str] | None = None) -> int:
    """Rewrite (or check) README.md's result blocks."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if README.md is not up to date")
    ap.add_argument("--readme", default=str(ROOT / "README.md"))
    args = ap.parse_args(argv)
    path = Path(args.readme)
    text = path.read_text()
    new = render(text)
    names = [m.group("name") for m in BLOCK.finditer(text)]
    if args.check:
        if new != text:
            print(f"README.md result blocks are out of date; run python benchmarks/readme.py ({', '.join(names)})")
            return 1
        print(f"README.md result blocks up to date: {', '.join(names)}")
        return 0
    path.write_text(new)
    print(f"README.md: {len(names)} result blocks written: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
