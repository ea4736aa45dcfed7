"""Servers specbench starts itself (`server.baseline_cmd`, `server.spec_cmd`), one mode at a time.

    with started_server(command, mode, url, log_path, start_timeout_s) as server:
        ...  # server.base_url answers; server.check_alive() raises if it has exited

The command runs in a shell of its own process group, so that stopping it stops every
process it started (vLLM's engine workers, for one). `{port}` in it becomes a free port,
and the server's URL http://127.0.0.1:PORT/v1; a command without `{port}` listens where
the mode's URL says. Its output goes to `log_path`, which becomes a run artifact.

The server is ready when `GET /health` answers 200 (vLLM, SGLang, llama.cpp's
llama-server), or, where there is no /health, `GET /v1/models` does (llama-cpp-python's
server). A server that exits first, or is not ready within `start_timeout_s`, raises a
`ServerError` whose message ends with the last lines of its log. Stopping sends SIGTERM
to the group, then SIGKILL after `STOP_GRACE_S`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from specbench.errors import ServerError
from specbench.server.http import get

POLL_S = 0.5  # between health checks
STOP_GRACE_S = 30.0  # SIGTERM, then SIGKILL
LOG_TAIL_LINES = 20


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def root_url(base_url: str) -> str:
    """The server's root (where /health and /metrics are) under its OpenAI base URL."""
    return base_url.rstrip("/").removesuffix("/v1")


def base_url(url: str) -> str:
    """A server URL as its OpenAI base URL, ending in /v1."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines of a log file."""
    if not path.is_file():
        return "(no log)"
    text = path.read_text(encoding="utf-8", errors="replace").rstrip("\n").splitlines()
    return "\n".join(text[-lines:]) if text else "(the log is empty)"


@dataclass
class ManagedServer:
    """A running server process and where it answers."""

    mode: str
    command: str
    base_url: str
    log_path: Path
    process: subprocess.Popen

    def failure(self, problem: str) -> ServerError:
        """An error naming the server, `problem`, and the last lines of its log."""
        return ServerError(
            f"the {self.mode} server ({self.command}) {problem}: see its log {self.log_path}, "
            f"whose last lines are:\n{log_tail(self.log_path)}"
        )

    def check_alive(self) -> None:
        """Raise if the process has exited."""
        code = self.process.poll()
        if code is not None:
            raise self.failure(f"exited with code {code}")

    def wait_until_ready(self, start_timeout_s: float) -> None:
        """Poll its health endpoint until it answers, it exits, or `start_timeout_s` passes."""
        deadline = time.monotonic() + start_timeout_s
        while True:
            self.check_alive()
            if _answers(self.base_url):
                return
            if time.monotonic() > deadline:
                raise self.failure(
                    f"did not answer {root_url(self.base_url)}/health or /v1/models within "
                    f"server.start_timeout_s={start_timeout_s:g} s"
                )
            time.sleep(POLL_S)

    def stop(self) -> None:
        """SIGTERM to its process group, SIGKILL if any of it is still there after STOP_GRACE_S; returns when the
        group is gone (the shell may exit before the server it started, which would still hold the port)."""
        group = self.process.pid  # start_new_session: the shell leads a group of its own
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + STOP_GRACE_S
            while time.monotonic() < deadline:
                self.process.poll()  # reap the shell
                if not _group_alive(group):
                    return
                time.sleep(0.05)


def _group_alive(group: int) -> bool:
    """Whether a process of the group still runs (zombies, which hold nothing, do not count)."""
    stats = list(Path("/proc").glob("[0-9]*/stat"))
    if not stats:  # no /proc: ask the kernel, which counts zombies too
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in stats:
        try:
            state, _, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue  # it ended while we looked
        if int(pgrp) == group and state != "Z":
            return True
    return False


def _answers(base: str) -> bool:
    """Whether the server is ready: /health says 200, or, without a /health, /v1/models does."""
    try:
        health, _ = get(f"{root_url(base)}/health", timeout_s=4 * POLL_S)
        if health in (404, 405):
            return get(f"{base}/models", timeout_s=4 * POLL_S)[0] == 200
        return health == 200
    except OSError:
        return False  # not listening yet


@contextmanager
def started_server(
    command: str, mode: str, url: str | None, log_path: Path, start_timeout_s: float
) -> Iterator[ManagedServer]:
    """Start `command` (its `{port}` filled), wait until it is ready, yield it, and stop it however the block ends."""
    if "{port}" in command:
        port = free_port()
        command = command.replace("{port}", str(port))  # not str.format: commands hold JSON braces
        url = f"http://127.0.0.1:{port}/v1"
    assert url is not None, "validation requires {port} or the mode's URL"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        log.write(f"==> specbench started: {command}\n".encode())
        log.flush()
        process = subprocess.Popen(
            command, shell=True, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    server = ManagedServer(mode, command, base_url(url), log_path, process)
    try:
        server.wait_until_ready(start_timeout_s)
        yield server
    finally:
        server.stop()
