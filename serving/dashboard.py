"""The built-in dashboard page (/dashboard): latency percentiles, throughput and drift, refreshing live from the
service's own /metrics and /drift — useful with no Prometheus or Grafana.

One self-contained HTML file (inline CSS and vanilla JS, SVG charts, no external resources: it works offline). It
fetches the relative URLs "metrics" and "drift", so it works behind a path prefix, and keeps the last 10 minutes of
scrapes in the browser. Query parameters: ?refresh=SECONDS (default 2), ?window=SECONDS (the latency window, default
60)."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

PAGE = Path(__file__).with_name("static") / "dashboard.html"


@lru_cache(maxsize=1)
def page() -> str:
    """The page's HTML (read once)."""
    return PAGE.read_text(encoding="utf-8")
