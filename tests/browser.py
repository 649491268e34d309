"""A real headless Chromium measuring a report page's layout (tests/test_report_layout.py, test_eval_run.py).

`measure(page, width)` opens a copy of `page` beside it (so its relative image paths resolve) with one script
added, which runs after every image has loaded and writes what it measured into the DOM; `chromium --dump-dom`
prints that DOM. Chromium is Debian's `chromium` package: `make test` installs it through scripts/tools.sh when
it can (root + apt-get); where it cannot, `chromium()` says why and the tests skip with that reason.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MEASURE = """<script>
window.addEventListener("load", () => {
  const box = (el) => el.getBoundingClientRect();
  const result = {
    inner: window.innerWidth,
    scroll: document.documentElement.scrollWidth,
    images: [...document.images].map((i) => ({src: i.getAttribute("src"), loaded: i.complete && i.naturalWidth > 0,
                                               natural: i.naturalWidth, left: box(i).left, right: box(i).right})),
    tables: [...document.querySelectorAll("table")].map((t) => ({right: box(t).right,
                                                                  box: box(t.parentElement).right})),
  };
  const out = document.createElement("pre");
  out.id = "layout-result";
  out.textContent = JSON.stringify(result);
  document.body.appendChild(out);
});
</script>"""


def chromium() -> tuple[str | None, str]:
    """(the browser's path, or None and why not)."""
    for name in (str(REPO / ".tools" / "bin" / "chromium"), "chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found, ""
    return None, ("no chromium on PATH or in .tools/bin: `make tools` (scripts/tools.sh) installs Debian's chromium "
                  "package with apt-get, which needs root and a Debian mirror")


def measure(browser: str, page: Path, width: int, height: int = 900, screenshot: Path | None = None) -> dict:
    """Layout of `page` in a `width` x `height` window: innerWidth, the document's scrollWidth, each image
    (loaded?, natural width, left/right edge) and each table (right edge, right edge of its container)."""
    probe = page.with_name(f".layout-{page.stem}-{width}.html")
    probe.write_text(page.read_text().replace("</body>", MEASURE + "</body>"))
    try:
        with tempfile.TemporaryDirectory(prefix="dolly-chromium-") as profile:
            common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                      "--no-first-run", f"--user-data-dir={profile}", f"--window-size={width},{height}",
                      "--virtual-time-budget=10000"]
            proc = subprocess.run([*common, "--dump-dom", probe.as_uri()], capture_output=True, text=True,
                                  timeout=120)
            if screenshot is not None:  # a tall window: the whole page, to look at
                subprocess.run([*common, f"--window-size={width},3200", f"--screenshot={screenshot}", page.as_uri()],
                               capture_output=True, timeout=120, check=True)
    finally:
        probe.unlink(missing_ok=True)
    found = re.search(r'<pre id="layout-result">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"chromium printed no measurement (rc {proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


def assert_fits(result: dict, width: int, page: Path) -> None:
    """Nothing on the page is wider than the window: no horizontal scrolling, every image loaded and inside the
    window, every table inside its box (a table wider than its box would scroll within it)."""
    where = f"{page.name} at {width} px"
    assert result["inner"] == width, f"{where}: the window is {result['inner']} px wide, not {width}"
    assert result["scroll"] <= result["inner"], f"{where}: the page scrolls sideways ({result['scroll']} px)"
    assert result["images"], f"{where}: no chart on the page"
    for img in result["images"]:
        assert img["loaded"], f"{where}: {img['src']} did not load"
        assert 0 <= img["left"] and img["right"] <= width, f"{where}: {img['src']} is cut off: {img}"
    for t in result["tables"]:
        assert t["right"] <= t["box"] + 0.5, f"{where}: a table is wider than the page ({t})"
