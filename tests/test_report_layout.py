"""The HTML reports fit the page: compare.html rendered in a real headless Chromium at 1280 and 800 px has no
horizontal overflow, its chart loaded and inside the window (report.html of a real vLLM run: test_eval_run.py).
Issue 29: the per-category chart was 1,309 px wide and cut off the last category at 1280 px."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from browser import assert_fits, chromium, measure
from test_eval_compare import degrade, references, write_run

from evaluator.cli import main

# Dolly-15k's eight categories, the longest names included: the chart's widest realistic case.
DOLLY_CATEGORIES = ("brainstorming", "classification", "closed_qa", "creative_writing", "general_qa",
                    "information_extraction", "open_qa", "summarization")
WIDTHS = (1280, 800)


@pytest.fixture(scope="module")
def browser() -> str:
    path, why = chromium()
    if path is None:
        pytest.skip(why)
    return path


def screenshot_dir() -> Path | None:
    """DOLLY_SCREENSHOTS=DIR keeps a screenshot of every page and width there, to look at."""
    d = os.environ.get("DOLLY_SCREENSHOTS")
    return Path(d) if d else None


def check_page(browser: str, page: Path) -> None:
    shots = screenshot_dir()
    for width in WIDTHS:
        shot = shots / f"{page.stem}-{width}.png" if shots else None
        assert_fits(measure(browser, page, width, screenshot=shot), width, page)


def test_compare_html_fits_at_1280_and_800_px(browser, tmp_path):
    refs = references(160)
    base = write_run(tmp_path / "base", refs, degrade(refs, 0.4, seed=1), categories=DOLLY_CATEGORIES)
    tuned = write_run(tmp_path / "tuned", refs, degrade(refs, 0.7, seed=2), categories=DOLLY_CATEGORIES)
    assert main(["compare", str(base), str(tuned), "--out", str(tmp_path / "cmp"), "--permutations", "500",
                 "--bootstrap-resamples", "200"]) == 0
    check_page(browser, tmp_path / "cmp" / "compare.html")
