"""Look at a model in Netron: serve it on localhost, or render it headless.

    from fgq_onnx.view import serve
    server = serve("model.fgq.onnx", browse=False)
    print(server.url)
    ...
    server.stop()

`render` loads the served page in a headless Chromium (Debian's `chromium`)
and returns the rendered DOM, optionally writing a screenshot; the tests use
it to check that the graph really renders, and docs/netron.png is made with
`fgq-onnx view MODEL --screenshot docs/netron.png --window 1100 1500`.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fgq_onnx import model_io
from fgq_onnx.errors import FgqError

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--mute-audio", "--disable-dev-shm-usage",
)


def _netron():
    try:
        import netron
    except ImportError:
        raise FgqError("viewing needs Netron: pip install netron") from None
    return netron


@dataclass
class Served:
    """A model served by Netron on localhost until stop()."""

    model: Path
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def stop(self, timeout: float = 2.0) -> None:
        """Stop serving; Netron's server thread ends at its next poll (a quarter second)."""
        netron = _netron()
        netron.stop((self.host, self.port))
        deadline = time.monotonic() + timeout
        while netron.status((self.host, self.port)) and time.monotonic() < deadline:
            time.sleep(0.05)

    @property
    def alive(self) -> bool:
        return bool(_netron().status((self.host, self.port)))

    def wait(self) -> None:
        """Block until interrupted (Ctrl-C), then stop serving."""
        try:
            while self.alive:
                time.sleep(0.2)
        finally:
            self.stop()

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(model: str | Path, *, host: str = "localhost", port: int = 0, browse: bool = True) -> Served:
    """Serve `model` in Netron at http://host:port/ (port 0: a free one); open a browser if `browse`."""
    model = Path(model)
    model_io.read_model_proto(model)  # a clear error for a missing or corrupt file
    netron = _netron()
    root = logging.getLogger()
    quiet = logging.NullHandler()
    added = not root.handlers  # netron.serve calls logging.basicConfig when the root logger has no handler
    if added:
        root.addHandler(quiet)
    try:
        address = netron.serve(str(model), address=(host, port), browse=browse)
    except OSError as error:
        raise FgqError(f"cannot serve on {host}:{port}: {error.strerror or error}") from None
    finally:
        if added:
            root.removeHandler(quiet)
    return Served(model, address[0], address[1])


# -- headless rendering -------------------------------------------------------


def find_chromium() -> str | None:
    """A Chromium-like browser on PATH ($FGQ_CHROMIUM first), or None."""
    override = os.environ.get("FGQ_CHROMIUM")
    if override:
        return override if Path(override).is_file() else shutil.which(override)
    return next((found for name in CHROMIUM_NAMES if (found := shutil.which(name))), None)


_PRELUDE_JS = """
document.cookie = 'consent=' + Date.now() + '; path=/; max-age=3600';
try { window.localStorage.setItem('options', JSON.stringify(%s)); } catch (e) {}
"""


def render(
    model: str | Path,
    *,
    screenshot: str | Path | None = None,
    window: tuple[int, int] = (1400, 1000),
    names: bool = False,
    horizontal: bool = False,
    timeout: float = 60.0,
    chromium: str | None = None,
) -> str:
    """Serve `model` in Netron, load it in headless Chromium and return the rendered DOM.

    Waits (in real time, up to `timeout` s) until Netron has drawn the graph's
    nodes; with `screenshot`, also writes a PNG of the page there. `names`
    labels nodes with their names instead of op types; `horizontal` lays the
    graph out left to right. The browser is driven over the DevTools protocol
    on a pipe (--remote-debugging-pipe), so no extra package is needed, and
    the wait is in real time (--virtual-time-budget does not wait for
    Netron's layout worker). Raises FgqError when no browser is found, it
    fails, or the graph does not appear.
    """
    browser = chromium or find_chromium()
    if browser is None:
        raise FgqError("no headless browser found: install chromium (apt-get install chromium) or set FGQ_CHROMIUM")
    target = None
    if screenshot is not None:
        target = Path(screenshot).resolve()
        if not target.parent.is_dir():
            raise FgqError(f"output folder '{target.parent}' does not exist")
    host = "127.0.0.1"
    settings = {"names": names, "direction": "horizontal" if horizontal else "vertical"}
    with serve(model, host=host, port=0, browse=False) as served, tempfile.TemporaryDirectory(prefix="fgq-chromium-") as profile:
        flags = [*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={window[0]},{window[1]}"]
        with _DevTools(browser, flags, timeout) as devtools:
            session = devtools.open_page()
            devtools.call("Emulation.setDeviceMetricsOverride", {"width": window[0], "height": window[1], "deviceScaleFactor": 1, "mobile": False}, session=session)
            # Before Netron's scripts run: its cookie-consent dialog answered (a headless
            # browser cannot click "Accept") and its view options set.
            devtools.call("Page.addScriptToEvaluateOnNewDocument", {"source": _PRELUDE_JS % json.dumps(settings)}, session=session)
            devtools.call("Page.enable", session=session)
            devtools.call("Page.navigate", {"url": served.url}, session=session)
            _wait_for_graph(devtools, session, timeout)
            if target is not None:
                shot = devtools.call("Page.captureScreenshot", {"format": "png"}, session=session)
                target.write_bytes(base64.b64decode(shot["data"]))
            return devtools.evaluate("document.documentElement.outerHTML", session)


_STATE_JS = """(() => {
  if (!document.body) return {nodes: 0, busy: true, message: ''};
  const message = document.getElementById('message-text');
  return {
    nodes: document.querySelectorAll('[id^="node-name-"], [id^="node-id-"]').length,
    busy: document.body.classList.contains('spinner'),
    alert: document.body.classList.contains('alert'),
    message: message && (document.body.classList.contains('notification') || document.body.classList.contains('alert')) ? message.innerText : '',
  };
})()"""


def _wait_for_graph(devtools: _DevTools, session: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    state: dict = {}
    while time.monotonic() < deadline:
        state = devtools.evaluate(_STATE_JS, session) or {}
        if state.get("nodes") and not state.get("busy"):
            time.sleep(0.5)  # let the layout settle and paint
            return
        if state.get("alert"):  # Netron could not open the model
            raise FgqError(f"Netron cannot show the model: {state.get('message') or 'no message'}")
        time.sleep(0.2)
    detail = f": Netron says '{state['message']}'" if state.get("message") else ""
    raise FgqError(f"Netron drew no graph within {timeout:.0f} s{detail}")


_TRAMPOLINE = "import os, sys; r, w = int(sys.argv[1]), int(sys.argv[2]); os.dup2(r, 3); os.dup2(w, 4); os.close(r); os.close(w); os.execvp(sys.argv[3], sys.argv[3:])"


def _high_fd(fd: int) -> int:
    """A duplicate of `fd` numbered 10 or more (the original is closed)."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


class _DevTools:
    """A headless browser driven over the DevTools protocol on fds 3 (in) and 4 (out)."""

    def __init__(self, browser: str, flags: list[str], timeout: float):
        self.browser, self.flags, self.timeout = browser, flags, timeout
        self._next = 0
        self._buffer = b""

    def __enter__(self) -> _DevTools:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # The browser's ends must not sit on 3 or 4 themselves, or the redirections below cross.
        to_browser_r, from_browser_w = (_high_fd(fd) for fd in (to_browser_r, from_browser_w))
        command = [self.browser, *self.flags, "--remote-debugging-pipe", "about:blank"]
        try:
            # A tiny Python trampoline puts the pipe ends on the descriptors the browser expects.
            self.process = subprocess.Popen(
                [sys.executable, "-c", _TRAMPOLINE, str(to_browser_r), str(from_browser_w), *command],
                pass_fds=(to_browser_r, from_browser_w), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )
        except OSError as error:
            os.close(self._to_browser)
            os.close(self._from_browser)
            raise FgqError(f"cannot run {self.browser}: {error.strerror or error}") from None
        finally:
            os.close(to_browser_r)
            os.close(from_browser_w)
        return self

    def __exit__(self, *exc) -> None:
        with contextlib.suppress(Exception):
            self.call("Browser.close", timeout=5)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for fd in (self._to_browser, self._from_browser):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.process.stderr:
            self.process.stderr.close()

    def _failure(self, what: str) -> FgqError:
        name = Path(self.browser).name
        if self.process.poll() is not None:
            lines = [line for line in self.process.stderr.read().decode(errors="replace").splitlines() if line.strip() and "dbus" not in line.lower()] if self.process.stderr else []
            return FgqError(f"{name} exited (code {self.process.returncode}) {what}: {lines[-1] if lines else 'no message'}")
        return FgqError(f"{name} did not answer {what} within {self.timeout:.0f} s")

    def call(self, method: str, params: dict | None = None, *, session: str | None = None, timeout: float | None = None) -> dict:
        self._next += 1
        message = {"id": self._next, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        try:
            os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        except OSError:
            raise self._failure(f"before {method}") from None
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            while b"\0" not in self._buffer:
                left = deadline - time.monotonic()
                ready, _, _ = select.select([self._from_browser], [], [], max(left, 0))
                if not ready:
                    raise self._failure(f"to {method}")
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise self._failure(f"during {method}")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise FgqError(f"{Path(self.browser).name}: {method} failed: {reply['error'].get('message', reply['error'])}")
                return reply.get("result", {})

    def open_page(self) -> str:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        return self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def evaluate(self, expression: str, session: str):
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=session)
        return result.get("result", {}).get("value")


def rendered_node_names(dom: str) -> list[str]:
    """Names of the graph nodes Netron drew (its node elements have id="node-name-<name>")."""
    import re

    return [match.group(1) for match in re.finditer(r'id="node-name-([^"]*)"', dom)]
