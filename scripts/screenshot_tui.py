"""Make docs/tui.png: the TUI with nano continuing a function, greedy, at 130x40.

    python scripts/screenshot_tui.py [--out docs/tui.png]

Runs the app headless with a throwaway conversation store (your saved chats are not touched),
saves Textual's SVG screenshot and converts it with rsvg-convert. The SVG is marked
xml:space="preserve" first: without it rsvg drops the leading spaces of each line, and code
loses its indentation.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

PROMPT = "def read_config(path):\n"


async def screenshot(svg: Path) -> None:
    from localmix.tui.app import LocalmixApp, PromptArea

    import localmix

    engine = localmix.load("demo", device="cpu", seed=0, temperature=0, max_tokens=60)
    app = LocalmixApp(engine, blink=False)
    async with app.run_test(size=(130, 40)) as pilot:
        app.query_one(PromptArea).text = PROMPT
        app.query_one(PromptArea).focus()
        await pilot.press("enter")
        await app.workers.wait_for_complete()
        await pilot.pause(0.3)
        app.save_screenshot(str(svg))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/tui.png"))
    args = ap.parse_args()
    if shutil.which("rsvg-convert") is None:
        raise SystemExit("needs rsvg-convert (librsvg2-bin)")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LOCALMIX_HOME"] = str(Path(tmp) / "home")
        svg = Path(tmp) / "tui.svg"
        asyncio.run(screenshot(svg))
        svg.write_text(svg.read_text().replace("<svg ", '<svg xml:space="preserve" ', 1))
        subprocess.run(["rsvg-convert", "-w", "1400", str(svg), "-o", str(args.out)], check=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
