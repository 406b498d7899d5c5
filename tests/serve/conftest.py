"""Real server processes on loopback: `torchrun --nproc-per-node 2` (gloo ranks) running scripts/serve_moe.py."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parent_pid(proc_entry: Path) -> int:
    """The parent of the process at /proc/<pid> (the field after the command name, which may hold spaces)."""
    return int((proc_entry / "stat").read_text().rsplit(")", 1)[1].split()[1])


class Server:
    def __init__(self, *args, ranks: int = 2, startup_s: float = 240, script: Path | None = None,
                 env: dict | None = None):
        """`script`: run instead of scripts/serve_moe.py (a test's wrapper around it), with `env` added."""
        self.port = free_port()
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
                   f"--master-port={free_port()}", str(script or ROOT / "scripts" / "serve_moe.py"),
                   "--port", str(self.port), *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TESSERA_DIST_TIMEOUT": "60", **(env or {})}
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"tessera-serve-{self.port}.log", "w+")
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = httpx.Client(base_url=self.url, timeout=120)
        deadline = time.time() + startup_s
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.output()}")
            try:
                if self.client.get("/health").status_code == 200:
                    self.workers = self.worker_pids()  # rank -> pid, kept: they outlive torchrun if it dies
                    self.api = self.api_pid()
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server did not come up in {startup_s} s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-6000:]

    def worker_pids(self) -> dict[int, int]:
        """rank -> pid of the worker processes torchrun started."""
        pids = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if parent_pid(entry) != self.process.pid:
                    continue
                environ = dict(kv.split("=", 1) for kv in (entry / "environ").read_text().split("\0") if "=" in kv)
            except (OSError, IndexError, ValueError):
                continue
            if "RANK" in environ:
                pids[int(environ["RANK"])] = int(entry.name)
        return pids

    def api_pid(self) -> int | None:
        """The pid of rank 0's API process (engine.serving.api_process), if it runs one: kept, as the workers'
        are."""
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and b"engine.serving.api_process" in (entry / "cmdline").read_bytes() \
                        and parent_pid(entry) == self.workers[0]:
                    return int(entry.name)
            except (OSError, IndexError, ValueError):
                continue
        return None

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        """torchrun starts every worker in a session of its own: ask torchrun to stop them (SIGTERM; rank 0
        drains), then kill whatever is left, workers included, so no server outlives its test."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        for pid in [*getattr(self, "workers", {}).values(), *filter(None, [getattr(self, "api", None)])]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.client.close()
        self.log.close()


@pytest.fixture(scope="module")
def server_factory():
    started = []

    def start(*args, **kwargs):
        server = Server(*args, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
