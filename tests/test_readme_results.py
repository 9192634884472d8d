"""The README's result tables are the benchmarks' own output (benchmarks/readme.py), never typed by hand."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "benchmarks" / "readme.py")
readme = importlib.util.module_from_spec(spec)
spec.loader.exec_module(readme)


def test_blocks_are_replaced_by_their_result_files(tmp_path):
    (tmp_path / "a.md").write_text("| x |\n|---|\n| 1 |\n")
    text = "intro\n<!-- results: a -->\nold table\n<!-- /results -->\nend\n"
    assert readme.render(text, tmp_path) == "intro\n<!-- results: a -->\n| x |\n|---|\n| 1 |\n<!-- /results -->\nend\n"
    with pytest.raises(SystemExit, match="no result file"):
        readme.render("<!-- results: missing -->\n<!-- /results -->", tmp_path)


def test_the_readme_matches_the_benchmark_results():
    assert readme.main(["--check"]) == 0, "run python benchmarks/readme.py after the benchmarks"
