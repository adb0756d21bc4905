"""The built-in dashboard page (/dashboard): latency percentiles, throughput and drift, refreshing live from the
service's own /metrics and /drift — useful with no Prometheus or Grafana."""
from __future__ import annotations

from pathlib import Path

PAGE = Path(__file__).with_name("static") / "dashboard.html"


def page() -> str:
    return PAGE.read_text(encoding="utf-8")
