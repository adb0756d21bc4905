"""The chat playground (/playground): try the served model by hand in a browser.

One self-contained HTML file (inline CSS and vanilla JS, no external resources). It calls the relative URLs
"v1/models" and "v1/chat/completions" with streaming, so it works behind a path prefix, and shows per reply the time
to first token, tokens/s and the finish reason; API errors (400 with the field, 401, 429 with Retry-After) in plain
words. Open by default like /dashboard (the page holds nothing; its API calls need the key when the server has one,
which the page asks for); drop it from auth.open_routes to put the page itself behind the key."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

PAGE = Path(__file__).with_name("static") / "playground.html"


@lru_cache(maxsize=1)
def page() -> str:
    """The page's HTML (read once)."""
    return PAGE.read_text(encoding="utf-8")
