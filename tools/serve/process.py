"""A ``tierstore serve`` in a child process (benchmarks, tests): start it on a free loopback port,
wait until it listens, stop it with SIGTERM. The child runs offline (no model hub)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

READY = re.compile(rb"listening on (http://[\d.]+:\d+)")


class ServerProcess:
    """``args``: ``tierstore serve`` options (``--port 0`` is added); output goes to ``log``."""

    def __init__(self, args: list[str], log: str | os.PathLike, *, ready_s: float = 180) -> None:
        self.args, self.log, self.ready_s = list(args), Path(log), ready_s
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> "ServerProcess":
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        start = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "tierstore.tools.cli", "serve", "--host", "127.0.0.1",
                                          "--port", "0", *self.args], stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.ready_s
        while time.monotonic() < deadline:
            m = READY.search(self.log.read_bytes()[start:])
            if m:
                self.url = m.group(1).decode()
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"tierstore serve did not start (exit {self.proc.returncode}):\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        return self.log.read_bytes()[-n:].decode(errors="replace") if self.log.exists() else ""

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then wait: the exit status (0 for a graceful stop)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            try:
                self.stop()
            finally:
                self.kill()
