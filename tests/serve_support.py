"""`fuselm serve` as a subprocess on 127.0.0.1 for tests: the Server helper shared by the serve
and engine tests, and the API key it is given."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import yaml

from .engine_support import free_port

KEY = "test-key-123"


class Server:
    def __init__(self, config: dict, tmp: Path, env: dict | None = None):
        self.port = free_port()
        path = tmp / "serve.yaml"
        path.write_text(yaml.safe_dump({**config, "port": self.port}))
        self.log = open(tmp / "serve.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fuselm.cli", "serve", "--config", str(path)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self.tmp = tmp
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {(tmp / 'serve.log').read_text()}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server not ready in 300 s")

    def client(self, key: str | None = KEY):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or "none", max_retries=0, timeout=120)

    def post(self, path: str, body, key: str | None = KEY, **kw):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if isinstance(body, (bytes, str)):
            return httpx.post(self.url + path, content=body, headers={**headers, "content-type": "application/json"},
                              timeout=120, **kw)  # fmt: skip
        return httpx.post(self.url + path, json=body, headers=headers, timeout=120, **kw)

    def metric(self, name: str, **labels) -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        total = 0.0
        for line in text.splitlines():
            m = re.match(rf"^{name}(?:\{{([^}}]*)\}})? (\S+)$", line)
            if m and all(part in (m.group(1) or "") for part in want.split(",") if part):
                total += float(m.group(2))
        return total

    def stop(self) -> None:
        """SIGTERM: uvicorn finishes in-flight requests, shuts down, and exits by the signal."""
        self.proc.terminate()
        try:
            rc = self.proc.wait(timeout=60)
        finally:
            self.log.close()
        log = (self.tmp / "serve.log").read_text()
        assert rc in (0, -signal.SIGTERM), f"exit status {rc}\n{log}"
        assert "Traceback" not in log and "never retrieved" not in log, log
