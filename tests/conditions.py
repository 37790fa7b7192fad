"""Waiting on conditions instead of sleeping: the one helper every test uses."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float = 30, what: str = "condition") -> T:
    """Poll ``condition`` until it returns something true, and return that;
    fail with ``what`` in the message after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.02)


def process_rss(pid: int) -> int:
    """Resident memory of process ``pid`` in bytes (Linux /proc)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def paced(condition: Callable[[], T], interval: float) -> Callable[[], T | None]:
    """``condition``, asked at most once every ``interval`` seconds (None in between):
    for conditions that cost the server a connection, which its rate limits count."""
    last = [float("-inf")]

    def ask() -> T | None:
        if time.monotonic() - last[0] < interval:
            return None
        last[0] = time.monotonic()
        return condition()

    return ask


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """A loopback TCP port that accepts connections and never answers (a hung
    slapd, rspamd, Redis...): yields the port; everything is closed afterwards."""
    from tests.daemon import free_port

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", free_port()))
    listener.listen(64)
    listener.settimeout(0.2)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        for connection in held + [listener]:
            connection.close()


def _thread_states(pid: int) -> list[str]:
    """The scheduler state letter of each thread of process ``pid`` (Linux /proc)."""
    states = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/stat") as stat:
                states.append(stat.read().rpartition(")")[2].split()[0])
        except FileNotFoundError:  # a thread that ended meanwhile
            pass
    return states


class ServerProcess:
    """A server a test started (slapd, redis-server): stop it, or freeze it (SIGSTOP: the
    kernel still accepts connections, nothing answers them) and let it run again."""

    process: subprocess.Popen[bytes] | None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.resume()  # a frozen process would not act on SIGTERM
            self.process.terminate()
            self.process.wait(10)
        self.process = None

    def pause(self) -> None:
        """SIGSTOP, and wait until every thread has stopped: the signal is delivered
        asynchronously, and a thread still running could answer one more request
        (a hung-server test then saw its query answered: failed 1 in ~20 runs)."""
        assert self.process is not None
        pid = self.process.pid
        os.kill(pid, signal.SIGSTOP)
        wait_until(lambda: all(state in ("T", "t") for state in _thread_states(pid)), 10,
                   what=f"every thread of process {pid} stopped")

    def resume(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
