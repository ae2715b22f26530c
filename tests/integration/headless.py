"""Headless Chromium (Debian's `chromium`) driven over the DevTools protocol
through a pipe, for tests that look at a page as a browser renders it.

    with Chromium(tmp_path) as b:          # None from find_chromium(): skip
        b.navigate("http://127.0.0.1:9099/")
        dom = b.wait_eval("document.title || null", timeout=10, what="a title")
        png = b.screenshot()                # bytes, the whole page
        b.problems()                        # console errors, exceptions, failed requests

`--remote-debugging-pipe`: the protocol runs over file descriptors 3 and 4
of the browser (NUL-terminated JSON), so no port is opened and nothing
beyond the standard library is needed.  The browser gets its own process
group (its renderer, GPU and zygote processes are in it) and close() ends
that group by the browser's PID: SIGTERM, then SIGKILL, even when a test
failed half-way.  Its crash handlers (chrome_crashpad_handler) leave the
group at start (a session of their own) and exit when the browser does;
close() waits for them, found by this browser's own directory on their
command line, and kills any still there after 5 s by PID.  Chromium is kept off the network: its background services
are switched off and every host name resolves to nothing (host-resolver-rules),
so its only connections are to the page's server on 127.0.0.1.  (Under strace
the one other address it names is in its IPv6 reachability check: a UDP
connect() to a public address and getsockname(), which sends no packet.)
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Optional

FLAGS = [
    "--headless", "--disable-gpu", "--no-sandbox", "--remote-debugging-pipe",
    "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--disable-sync",
    "--disable-background-networking", "--disable-component-update", "--disable-default-apps",
    "--disable-domain-reliability", "--disable-client-side-phishing-detection", "--disable-breakpad",
    "--no-pings", "--metrics-recording-only", "--disable-dev-shm-usage", "--mute-audio",
    "--disable-features=Translate,OptimizationHints,MediaRouter,DialMediaRouteProvider,AutofillServerCommunication",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--hide-scrollbars", "--force-color-profile=srgb", "--font-render-hinting=none",
]


def find_chromium() -> Optional[str]:
    return shutil.which("chromium")


class BrowserError(Exception):
    pass


class Chromium:
    """One headless browser with one page, attached over a pipe."""

    def __init__(self, workdir: Path, width: int = 1280, height: int = 900, binary: Optional[str] = None):
        self.workdir = Path(workdir)
        self.binary = binary or find_chromium()
        if not self.binary:
            raise BrowserError("chromium not installed")
        self.width, self.height = width, height
        self.proc: Optional[subprocess.Popen] = None
        self.stderr_path = self.workdir / "chromium.stderr"
        self.events: list[dict] = []
        self._lock = threading.Condition()
        self._replies: dict[int, dict] = {}
        self._next_id = 0
        self._buf = b""
        self._eof = False
        self.session: Optional[str] = None

    # -- life cycle --

    def start(self) -> "Chromium":
        self.workdir.mkdir(parents=True, exist_ok=True)
        to_r, to_w = os.pipe()       # test -> browser (its fd 3)
        from_r, from_w = os.pipe()   # browser -> test (its fd 4)
        # High descriptor numbers (bash, not dash, takes those), so that 3<&N 4>&M cannot
        # overwrite one with the other.
        hi = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 50) for fd in (to_r, from_w)]
        for fd in (to_r, from_w):
            os.close(fd)
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env["HOME"] = str(self.workdir)  # the wrapper cleans $HOME/.config/chromium
        argv = ["bash", "-c", f'exec "$0" "$@" 3<&{hi[0]} 4>&{hi[1]}', self.binary, *FLAGS,
                f"--user-data-dir={self.workdir / 'profile'}",
                f"--window-size={self.width},{self.height}", "about:blank"]
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env,
                                         pass_fds=hi, start_new_session=True)
        for fd in hi:
            os.close(fd)
        self._w, self._r = to_w, from_r
        self._thread = threading.Thread(target=self._reader, daemon=True)
        self._thread.start()
        self._attach()
        return self

    def close(self) -> None:
        """Ends the browser's process group (by the browser's PID), then
        the pipes."""
        if self.proc is not None:
            pgid = self.proc.pid  # start_new_session: the group is the browser's
            for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout=wait)
                except subprocess.TimeoutExpired:
                    continue
                # The browser is gone; its children may linger a moment.
                deadline = time.monotonic() + wait
                while time.monotonic() < deadline and _group_alive(pgid):
                    time.sleep(0.05)
                if not _group_alive(pgid):
                    break
            if self.proc.poll() is None:
                self.proc.wait(timeout=5)
            deadline = time.monotonic() + 5
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.05)
            for pid in self.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self._thread.join(5)  # EOF once the browser's end of the pipe is closed
        for fd in (getattr(self, "_w", None), getattr(self, "_r", None)):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._w = self._r = None

    def __enter__(self) -> "Chromium":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def pids(self) -> list[int]:
        """The browser's live processes: its group, and the crash handlers
        that name its directory."""
        return _live_pids(self.proc.pid, str(self.workdir)) if self.proc else []

    # -- protocol --

    def _reader(self) -> None:
        while True:
            try:
                chunk = os.read(self._r, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                with self._lock:
                    self._eof = True
                    self._lock.notify_all()
                return
            self._buf += chunk
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                msg = json.loads(raw)
                with self._lock:
                    if "id" in msg:
                        self._replies[msg["id"]] = msg
                    else:
                        self.events.append(msg)
                    self._lock.notify_all()

    def send(self, method: str, params: Optional[dict] = None, session: Any = True, timeout: float = 15.0) -> dict:
        """One command; its result, or BrowserError with the protocol's error."""
        with self._lock:
            self._next_id += 1
            mid = self._next_id
        msg: dict = {"id": mid, "method": method, "params": params or {}}
        sid = self.session if session is True else session
        if sid:
            msg["sessionId"] = sid
        data = json.dumps(msg).encode() + b"\0"
        while data:
            data = data[os.write(self._w, data):]
        deadline = time.monotonic() + timeout
        with self._lock:
            while mid not in self._replies:
                left = deadline - time.monotonic()
                if self._eof:
                    raise BrowserError(f"{method}: the browser closed the pipe\n{self.stderr_tail()}")
                if left <= 0:
                    raise BrowserError(f"{method}: no answer within {timeout} s")
                self._lock.wait(left)
            reply = self._replies.pop(mid)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def _attach(self) -> None:
        deadline = time.monotonic() + 20
        while True:
            targets = self.send("Target.getTargets", session=None)["targetInfos"]
            pages = [t for t in targets if t["type"] == "page"]
            if pages:
                break
            if time.monotonic() > deadline:
                raise BrowserError(f"no page target: {targets}")
            time.sleep(0.1)
        self.session = self.send("Target.attachToTarget", {"targetId": pages[0]["targetId"], "flatten": True},
                                 session=None)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable")

    # -- page --

    def navigate(self, url: str, timeout: float = 15.0) -> None:
        mark = len(self.events)
        res = self.send("Page.navigate", {"url": url})
        if res.get("errorText"):
            raise BrowserError(f"navigate {url}: {res['errorText']}")
        self.wait_event("Page.loadEventFired", timeout, since=mark)

    def wait_event(self, method: str, timeout: float, since: int = 0) -> dict:
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for ev in self.events[since:]:
                    if ev["method"] == method:
                        return ev
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    raise BrowserError(f"no {method} within {timeout} s")
                self._lock.wait(left)

    def eval(self, expression: str) -> Any:
        """A JavaScript expression's value (JSON-able), in the page."""
        res = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                             "awaitPromise": True})
        if "exceptionDetails" in res:
            raise BrowserError(f"evaluate: {res['exceptionDetails']}")
        return res["result"].get("value")

    def wait_eval(self, expression: str, timeout: float, what: str, interval: float = 0.1) -> Any:
        """Polls the expression until its value is truthy; that value."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            last = self.eval(expression)
            if last:
                return last
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what}; last value {last!r}")
            time.sleep(interval)

    def color_scheme(self, scheme: str) -> None:
        """'light' or 'dark': what prefers-color-scheme answers."""
        self.send("Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": scheme}]})

    def viewport(self, width: int, height: int, mobile: bool = False, scale: float = 1) -> None:
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                                                         "deviceScaleFactor": scale, "mobile": mobile})

    def screenshot(self, full_page: bool = True) -> bytes:
        params: dict = {"format": "png"}
        if full_page:
            m = self.send("Page.getLayoutMetrics")
            size = m.get("cssContentSize") or m["contentSize"]
            params.update(captureBeyondViewport=True, clip={
                "x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
        return base64.b64decode(self.send("Page.captureScreenshot", params, timeout=30)["data"])

    # -- what went wrong --

    def problems(self) -> list[str]:
        """Console errors and assertions, uncaught exceptions, error-level
        log entries (CSP violations, failed loads), failed requests and HTTP
        errors, seen so far."""
        out = []
        with self._lock:
            events = list(self.events)
        for ev in events:
            m, p = ev["method"], ev.get("params", {})
            if m == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
                out.append(f"console.{p['type']}: " + " ".join(
                    str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif m == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                out.append(f"uncaught: {d.get('exception', {}).get('description') or d.get('text')}")
            elif m == "Log.entryAdded" and p["entry"]["level"] == "error":
                e = p["entry"]
                out.append(f"log {e['source']}: {e['text']} {e.get('url', '')}")
            elif m == "Network.loadingFailed":
                out.append(f"request failed: {p.get('errorText')} {p.get('blockedReason', '')} "
                           f"{p.get('type', '')} {self._url(events, p['requestId'])}")
            elif m == "Network.responseReceived" and p["response"]["status"] >= 400:
                out.append(f"HTTP {p['response']['status']}: {p['response']['url']}")
        return out

    def console(self) -> list[str]:
        """Every console message and log entry, for the saved log."""
        out = []
        with self._lock:
            events = list(self.events)
        for ev in events:
            m, p = ev["method"], ev.get("params", {})
            if m == "Runtime.consoleAPICalled":
                out.append(f"console.{p['type']}: " + " ".join(
                    str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif m == "Log.entryAdded":
                out.append(f"log {p['entry']['level']} {p['entry']['source']}: {p['entry']['text']}")
            elif m == "Runtime.exceptionThrown":
                out.append(f"uncaught: {p['exceptionDetails'].get('text')}")
        return out

    def requests(self) -> list[tuple[str, int]]:
        """(url, status) of every response the page received."""
        with self._lock:
            return [(ev["params"]["response"]["url"], ev["params"]["response"]["status"])
                    for ev in self.events if ev["method"] == "Network.responseReceived"]

    @staticmethod
    def _url(events: list[dict], request_id: str) -> str:
        for ev in events:
            if ev["method"] == "Network.requestWillBeSent" and ev["params"]["requestId"] == request_id:
                return ev["params"]["request"]["url"]
        return "?"

    def stderr_tail(self, lines: int = 30) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _live_pids(pgid: int, marker: Optional[str] = None) -> list[int]:
    """Processes (not zombies) in group pgid, or running a chromium binary
    with marker in an argument."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            fields = stat.rsplit(")", 1)[1].split()  # state ppid pgrp ...
            if fields[0] == "Z":  # dead, waiting to be reaped
                continue
            if int(fields[2]) == pgid:
                pids.append(int(entry))
            elif marker:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
                # chromium's own binaries only, naming this browser's directory
                if b"chrom" in os.path.basename(argv[0]) and any(marker.encode() in a for a in argv[1:]):
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def _group_alive(pgid: int) -> bool:
    return bool(_live_pids(pgid))
