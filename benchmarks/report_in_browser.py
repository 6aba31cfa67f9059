"""Open a genadapt HTML report in headless Chromium: no console or page errors, every image loads.

    apt-get install -y chromium && .venv/bin/pip install playwright
    .venv/bin/python benchmarks/report_in_browser.py runs/demo/full/index.html --screenshot docs/demo-report.png

Uses Debian's /usr/bin/chromium through Playwright (no browser download). Follows the links of an
index page to each report and checks them too. Exits non-zero on any problem.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
ALL_IMAGES_LOADED = "Array.from(document.images).map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0])"


def check(page, path: Path, problems: list[str]) -> None:
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(path.resolve().as_uri())
    page.wait_for_load_state("load")
    images = page.evaluate(ALL_IMAGES_LOADED)
    broken = [src for src, ok in images if not ok]
    problems.extend(f"{path}: {e}" for e in errors)
    problems.extend(f"{path}: image did not load: {src}" for src in broken)
    print(f"{path}: {len(images)} images, {len(broken)} broken, {len(errors)} errors")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("report", type=Path)
    parser.add_argument("--screenshot", type=Path)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        check(page, args.report, problems)
        links = page.evaluate("Array.from(document.querySelectorAll('a')).map(a => a.getAttribute('href'))")
        for link in links:
            target = args.report.parent / link
            if target.suffix == ".html" and target.is_file():
                sub = browser.new_page(viewport={"width": 1280, "height": 900})
                check(sub, target, problems)
                if args.screenshot:
                    shot = args.screenshot.with_name(f"{args.screenshot.stem}-{target.parent.name}.png")
                    sub.screenshot(path=str(shot), full_page=False)
                    print(f"screenshot: {shot}")
        if args.screenshot:
            page.screenshot(path=str(args.screenshot), full_page=True)
            print(f"screenshot: {args.screenshot}")
        browser.close()
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
