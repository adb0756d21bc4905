"""Real headless Chromium for the tests: `dump_dom` (the DOM after a virtual-time budget: timers run and fetches
complete without real waiting), `Browser` (the DevTools protocol over a pipe, in real time: rates need real seconds,
and screenshots) and `png_size`. Tests skip with a reason when no chromium binary is on PATH."""
from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest

FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--hide-scrollbars", "--mute-audio"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("no chromium binary on PATH (chromium / chromium-browser)")


def dump_dom(url: str, tmp: Path, budget_ms: int = 8000) -> str:
    """The DOM after `budget_ms` of virtual time (timers run, fetches complete, no real waiting)."""
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    r = subprocess.run([chromium(), *FLAGS, f"--user-data-dir={tmp / 'profile-dump'}",
                        f"--virtual-time-budget={budget_ms}", "--dump-dom", url],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": str(home)})
    assert r.returncode == 0 and "<body" in r.stdout, r.stderr[-2000:]
    return r.stdout


class Browser:
    """Headless Chromium driven in real time over the DevTools protocol on a pipe (--remote-debugging-pipe:
    commands in on fd 3, replies out on fd 4, NUL-terminated JSON) — no websocket client needed."""

    def __init__(self, tmp: Path):
        cmd_r, self.cmd_w = os.pipe()
        self.out_r, out_w = os.pipe()
        # above 9, so that the `3<&` / `4>&` redirections cannot overwrite one another (bash: dash takes one digit)
        low = (cmd_r, out_w)
        cmd_r, out_w = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in low)
        home = tmp / "home"
        home.mkdir(exist_ok=True)
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{cmd_r} 4>&{out_w}', chromium(), *FLAGS,
             f"--user-data-dir={tmp / 'profile-cdp'}", "--remote-debugging-pipe", "about:blank"],
            pass_fds=(cmd_r, out_w), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "HOME": str(home)}, start_new_session=True)
        for fd in (cmd_r, out_w, *low):
            os.close(fd)
        self.buf, self.id, self.session = b"", 0, None

    def call(self, method: str, timeout: float = 30, **params) -> dict:
        self.id += 1
        msg = {"id": self.id, "method": method, "params": params}
        if self.session:
            msg["sessionId"] = self.session
        os.write(self.cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            while b"\0" in self.buf:
                raw, self.buf = self.buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self.id:
                    assert "error" not in reply, f"{method}: {reply['error']}"
                    return reply.get("result", {})
            left = deadline - time.time()
            assert left > 0 and select.select([self.out_r], [], [], left)[0], f"{method}: no reply in {timeout} s"
            chunk = os.read(self.out_r, 1 << 20)
            assert chunk, "chromium closed the DevTools pipe"
            self.buf += chunk

    def open(self, url: str, width: int, height: int) -> None:
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        self.call("Page.navigate", url=url)

    def js(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {expression}")

    def close(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        os.close(self.cmd_w)
        os.close(self.out_r)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", data[16:24])
