"""`llmstack drift report`: an HTML drift report of the request log against the reference (our own plots with
matplotlib: Evidently 0.7 pulls pandas/plotly/nltk/scikit-learn pins into an environment that already balances
optimum-onnx, transformers and bentoml, for one report)."""
from __future__ import annotations

import base64
import html
import io
import time
from pathlib import Path

import numpy as np

from core.errors import DataError

from . import drift, requestlog


def build(log_path: str | Path, reference: drift.Reference, out: str | Path, last: int | None = None,
          since: float | None = None, method: str = "auto", share: float = 0.5, min_rows: int = 30) -> dict:
    rows = [r for r in requestlog.read(log_path, since) if r["status"] == "success"]
    if last:
        rows = rows[-last:]
    if not rows:
        raise DataError("the request log has no successful requests in the chosen range",
                                   file=log_path, hint="send traffic with monitoring.request_log.enabled=true")
    feats = [r["features"] for r in rows]
    res = drift.compare(reference, feats, method, share, min(min_rows, len(feats)))
    span = (rows[0]["ts"], rows[-1]["ts"])
    page = _html(res, reference, feats, span, Path(log_path))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return res | {"rows": len(rows), "out": str(out)}


def _plot(name: str, kind: str, ref: list, cur: list) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 2.6), dpi=90)
    if kind == "numeric":
        both = np.asarray(ref + cur, dtype=float)
        edges = np.histogram_bin_edges(both, bins=30) if len(both) else 10
        ax.hist(ref, bins=edges, alpha=0.55, density=True, label=f"reference ({len(ref)})", color="#4c78a8")
        ax.hist(cur, bins=edges, alpha=0.55, density=True, label=f"current ({len(cur)})", color="#e45756")
    else:
        keys = sorted(set(map(str, ref)) | set(map(str, cur)))
        x = np.arange(len(keys))
        rs = [sum(1 for v in ref if str(v) == k) / max(len(ref), 1) for k in keys]
        cs = [sum(1 for v in cur if str(v) == k) / max(len(cur), 1) for k in keys]
        ax.bar(x - 0.2, rs, 0.4, label="reference", color="#4c78a8")
        ax.bar(x + 0.2, cs, 0.4, label="current", color="#e45756")
        ax.set_xticks(x, keys)
    ax.set_title(name, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _html(res: dict, reference: drift.Reference, feats: list[dict], span: tuple, log_path: Path) -> str:
    def fmt_t(t):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))

    verdict = "DATASET DRIFT" if res["dataset_drift"] else "no dataset drift"
    rows, plots = [], []
    for e in res["features"]:
        cur = [f[e["name"]] for f in feats if f.get(e["name"]) is not None]
        ref = reference.values[e["name"]]
        state = "n/a" if e["drift"] is None else ("drift" if e["drift"] else "ok")
        score = "" if e["score"] is None else f"{e['score']:.4g}"
        rows.append(f"<tr class='{state}'><td>{e['name']}</td><td>{e['kind']}</td><td>{e['method'] or ''}</td>"
                    f"<td>{score}</td><td>{e['threshold'] or ''}</td><td>{state}</td>"
                    f"<td>{e['reference_rows']}</td><td>{e['current_rows']}</td>"
                    f"<td>{html.escape(str(e.get('reference_mean', '')))}</td>"
                    f"<td>{html.escape(str(e.get('current_mean', '')))}</td></tr>")
        if ref and cur:
            plots.append(f"<figure><img alt='{e['name']}' src='data:image/png;base64,"
                         f"{_plot(e['name'], e['kind'], list(ref), cur)}'></figure>")
    meta = html.escape(", ".join(f"{k}: {v}" for k, v in reference.meta.items() if k != "rows"))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Drift report</title><style>
body{{font-family:system-ui,sans-serif;margin:24px;color:#222}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;font-size:13px}} tr.drift td{{background:#fde2e1}}
tr.ok td{{background:#e6f4ea}} .verdict{{font-size:20px;font-weight:600}} figure{{display:inline-block;margin:6px}}
</style></head><body>
<h1>Drift report</h1>
<p class="verdict">{verdict}: {res['drifted_features']} of {res['tested_features']} features drift
(share {res['drift_share']}, threshold {res['share_threshold']})</p>
<p>Request log {html.escape(str(log_path))}: {len(feats)} successful requests from {fmt_t(span[0])} to
{fmt_t(span[1])}.<br>Reference: {meta}.<br>Tests: Evidently's defaults (KS / chi-squared / Z-test at p &lt; 0.05 for
references up to 1000 rows; normed Wasserstein / Jensen-Shannon &ge; 0.1 beyond; PSI &ge; 0.1 on request).</p>
<table><tr><th>feature</th><th>kind</th><th>method</th><th>score</th><th>threshold</th><th>state</th>
<th>reference rows</th><th>current rows</th><th>reference mean / shares</th><th>current mean / shares</th></tr>
{''.join(rows)}</table>
<h2>Distributions</h2>{''.join(plots)}
</body></html>"""
