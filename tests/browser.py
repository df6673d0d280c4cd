"""Open a local HTML file in real headless Chromium and report what a person would see.

Not a test module: tests import it (pytest does not collect it, its name does not start with test_).

- `find_chromium()`: the browser to use ($CHROMIUM, then chromium, chromium-browser, google-chrome).
- `open_page(html, screenshot)`: load the file, wait for it (lazy images and fonts included), save
  a full-page PNG and return a `PageReport`: every <img> with its natural size, every URL the page
  requested, the title, the amount of visible text and the page's size.

It speaks the Chrome DevTools Protocol over `--remote-debugging-pipe` (NUL-terminated JSON,
commands on the browser's fd 3 and replies/events on its fd 4), so it needs no Python package.
Requests to http(s) and other network schemes are blocked in the browser (they still show up in
`requests`, and a blocked image counts as broken), so a page can never reach the internet.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

_MAX_SCREENSHOT_HEIGHT = 16000
_STDERR_TAIL = 3000

# Resolves when the images waited for have finished (loaded or failed) and fonts are ready, or
# after `ms`. First pass (all=false): eager images only, since a lazy one below the fold never
# starts in an 800px viewport. Second pass (all=true, full-height viewport): lazy images are
# made eager, as scrolling down would load them, and every image is waited for.
_SETTLE_JS = """
(async (ms, all) => {
  const imgs = Array.from(document.images);
  if (all) for (const img of imgs) if (img.loading === 'lazy') img.loading = 'eager';
  const pending = imgs.filter(img => !img.complete && (all || img.loading !== 'lazy')).map(img =>
    new Promise(done => {
      img.addEventListener('load', done, {once: true});
      img.addEventListener('error', done, {once: true});
    }));
  const waits = [Promise.all(pending)];
  if (document.fonts) waits.push(document.fonts.ready);
  await Promise.race([Promise.all(waits), new Promise(done => setTimeout(done, ms))]);
  return true;
})(%d, %s)
"""

_COLLECT_JS = """
(() => {
  const root = document.documentElement;
  return {
    title: document.title,
    images: Array.from(document.images).map(img => ({
      src: img.currentSrc || img.src,
      complete: img.complete,
      natural_width: img.naturalWidth,
      natural_height: img.naturalHeight,
    })),
    text_length: document.body ? document.body.innerText.length : 0,
    height: root ? root.scrollHeight : 0,
    width: root ? root.scrollWidth : 0,
  };
})()
"""


@dataclass(frozen=True)
class PageReport:
    """What the browser showed for one page."""

    title: str
    images: list[dict]  # {"src", "complete", "natural_width", "natural_height"}
    requests: list[str]  # every URL the page requested (the page itself included), in order
    text_length: int  # len(document.body.innerText)
    height: int  # document.documentElement.scrollHeight, in CSS pixels
    width: int = 0  # document.documentElement.scrollWidth; more than the viewport means h-scroll
    failed: list[str] = field(default_factory=list)  # requested URLs that failed or were blocked

    def broken_images(self) -> list[str]:
        """The srcs of images that did not load (not complete, or natural width 0)."""
        return [
            img["src"] for img in self.images if not img["complete"] or not img["natural_width"]
        ]

    def outside(self, folder: Path) -> list[str]:
        """Requested URLs that are not file:// under `folder` (data:, blob: and about: are fine)."""
        root = Path(folder).resolve()
        out = []
        for url in self.requests:
            scheme = urlparse(url).scheme.lower()
            if scheme in ("data", "blob", "about"):
                continue
            if scheme == "file" and _file_url_under(url, root):
                continue
            out.append(url)
        return out


def _file_url_under(url: str, root: Path) -> bool:
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        return False
    path = Path(url2pathname(unquote(parsed.path))).resolve()
    return path == root or path.is_relative_to(root)


def find_chromium() -> str | None:
    """The Chromium to run: $CHROMIUM if set, else the first of chromium, chromium-browser,
    google-chrome on PATH; None when there is none."""
    env = os.environ.get("CHROMIUM")
    if env:
        return shutil.which(env) or (env if os.access(env, os.X_OK) else None)
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class BrowserError(RuntimeError):
    """Chromium did not do what was asked in time, or said it failed; the message says which."""


class _Pipe:
    """A CDP connection over a pair of pipes: replies routed by id, events kept in order."""

    def __init__(self, write_fd: int, read_fd: int, stderr_path: Path) -> None:
        self._write_fd = write_fd
        self._read_fd = read_fd
        self._stderr_path = stderr_path
        self._cond = threading.Condition()
        self._replies: dict[int, dict] = {}
        self.events: list[dict] = []
        self._next_id = 0
        self._eof = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read_loop, name="cdp-reader", daemon=True)
        self._thread.start()

    def _read_loop(self) -> None:
        partial: list[bytes] = []  # pieces of a message not yet NUL-terminated (screenshots: MBs)
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([self._read_fd], [], [], 0.1)
                if not ready:
                    continue
                chunk = os.read(self._read_fd, 1 << 20)
                if not chunk:
                    break
                if b"\0" not in chunk:
                    partial.append(chunk)
                    continue
                first, *messages, rest = chunk.split(b"\0")
                messages.insert(0, b"".join([*partial, first]))
                partial = [rest] if rest else []
                parsed = [json.loads(m) for m in messages if m]
                with self._cond:
                    for msg in parsed:
                        if "id" in msg:
                            self._replies[msg["id"]] = msg
                        else:
                            self.events.append(msg)
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    def stderr_tail(self) -> str:
        try:
            data = self._stderr_path.read_bytes()[-_STDERR_TAIL:]
        except OSError:
            return "(no stderr)"
        return data.decode("utf-8", "replace").strip() or "(empty)"

    def fail(self, what: str) -> BrowserError:
        return BrowserError(f"{what}\n--- chromium stderr (tail) ---\n{self.stderr_tail()}")

    def send(self, method: str, params: dict | None = None, *, session: str | None = None,
             deadline: float) -> dict:
        """Send one command and wait for its reply; returns its result, raises on an error reply."""
        with self._cond:
            self._next_id += 1
            msg_id = self._next_id
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        data = json.dumps(msg).encode() + b"\0"
        try:
            while data:
                data = data[os.write(self._write_fd, data):]
        except OSError as e:
            raise self.fail(f"could not send {method} to chromium: {e}") from e
        with self._cond:
            while msg_id not in self._replies:
                left = deadline - time.monotonic()
                if self._eof:
                    raise self.fail(f"chromium closed the pipe while waiting for the reply to {method}")
                if left <= 0:
                    raise self.fail(f"timed out waiting for the reply to {method}")
                self._cond.wait(min(left, 0.5))
            reply = self._replies.pop(msg_id)
        if "error" in reply:
            raise self.fail(f"{method} failed: {reply['error']}")
        return reply.get("result", {})

    def wait_event(self, method: str, *, session: str, start: int, deadline: float) -> dict:
        """The first event `method` of `session` at index >= `start` in `events`."""
        with self._cond:
            i = start
            while True:
                while i < len(self.events):
                    ev = self.events[i]
                    i += 1
                    if ev.get("method") == method and ev.get("sessionId") == session:
                        return ev
                left = deadline - time.monotonic()
                if self._eof:
                    raise self.fail(f"chromium closed the pipe while waiting for {method}")
                if left <= 0:
                    raise self.fail(f"timed out waiting for {method}")
                self._cond.wait(min(left, 0.5))

    def close(self) -> None:
        """Stop the reader and close both pipe ends (call after the browser has exited)."""
        self._stop.set()
        self._thread.join(timeout=5)
        for fd in (self._write_fd, self._read_fd):
            try:
                os.close(fd)
            except OSError:
                pass


def _high_fd(fd: int) -> int:
    """A close-on-exec copy of `fd` numbered 10 or more (so it cannot clash with 3 and 4)."""
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return new


def _stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def open_page(html: Path, screenshot: Path, *, timeout_s: float = 60.0,
              width: int = 1280) -> PageReport:
    """Load `html` (a local file) in headless Chromium, save a full-page PNG to `screenshot`,
    and report what loaded. Raises BrowserError (with chromium's stderr tail) on failure or when
    the whole thing takes more than `timeout_s`."""
    chromium = find_chromium()
    if chromium is None:
        raise BrowserError("no Chromium found ($CHROMIUM, chromium, chromium-browser, google-chrome)")
    html = Path(html).resolve()
    if not html.is_file():
        raise FileNotFoundError(html)
    screenshot = Path(screenshot)
    deadline = time.monotonic() + timeout_s

    tmp = Path(tempfile.mkdtemp(prefix="latentcache-chromium-"))
    proc: subprocess.Popen | None = None
    pipe: _Pipe | None = None
    fds: list[int] = []
    closing = False  # Browser.close was acknowledged: give it a moment to exit by itself
    try:
        cmd_r, cmd_w = (_high_fd(fd) for fd in os.pipe())
        fds += [cmd_r, cmd_w]
        resp_r, resp_w = (_high_fd(fd) for fd in os.pipe())
        fds += [resp_r, resp_w]
        args = [
            chromium,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            f"--user-data-dir={tmp / 'profile'}",
            "--remote-debugging-pipe",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--metrics-recording-only",
            "--disable-default-apps",
            "--disable-extensions",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--mute-audio",
            "about:blank",
        ]
        # A tiny exec wrapper puts the pipe ends on fd 3 and 4 and becomes chromium (exec), so
        # proc.pid is the browser itself. Our fds are >= 10, so the dup2 order cannot clash.
        wrapper = (
            "import os, sys; r, w = int(sys.argv[1]), int(sys.argv[2]); "
            "os.dup2(r, 3); os.dup2(w, 4); os.close(r); os.close(w); "
            "os.execv(sys.argv[3], sys.argv[3:])"
        )
        # Crash reports and caches follow XDG, not --user-data-dir: keep them in `tmp` too.
        env = {**os.environ, "XDG_CONFIG_HOME": str(tmp / "config"),
               "XDG_CACHE_HOME": str(tmp / "cache")}
        with open(tmp / "stderr.log", "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", wrapper, str(cmd_r), str(resp_w), *args],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                pass_fds=(cmd_r, resp_w),
                env=env,
                start_new_session=True,
            )
        for fd in (cmd_r, resp_w):  # the browser's ends: ours must go, or EOF never comes
            os.close(fd)
            fds.remove(fd)
        pipe = _Pipe(cmd_w, resp_r, tmp / "stderr.log")
        fds.clear()  # the pipe owns cmd_w and resp_r now

        target = pipe.send("Target.createTarget", {"url": "about:blank"}, deadline=deadline)
        attached = pipe.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True},
            deadline=deadline,
        )
        sid = attached["sessionId"]

        def cmd(method: str, params: dict | None = None) -> dict:
            return pipe.send(method, params, session=sid, deadline=deadline)

        cmd("Page.enable")
        cmd("Network.enable")
        cmd("Network.setBlockedURLs", {"urls": ["http://*", "https://*", "ws://*", "wss://*",
                                                "ftp://*"]})
        cmd("Runtime.enable")
        metrics = {"width": width, "height": 800, "deviceScaleFactor": 1, "mobile": False}
        cmd("Emulation.setDeviceMetricsOverride", metrics)

        start = len(pipe.events)
        nav = cmd("Page.navigate", {"url": html.as_uri()})
        if nav.get("errorText"):
            raise pipe.fail(f"navigating to {html.as_uri()} failed: {nav['errorText']}")
        pipe.wait_event("Page.loadEventFired", session=sid, start=start, deadline=deadline)

        def evaluate(expression: str) -> Any:
            res = cmd("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                           "awaitPromise": True})
            if "exceptionDetails" in res:
                raise pipe.fail(f"page script failed: {res['exceptionDetails']}")
            return res["result"].get("value")

        def settle_ms() -> int:
            return max(0, min(10_000, int((deadline - time.monotonic() - 5) * 1000)))

        evaluate(_SETTLE_JS % (settle_ms(), "false"))
        # Full height, so lazy images below the fold load too, and the shot is the whole page.
        height = evaluate("document.documentElement.scrollHeight") or 800
        metrics["height"] = max(1, min(int(height), _MAX_SCREENSHOT_HEIGHT))
        cmd("Emulation.setDeviceMetricsOverride", metrics)
        evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
        evaluate(_SETTLE_JS % (settle_ms(), "true"))
        page = evaluate(_COLLECT_JS)

        clip = {"x": 0, "y": 0, "width": width, "height": metrics["height"], "scale": 1}
        shot = cmd("Page.captureScreenshot",
                   {"format": "png", "captureBeyondViewport": True, "clip": clip})
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        screenshot.write_bytes(base64.b64decode(shot["data"]))

        with pipe._cond:
            events = list(pipe.events[start:])
        mine = [ev for ev in events if ev.get("sessionId") == sid]
        sent = [ev["params"] for ev in mine if ev.get("method") == "Network.requestWillBeSent"]
        urls = {p["requestId"]: p["request"]["url"] for p in sent}
        failed = [urls.get(ev["params"]["requestId"], ev["params"]["requestId"])
                  for ev in mine if ev.get("method") == "Network.loadingFailed"]

        try:  # a clean exit is faster and tidier than a signal
            pipe.send("Browser.close", deadline=min(deadline, time.monotonic() + 5))
            closing = True
        except BrowserError:
            pass
        return PageReport(
            title=page["title"],
            images=page["images"],
            requests=[p["request"]["url"] for p in sent],
            text_length=int(page["text_length"]),
            height=int(page["height"]),
            width=int(page["width"]),
            failed=failed,
        )
    finally:
        if proc is not None:
            if closing:
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            _stop_process(proc)
        if pipe is not None:
            pipe.close()
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(tmp, ignore_errors=True)
        if tmp.exists():  # a late child writing into the profile; try once more
            time.sleep(0.5)
            shutil.rmtree(tmp, ignore_errors=True)
