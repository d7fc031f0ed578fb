"""Redo the README's screenshots of the explorer's views on the shipped checkpoints, in Chromium.

Starts the app on `checkpoints/`, opens a deep link (story, checkpoint, latent), and captures the width
links, the intervention and the deep-link views into `test-output/screenshots/docs-*.png`; each is then
saved as a small palette PNG (< 300 KB) in `docs/`.

    python docs/make_screenshots.py [--latent 25] [--run standard] [--width 100]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHOTS = ROOT / "test-output" / "screenshots"
MAX_BYTES = 300_000
from docs.worked_example import STORY, add_checkpoint_args  # noqa: E402 (the same story and flags)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    head, _, rest = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(description=head, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(p)
    p.add_argument("--width", type=int, default=100)
    p.add_argument("--latent", type=int, default=25)
    p.add_argument("--chromium", default=os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))
    return p.parse_args(argv)


def shrink(src: Path, dst: Path) -> int:
    """`src` as a palette PNG at `dst`, scaled down until it is under MAX_BYTES; returns its size."""
    from PIL import Image

    img = Image.open(src).convert("RGB")
    while True:
        img.quantize(colors=128).save(dst, optimize=True)
        size = dst.stat().st_size
        if size < MAX_BYTES:
            return size
        img = img.resize((img.width * 4 // 5, img.height * 4 // 5), Image.LANCZOS)


def capture(page, url: str, args: argparse.Namespace) -> dict[str, Path]:
    from playwright.sync_api import expect

    query = urllib.parse.urlencode({"text": STORY, "model": args.model, "hook": args.hook, "run": args.run,
                                    "F": str(args.width), "latent": str(args.latent)})
    page.goto(url + "?" + query)
    expect(page.locator("#latent-header")).to_contain_text(f"Latent {args.latent}", timeout=60_000)
    shots = {}
    page.locator("#copy-link").click()
    expect(page.locator("#link-box textarea, #link-box input").first).to_have_value(re.compile("latent="))
    shots["view-deep-link"] = SHOTS / "docs-view-deep-link.png"
    page.locator("#story").locator("xpath=../../..").screenshot(path=str(shots["view-deep-link"]))
    page.get_by_role("tab", name="Across widths").click()
    page.locator("#links-btn").click()
    expect(page.locator("#links-status")).to_contain_text(f"Latent {args.latent}", timeout=60_000)
    shots["view-links"] = SHOTS / "docs-view-links.png"
    page.locator("#links-view").screenshot(path=str(shots["view-links"]))
    page.get_by_role("tab", name="Intervene").click()
    page.locator("#iv-btn").click()
    expect(page.locator("#iv-status")).to_contain_text("set to 0", timeout=60_000)
    shots["view-intervene"] = SHOTS / "docs-view-intervene.png"
    page.locator('[role="tabpanel"]:visible').first.screenshot(path=str(shots["view-intervene"]))
    return shots


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from playwright.sync_api import sync_playwright

    from explorer.serve import serve_in_subprocess

    SHOTS.mkdir(parents=True, exist_ok=True)
    with serve_in_subprocess(["--checkpoints", args.checkpoints], env={"HF_HUB_OFFLINE": "1"}, timeout=120) as url:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, headless=True,
                                         args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.set_default_timeout(60_000)
            shots = capture(page, url, args)
            browser.close()
    for name, src in shots.items():
        dst = ROOT / "docs" / f"{name}.png"
        print(f"{dst.relative_to(ROOT)}: {shrink(src, dst) / 1e3:.0f} KB")


if __name__ == "__main__":
    main()
