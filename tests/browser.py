"""Headless Chromium (Debian's /usr/bin/chromium) driven by Playwright, for the page's tests
and benchmarks/ui_latency.py. Nothing is downloaded: Playwright only starts the system browser."""

from __future__ import annotations

import contextlib
import importlib.util
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from playwright.sync_api import Page

CHROMIUM = Path("/usr/bin/chromium")
# The machine's network is closed: nothing in the background may try to reach it.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ANSWER_TIMEOUT_MS = 180_000  # an exact re-rank on a busy 2-core machine takes seconds


def missing() -> str | None:
    """Why the browser cannot run here, or None."""
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is absent (apt-get install chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install -e '.[dev]')"
    return None


@contextlib.contextmanager
def chromium_page() -> Iterator[Page]:
    """A page of a headless Chromium with a fresh profile (--user-data-dir), closed after."""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="chromium-") as profile, sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile,
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
        )
        try:
            yield context.new_page()
        finally:
            context.close()


def open_page(page: Page, url: str) -> None:
    """Load the page and wait until its version panel is filled."""
    page.goto(url)
    page.wait_for_selector("#version-fields dd")


def ask(page: Page, prompt: str, completion: str, **fields: object) -> None:
    """Fill the query form (`fields`: top_k, score_kind, rerank_depth, lexical_candidates)
    and submit it; returns at once."""
    page.fill("textarea[name=prompt]", prompt)
    page.fill("textarea[name=completion]", completion)
    for name, value in fields.items():
        selector = f"[name={name}]"
        if name == "score_kind":
            page.select_option(selector, str(value))
        else:
            page.fill(selector, str(value))
    page.click("button[type=submit]")


def wait_for_answer(page: Page, which: str = "final") -> float:
    """Milliseconds from submit to the page showing the first answer ('first') or the final
    one ('final'), as the page measured them."""
    attribute = "data-first-answer-ms" if which == "first" else "data-final-answer-ms"
    page.wait_for_selector(f"body[{attribute}]", state="attached", timeout=ANSWER_TIMEOUT_MS)
    return float(page.get_attribute("body", attribute))
