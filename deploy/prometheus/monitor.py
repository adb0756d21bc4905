#!/usr/bin/env python3
"""Run a local Prometheus (the Debian `prometheus` binary) that scrapes the llmstack service, with the recording and
alerting rules of deploy/prometheus/rules loaded: `make monitor` (ARGS='--target 127.0.0.1:8080 --port 9091').

It renders deploy/prometheus/prometheus.yml with the given target, intervals and absolute rule paths into
DATA_DIR/prometheus.yml, then replaces itself (exec) with
`prometheus --config.file=DATA_DIR/prometheus.yml --storage.tsdb.path=DATA_DIR/tsdb ...`, so stopping this process
(Ctrl-C, SIGTERM) stops Prometheus. Needs only the standard library and PyYAML.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TEMPLATE = HERE / "prometheus.yml"
JOB = "llmstack"
HEADER = "# rendered by deploy/prometheus/monitor.py from deploy/prometheus/prometheus.yml\n"
DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")


def _duration(text: str) -> str:
    if not DURATION.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a Prometheus duration (e.g. 5s, 1m, 2h, 15d)")
    return text


def _target(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not host:port (e.g. 127.0.0.1:3000)")
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="monitor.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Open http://HOST:PORT (graph, /alerts, /rules, /targets). Grafana: see deploy/README.md.")
    p.add_argument("--target", type=_target, default="127.0.0.1:3000",
                   help="host:port of the llmstack service to scrape (its /metrics route, open without the API key); "
                        "default %(default)s, the `make serve` address")
    p.add_argument("--host", default="127.0.0.1",
                   help="address the Prometheus web UI and API listen on; default %(default)s (local only)")
    p.add_argument("--port", type=int, default=9090, help="port of the Prometheus web UI and API; default %(default)s")
    p.add_argument("--data-dir", type=Path, default=ROOT / "artifacts" / "prometheus",
                   help="folder for the rendered prometheus.yml and the time-series database (tsdb/); created if "
                        "missing, kept between runs; default %(default)s (git-ignored)")
    p.add_argument("--retention", type=_duration, default="7d",
                   help="how long Prometheus keeps samples (--storage.tsdb.retention.time); default %(default)s")
    p.add_argument("--scrape-interval", type=_duration, default=None,
                   help="how often to scrape the service and evaluate the rules; default: the template's "
                        "global.scrape_interval (5s). Rates use 5m windows, so 1s-15s all work")
    p.add_argument("--prometheus", default="prometheus",
                   help="the Prometheus server binary (name on PATH or a path); default %(default)s, from the Debian "
                        "package `prometheus` (`make system-deps`)")
    p.add_argument("--print-config", action="store_true",
                   help="print the rendered prometheus.yml to stdout and exit (writes nothing, needs no binary)")
    p.add_argument("--rule-dir", default=None,
                   help="with --print-config: the folder the rule files are in as the Prometheus that loads the "
                        "printed config sees it (e.g. /etc/prometheus/rules in a container; how "
                        "deploy/compose/prometheus.yml is made); default: this checkout's deploy/prometheus/rules")
    return p.parse_args(argv)


def render(target: str, scrape_interval: str | None = None, template: Path = TEMPLATE,
           rule_dir: str | None = None) -> dict:
    """The template with `target` as the llmstack job's only target, the rule files as absolute paths (in
    `rule_dir` when given: where another machine or a container has them) and, when given, `scrape_interval` as both
    the scrape and the rule evaluation interval."""
    config = yaml.safe_load(template.read_text(encoding="utf-8"))
    config["rule_files"] = [f"{rule_dir.rstrip('/')}/{Path(f).name}" if rule_dir else
                            str((template.parent / f).resolve()) for f in config.get("rule_files", [])]
    if scrape_interval:
        config.setdefault("global", {}).update(scrape_interval=scrape_interval, evaluation_interval=scrape_interval)
    jobs = [job for job in config.get("scrape_configs", []) if job.get("job_name") == JOB]
    if len(jobs) != 1:
        raise SystemExit(f"{template}: expected one scrape job named {JOB!r}, found {len(jobs)}")
    jobs[0]["static_configs"] = [{"targets": [target]}]
    return config


def command(binary: str, config_file: Path, data_dir: Path, host: str, port: int, retention: str) -> list[str]:
    return [binary, f"--config.file={config_file}", f"--storage.tsdb.path={data_dir / 'tsdb'}",
            f"--storage.tsdb.retention.time={retention}", f"--web.listen-address={host}:{port}"]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.rule_dir and not args.print_config:
        raise SystemExit("error: --rule-dir only applies with --print-config (a local Prometheus loads this "
                         "checkout's rules)")
    config = render(args.target, args.scrape_interval, rule_dir=args.rule_dir)
    text = yaml.safe_dump(config, sort_keys=False)
    if args.print_config:
        sys.stdout.write(HEADER + text)
        return
    binary = shutil.which(args.prometheus)
    if binary is None:
        raise SystemExit(f"error: the Prometheus binary {args.prometheus!r} was not found on PATH: run `make system-deps` "
                         "(installs the Debian package prometheus) or pass --prometheus PATH")
    data_dir = args.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    config_file = data_dir / "prometheus.yml"
    config_file.write_text(HEADER + text, encoding="utf-8")
    cmd = command(binary, config_file, data_dir, args.host, args.port, args.retention)
    interval = config.get("global", {}).get("scrape_interval", "1m")
    print(f"Prometheus on http://{args.host}:{args.port} scraping http://{args.target}/metrics every {interval}; "
          f"config {config_file}, data {data_dir / 'tsdb'}\n$ {' '.join(cmd)}", flush=True)
    os.execv(binary, cmd)


if __name__ == "__main__":
    main()
