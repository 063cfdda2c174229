"""Render ``report.html`` in headless Chromium: a screenshot, and which figures loaded.

    python -m moespec.report.browser runs/demo/report/report.html --screenshot page.png

Uses the ``chromium`` of the system (Debian's package: ``apt-get install chromium``); nothing
is fetched. Exits 1 when a figure of the page did not load, 2 on bad input (one ``error:``
line).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..cli import fail

#: Marks each <img> after the page loaded: data-loaded="yes" when it decoded to a picture.
MARK_SCRIPT = """<script>
window.addEventListener("load", () => { for (const im of document.images) {
  im.setAttribute("data-loaded", im.complete && im.naturalWidth > 0 ? "yes" : "no"); } });
</script>"""


def chromium() -> str | None:
    """Path of the chromium binary, or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


#: Headless, no sandbox (root in a container), no GPU, /tmp instead of a small /dev/shm, and
#: nothing that reaches the network.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", "--no-default-browser-check")  # fmt: skip


def _run(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    binary = chromium()
    if binary is None:
        raise FileNotFoundError("no chromium on PATH (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        cmd = [binary, *FLAGS, f"--user-data-dir={profile}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def screenshot(page: Path, png: Path, width: int = 1400, height: int = 2400) -> Path:
    """A PNG of the top ``width`` × ``height`` pixels of the rendered page."""
    proc = _run([f"--screenshot={png.resolve()}", f"--window-size={width},{height}",
                 "--hide-scrollbars", page.resolve().as_uri()], timeout=180)  # fmt: skip
    if not png.is_file():
        raise RuntimeError(f"chromium wrote no screenshot: {proc.stderr[-500:]}")
    return png


def to_palette(png: Path, colors: int) -> Path:
    """Rewrite ``png`` with at most ``colors`` colours (a small file for docs)."""
    from PIL import Image

    with Image.open(png) as im:
        small = im.convert("RGB").quantize(colors)
    small.save(png, optimize=True)
    return png


def image_status(page: Path) -> tuple[int, int]:
    """(images that loaded, images) of the page, from the DOM after load."""
    with tempfile.TemporaryDirectory() as tmp:
        marked = Path(tmp) / page.name
        marked.write_text(page.read_text().replace("</body>", MARK_SCRIPT + "</body>", 1))
        proc = _run(["--virtual-time-budget=10000", "--dump-dom", marked.as_uri()], timeout=180)
    dom = proc.stdout
    total = len(re.findall(r"<img\b", dom))
    return len(re.findall(r'<img\b[^>]*data-loaded="yes"', dom)), total


def main(argv: list[str] | None = None) -> None:
    """Screenshot a report and print how many of its figures loaded."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("page", type=Path)
    p.add_argument("--screenshot", type=Path, required=True)
    p.add_argument("--width", type=int, default=1400)
    p.add_argument("--height", type=int, default=2400)
    p.add_argument("--colors", type=int, default=0, help="palette PNG of N colours (0: full)")
    args = p.parse_args(argv)
    if not args.page.is_file():
        fail(f"{args.page}: no such file (give a report.html)")
    try:
        screenshot(args.page, args.screenshot, args.width, args.height)
        if args.colors:
            to_palette(args.screenshot, args.colors)
        loaded, total = image_status(args.page)
    except (FileNotFoundError, RuntimeError, subprocess.TimeoutExpired) as err:
        fail(err)
    print(f"{args.screenshot}: {loaded} of {total} figures loaded")
    if loaded < total:
        sys.exit(1)


if __name__ == "__main__":
    main()
