"""Look at TensorBoard for real: serve a run with TensorBoard on 127.0.0.1 and drive headless Chromium.

Stdlib only. Chromium is driven through the DevTools protocol over ``--remote-debugging-pipe`` (JSON messages
separated by NUL bytes on file descriptors 3 and 4), so there is no websocket client, chromedriver or selenium to
install. Every wait is bounded; processes are killed on exit.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")


def find_chromium() -> str | None:
    """Debian's ``chromium`` (``.ci/install-chromium`` installs it), or ``$GRADWATCH_CHROMIUM``."""
    explicit = os.environ.get("GRADWATCH_CHROMIUM")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    for path in CHROMIUM_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("chromium")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen[Any], grace: float = 5.0) -> None:
    """Terminate the process group we started (and only it), then kill it if it lingers."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait(timeout=grace)


def http_get(url: str, timeout: float = 2.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def _wait_for_tensorboard(proc: subprocess.Popen[Any], base: str, log: Any, deadline: float) -> bool:
    """True once TensorBoard serves a custom-scalars layout; False if it could not bind its port (try another)."""
    while True:
        if proc.poll() is not None:
            log.seek(0)
            output = log.read().decode(errors="replace")
            if "already in use" in output:
                return False
            raise RuntimeError(f"TensorBoard exited {proc.returncode}:\n{output[-4000:]}")
        try:
            if json.loads(http_get(f"{base}/data/plugin/custom_scalars/layout")).get("category"):
                return True
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            pass
        if time.monotonic() > deadline:
            log.seek(0)
            output = log.read().decode(errors="replace")
            raise TimeoutError(f"TensorBoard did not serve a custom-scalars layout in time:\n{output[-4000:]}")
        time.sleep(0.5)


@contextlib.contextmanager
def tensorboard_server(logdir: str | Path, timeout: float = 90.0) -> Iterator[str]:
    """Serve ``logdir`` with TensorBoard on 127.0.0.1 (a free port) and yield its base URL once the
    custom-scalars layout has been loaded, so a page opened next finds the data. The server is killed on exit."""
    deadline = time.monotonic() + timeout
    for _ in range(3):  # another process may take the free port before TensorBoard binds it
        port = free_port()
        cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir)]
        cmd += ["--host", "127.0.0.1", "--port", str(port), "--load_fast=false"]
        with tempfile.TemporaryFile() as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                if _wait_for_tensorboard(proc, f"http://127.0.0.1:{port}", log, deadline):
                    yield f"http://127.0.0.1:{port}"
                    return
            finally:
                _stop(proc)
    raise RuntimeError("TensorBoard could not bind a free port in 3 attempts")


# argv: read fd, write fd, chromium command...; put the two fds on 3 and 4 and exec the command
_WIRE_PIPES = (
    "import os, sys; r, w = int(sys.argv[1]), int(sys.argv[2]); os.dup2(r, 3); os.dup2(w, 4); "
    "os.close(r); os.close(w); os.execv(sys.argv[3], sys.argv[3:])"
)


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe; one page (tab) attached.

    Use as a context manager::

        with Chromium(width=1400, height=1000) as page:
            page.navigate("http://127.0.0.1:6006/#custom_scalars")
            page.wait_for("document.title !== ''", timeout=30)
            png = page.screenshot()
    """

    FLAGS = (
        "--headless",
        "--no-sandbox",  # tests may run as root (containers, CI)
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--disable-dev-shm-usage",
        "--mute-audio",
        "--hide-scrollbars",
        "--remote-debugging-pipe",
    )

    def __init__(self, executable: str | None = None, width: int = 1400, height: int = 1000) -> None:
        self.executable = executable or find_chromium()
        if self.executable is None:
            raise FileNotFoundError("chromium is not installed (run .ci/install-chromium)")
        self.width, self.height = width, height
        self._next_id = 0
        self._buffer = b""
        self._events: list[dict[str, Any]] = []
        self.console: list[str] = []

    # -- process -------------------------------------------------------------------------------------------
    def __enter__(self) -> Chromium:
        self._profile = tempfile.TemporaryDirectory(prefix="gradwatch-chromium-")
        self._log = tempfile.TemporaryFile()
        # Chromium reads commands on its fd 3 and writes replies and events on its fd 4. The child's ends are
        # first moved to fds >= 10 (so they cannot collide with 3 and 4), then a tiny Python trampoline puts them
        # on 3 and 4 and execs Chromium: no preexec_fn, which is unsafe in a process with threads (torch has some).
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        child_r = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD_CLOEXEC, 10)
        child_w = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_browser_r)
        os.close(from_browser_w)
        cmd = [
            self.executable,
            *self.FLAGS,
            f"--user-data-dir={self._profile.name}",
            f"--window-size={self.width},{self.height}",
            "about:blank",
        ]
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _WIRE_PIPES, str(child_r), str(child_w), *cmd],
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                pass_fds=(child_r, child_w),
                start_new_session=True,
            )
        finally:
            os.close(child_r)
            os.close(child_w)
        try:
            target = self.call("Target.createTarget", {"url": "about:blank"}, timeout=60)["targetId"]
            self._session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            self.call("Page.enable", session=True)
            self.call("Runtime.enable", session=True)
            self.call(
                "Emulation.setDeviceMetricsOverride",
                {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False},
                session=True,
            )
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self._send("Browser.close", {}, session=False)
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        _stop(self._proc)
        for fd in (self._to_browser, self._from_browser):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._log.close()
        self._profile.cleanup()

    def log_tail(self, n: int = 3000) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-n:]

    # -- protocol ------------------------------------------------------------------------------------------
    def _send(self, method: str, params: dict[str, Any], session: bool) -> int:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self._session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        return self._next_id

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no reply from Chromium in time")
            ready, _, _ = select.select([self._from_browser], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"Chromium closed the DevTools pipe:\n{self.log_tail()}")
                self._buffer += chunk
            elif self._proc.poll() is not None:
                raise RuntimeError(f"Chromium exited {self._proc.returncode}:\n{self.log_tail()}")
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(
        self, method: str, params: dict[str, Any] | None = None, session: bool = False, timeout: float = 30
    ) -> dict[str, Any]:
        """Send one command and return its result (events that arrive meanwhile are kept)."""
        call_id = self._send(method, params or {}, session)
        deadline = time.monotonic() + timeout
        while True:
            message = self._read_message(deadline)
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method} failed: {message['error']}")
                return message.get("result", {})
            if message.get("method") == "Runtime.consoleAPICalled":
                args = message["params"].get("args", [])
                self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in args))
            elif "method" in message:
                self._events.append(message)

    # -- page ----------------------------------------------------------------------------------------------
    def navigate(self, url: str, timeout: float = 30) -> None:
        result = self.call("Page.navigate", {"url": url}, session=True, timeout=timeout)
        if result.get("errorText"):
            raise RuntimeError(f"navigating to {url} failed: {result['errorText']}")

    def evaluate(self, expression: str, timeout: float = 30) -> Any:
        """Evaluate a JavaScript expression in the page (promises awaited) and return its JSON value."""
        result = self.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
            session=True,
            timeout=timeout,
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"JavaScript failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float, interval: float = 0.5) -> Any:
        """Poll a JavaScript expression until it is truthy; return its value, or raise TimeoutError with the
        last value seen."""
        deadline = time.monotonic() + timeout
        value: Any = None
        while time.monotonic() < deadline:
            value = self.evaluate(expression, timeout=max(1.0, deadline - time.monotonic()))
            if value:
                return value
            time.sleep(interval)
        raise TimeoutError(f"waited {timeout:.0f}s for {expression[:200]!r}; last value {value!r}")

    def screenshot(self, path: str | Path | None = None) -> bytes:
        png = base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"}, session=True)["data"])
        if path is not None:
            Path(path).write_bytes(png)
        return png


# Helpers for page scripts: TensorBoard's Polymer dashboards live in shadow DOM, which ``innerText``,
# ``querySelectorAll`` and ``--dump-dom`` do not see into, so these walk shadow roots (and same-origin iframes).
_DEEP_HELPERS = r"""
const deepAll = (root, selector) => {
  const found = [];
  const walk = (r) => {
    for (const el of r.querySelectorAll('*')) {
      if (el.matches(selector)) found.push(el);
      if (el.shadowRoot) walk(el.shadowRoot);
      if (el.tagName === 'IFRAME') {
        try { if (el.contentDocument) walk(el.contentDocument); } catch (e) {}
      }
    }
  };
  walk(root);
  if (root.shadowRoot) walk(root.shadowRoot);
  return found;
};
const deepText = (root) => {
  const out = [];
  const walk = (r) => {
    for (const node of r.childNodes) {
      if (node.nodeType === Node.TEXT_NODE) {
        const parent = node.parentNode && node.parentNode.tagName;
        const t = node.textContent.trim();
        if (t && parent !== 'STYLE' && parent !== 'SCRIPT') out.push(t);
      } else if (node.nodeType === Node.ELEMENT_NODE) {
        if (node.shadowRoot) walk(node.shadowRoot);
        walk(node);
      }
    }
  };
  if (root.shadowRoot) walk(root.shadowRoot);
  walk(root);
  return out.join('\n');
};
"""


def page_script(body: str) -> str:
    """A JavaScript expression that runs ``body`` (statements ending in ``return ...``) with ``deepAll(root,
    selector)`` and ``deepText(root)`` in scope."""
    return f"(() => {{{_DEEP_HELPERS}\n{body}\n}})()"
