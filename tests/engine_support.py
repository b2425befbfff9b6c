"""Helpers of the tests that talk to engines over HTTP: engine server processes started in a
process group of their own, free ports, real TCP servers on 127.0.0.1 for faults, and experts
on an engine's URL."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs (zombies do not count: where PID 1 reaps no
    orphans, the engine's children stay zombies and would answer signals forever)."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: a signal to the group says whether anyone is in it
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


class EngineProcess:
    def __init__(self, kind: str, proc: subprocess.Popen | None, url: str):
        self.kind, self.proc, self.url = kind, proc, url

    def stop(self, sig: int = signal.SIGTERM, wait_s: float = 60) -> None:
        """Signal the engine's whole process group (vLLM's engine core and worker, SGLang's
        scheduler: killing the server alone leaves them running, holding memory and a core) and
        wait until every member is gone; SIGKILL what outlives `wait_s`."""
        if self.proc is None:
            return
        deadline = time.time() + wait_s
        try:
            os.killpg(self.proc.pid, sig)
            while _group_alive(self.proc.pid):
                self.proc.poll()  # reaps the leader once it exits
                if time.time() > deadline:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                time.sleep(0.2)
        except ProcessLookupError:
            pass
        self.proc.wait()


def engine_process(kind: str, cmd: list[str], port: int, ready: str, log_dir: Path):
    """Start an engine server in a process group of its own, wait until `ready` answers 200,
    yield it, stop the group."""
    log = open(log_dir / f"{kind}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    engine = EngineProcess(kind, proc, f"http://127.0.0.1:{port}")
    deadline = time.time() + 600
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{kind} exited: {Path(log.name).read_text()[-2000:]}")
            try:
                if httpx.get(engine.url + ready, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"{kind} not ready in 600 s")
            time.sleep(1)
        yield engine
    finally:
        engine.stop()
        log.close()


def remote_model(url: str, name: str = "smol-vllm", kind: str = "vllm", **kw):
    from fuselm.config import ModelConfig
    from fuselm.models.loading import load_model

    return load_model(ModelConfig(name=name, engine=kind, url=url, **kw))


class LocalTCPServer:
    """A real TCP server on 127.0.0.1 that hands each connection it accepts to `_accepted`."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._accepted(conn)

    def _accepted(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.sock.close()


class ResettingProxy(LocalTCPServer):
    """A proxy in front of `upstream`: the first `resets` connections are reset (RST) once their
    request has arrived, the way a keep-alive connection closed by the server under a client's
    new request ends; every later one is passed through."""

    def __init__(self, upstream: str, resets: int) -> None:
        self.upstream = httpx.URL(upstream)
        self.resets_left, self.reset = resets, 0
        super().__init__()

    def _accepted(self, conn: socket.socket) -> None:
        threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        first = conn.recv(65536)
        if self.resets_left > 0 and first:
            self.resets_left -= 1
            self.reset += 1
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()  # linger on, 0 s: a reset, not an orderly close
            return
        up = socket.create_connection((self.upstream.host, self.upstream.port))
        up.sendall(first)
        threading.Thread(target=self._pipe, args=(up, conn), daemon=True).start()
        self._pipe(conn, up)

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
