"""Print the fault-injection table: every file of a finished and of an interrupted toy experiment, deleted,
cut to half or garbled, then `trials`, `report` and `resume` (up to where Ray would start) run on it.

    python benchmarks/faults_table.py [--out DIR]

Each row: the exit code (`ray`: resume got as far as starting Ray, with the directory healed) and the
outcome (the one error line, or the repair lines), judged by efficientllava.testing.faults.run_case.
Exit status 1 if any row fails its judgement. No Ray, no model: about 3 minutes on 2 busy cores.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from efficientllava.testing.faults import fault_table, format_table


def main(argv: list[str] | None = None) -> int:
    """Build the experiments, run every case, print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="working folder (default: a temporary one)")
    args = p.parse_args(argv)
    folder = Path(args.out or tempfile.mkdtemp(prefix="faults-"))
    t0 = time.time()
    rows = fault_table(folder)
    print(format_table(rows))
    bad = [r for r in rows if not r.ok]
    print(f"\n{len(rows)} cases, {len(bad)} failed, {time.time() - t0:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
