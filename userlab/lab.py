"""Start JupyterLab on this machine only, behind a random token (``userlab lab``).

The server always listens on ``127.0.0.1`` (never on a public interface), on a free port,
and every request must carry the token. Settings that make JupyterLab reach the internet
(news feed, update check, the PyPI extension manager) are switched off, so it also works
offline. Used by ``userlab lab`` and by the browser test (``tests/test_browser.py``).

Example::

    with start_lab("notebooks") as lab:
        lab.wait_ready()
        print(lab.url("04_attention_and_margins.ipynb"))
"""
from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import threading
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Mapping, Optional, Sequence

from .errors import DataError, UserlabError

#: The only address the server listens on.
HOST = "127.0.0.1"


class LabError(UserlabError, RuntimeError):
    """JupyterLab did not start, or stopped before it became ready."""


def free_port(host: str = HOST) -> int:
    """A TCP port on ``host`` that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def lab_command(root_dir: Path, port: int) -> list[str]:
    """The ``jupyter lab`` command line: local only, no network calls.

    The token is not on it: every local user can read a process's command line (``ps``,
    ``/proc/<pid>/cmdline``), so :func:`start_lab` hands the token over in the server's
    environment (``JUPYTER_TOKEN``), which only the same user can read.
    """
    cmd = [
        sys.executable, "-m", "jupyter", "lab",
        "--no-browser",
        f"--ServerApp.ip={HOST}",
        f"--ServerApp.port={port}",
        # fail instead of silently moving to another port: the caller builds URLs from `port`
        "--ServerApp.port_retries=0",
        f"--ServerApp.root_dir={root_dir}",
        # no requests to the outside: news feed, update check, PyPI extension search
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.extension_manager=readonly",
    ]
    # jupyter refuses to start as root without this flag; never pass it otherwise
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    return cmd


class LabServer:
    """A running ``jupyter lab`` process (see :func:`start_lab`).

    Attributes:
        root_dir: the folder the server shows (notebook paths are relative to it).
        port: the port it listens on, on ``127.0.0.1``.
        token: the access token every request must carry.
        process: the ``subprocess.Popen`` of the server.
        log_path: file holding the server's stdout and stderr.
    """

    def __init__(self, root_dir: Path, port: int, token: str, process: subprocess.Popen, log_path: Path):
        self.root_dir, self.port, self.token = root_dir, port, token
        self.process, self.log_path = process, log_path

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def url(self, path: str = "") -> str:
        """The browser URL of ``path`` (relative to ``root_dir``), token included."""
        quoted = urllib.parse.quote(str(path).replace(os.sep, "/").lstrip("/"))
        tree = f"/lab/tree/{quoted}" if quoted else "/lab"
        return f"{self.base_url}{tree}?token={self.token}"

    def api_url(self, endpoint: str, token: bool = True) -> str:
        """URL of a REST endpoint such as ``api/status``, with or without the token."""
        url = f"{self.base_url}/{endpoint.lstrip('/')}"
        return f"{url}?token={self.token}" if token else url

    def log_text(self) -> str:
        """What the server has written to its log so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def running(self) -> bool:
        return self.process.poll() is None

    def wait_ready(self, timeout: float = 60.0) -> "LabServer":
        """Poll ``/api/status`` (with the token) until it answers 200.

        Raises:
            LabError: the server exited, or did not answer within ``timeout`` seconds; the
                message holds the end of the server log.
        """
        deadline = time.monotonic() + timeout
        status_url = self.api_url("api/status")
        while True:
            if not self.running():
                raise LabError(f"jupyter lab exited with status {self.process.returncode} before it was "
                               f"ready (root {self.root_dir}); log:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(status_url, timeout=5) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise LabError(f"jupyter lab on {self.base_url} did not answer {status_url.split('?')[0]} "
                               f"within {timeout:.0f} s; log:\n{self._log_tail()}")
            time.sleep(0.25)

    def stop(self, timeout: float = 10.0, keep_log: bool = False) -> None:
        """Terminate the server (its kernels go with it); kill it if it does not exit in time.

        Args:
            timeout: seconds to wait after terminate, and again after kill.
            keep_log: leave :attr:`log_path` on disk (it is removed by default).
        """
        if self.running():
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)
        if not keep_log:
            self.log_path.unlink(missing_ok=True)

    def _log_tail(self, chars: int = 3000) -> str:
        return self.log_text()[-chars:]

    def __enter__(self) -> "LabServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running() else f"exited {self.process.returncode}"
        return f"LabServer({self.base_url}, root={self.root_dir}, {state})"


def start_lab(root_dir: str | os.PathLike, port: Optional[int] = None, token: Optional[str] = None,
              env: Optional[Mapping[str, str]] = None) -> LabServer:
    """Start ``jupyter lab`` in the background; call :meth:`LabServer.wait_ready` before use.

    Args:
        root_dir: folder to serve; must exist.
        port: port on 127.0.0.1 (default: a free one chosen by the OS).
        token: access token (default: 48 random hex digits). An empty token is refused:
            the server is always token-protected.
        env: extra environment variables for the server and its kernels (e.g.
            ``{"USERLAB_SMOKE": "1"}``), on top of this process's environment.

    Returns:
        The running :class:`LabServer` (a context manager that stops it on exit).

    Raises:
        DataError: ``root_dir`` is not a folder.
        LabError: ``token`` is empty.
    """
    root = Path(root_dir).expanduser().resolve()
    if not root.is_dir():
        raise DataError(root, "JupyterLab root folder does not exist")
    if token is not None and not str(token).strip():
        raise LabError("start_lab: token must not be empty (the server is always token-protected)")
    token = token or secrets.token_hex(24)
    port = port or free_port()
    full_env = dict(os.environ)
    full_env.update(env or {})
    # the token travels in the environment, never on the command line (readable by all users);
    # a stray token file setting must not take precedence over it
    full_env.pop("JUPYTER_TOKEN_FILE", None)
    full_env["JUPYTER_TOKEN"] = token
    # a file, not a pipe: an unread pipe fills up and blocks the server
    log_file = tempfile.NamedTemporaryFile(prefix="userlab-lab-", suffix=".log", delete=False)
    try:
        process = subprocess.Popen(lab_command(root, port), cwd=root, env=full_env,
                                   stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
    finally:
        log_file.close()
    return LabServer(root, port, token, process, Path(log_file.name))


def serve(root_dir: str | os.PathLike = "notebooks", port: Optional[int] = None,
          timeout: float = 120.0) -> int:
    """Start JupyterLab, print its URL and wait until Ctrl-C or SIGTERM (``userlab lab``).

    Returns:
        0 when stopped by the user, else the server's own non-zero exit status.
    """
    lab = start_lab(root_dir, port=port)
    previous = None
    if threading.current_thread() is threading.main_thread():
        # `kill <pid>` must not orphan the server: turn SIGTERM into the Ctrl-C path below
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        lab.wait_ready(timeout)
        print(f"JupyterLab serves {lab.root_dir} (local only). Open:\n  {lab.url()}\nCtrl-C stops it.",
              flush=True)
        while lab.running():
            time.sleep(0.5)
        print(f"jupyter lab exited with status {lab.process.returncode}; end of its log:\n{lab._log_tail()}",
              file=sys.stderr)
        return lab.process.returncode or 1
    except KeyboardInterrupt:
        print("stopping JupyterLab ...", file=sys.stderr)
        return 0
    finally:
        lab.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``userlab lab``."""
    parser.add_argument("--root", default="notebooks", help="folder to serve (default: %(default)s)")
    parser.add_argument("--port", type=int, help="port on 127.0.0.1 (default: a free one)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m userlab.lab [--root notebooks] [--port N]``."""
    parser = argparse.ArgumentParser(prog="userlab lab", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return serve(args.root, port=args.port)
    except UserlabError as exc:
        print(f"userlab lab: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
