"""A real single-node Slurm (slurmctld + slurmd + munge on loopback) for the tests in this folder.

Started once per session by ../shared/tools/start_local_slurm.sh in a private folder with free
ports (so parallel sessions do not collide), with a fake-GPU `gpu` partition; stopped at the end
by stop_local_slurm.sh — from the fixture's finalizer and, should the session die, from atexit.
A cluster that cannot start fails the tests with the script's log: nothing is skipped.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO.parent / "shared" / "tools"


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Cluster:
    dir: Path
    conf: str
    env: dict[str, str]

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=60, check=False)

    def queued(self) -> list[str]:
        """Lines `id state name` of every job still in the queue."""
        return [ln for ln in self.run("squeue", "-h", "-o", "%i %T %j").stdout.splitlines() if ln.strip()]

    def jobs(self) -> list[dict[str, str]]:
        """Every job slurmctld still knows (finished ones stay for MinJobAge = 300 s)."""
        from atlaspatch_assets.core.slurm import _FIELD

        out = self.run("scontrol", "show", "job", "-o").stdout
        return [dict(_FIELD.findall(line)) for line in out.splitlines() if "JobId=" in line]


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.fail("the Slurm tests start a local cluster and must run as root (as CI does)")
    base = Path(tempfile.mkdtemp(prefix="ap-slurm-", dir="/tmp"))
    base.chmod(0o755)  # munged wants o+x on every parent of its socket folder
    ctld, slurmd = _free_ports(2)
    env = {
        **os.environ,
        "LOCAL_SLURM_DIR": str(base / "cluster"),
        "LOCAL_SLURM_CLUSTER": f"ap{os.getpid()}",
        "LOCAL_SLURM_CTLD_PORT": str(ctld),
        "LOCAL_SLURM_SLURMD_PORT": str(slurmd),
        "LOCAL_SLURM_FAKE_GPUS": "1",
        "LOCAL_SLURM_FIX_HOSTS": "1",
        "LOCAL_SLURM_MEM_MB": "8192",
    }
    stopped = False

    def stop() -> None:
        nonlocal stopped
        if stopped:
            return
        stopped = True
        subprocess.run(
            ["bash", str(TOOLS / "stop_local_slurm.sh"), "--purge"], env=env, capture_output=True, timeout=120
        )
        shutil.rmtree(base, ignore_errors=True)

    atexit.register(stop)
    proc = subprocess.run(
        ["bash", str(TOOLS / "start_local_slurm.sh")], env=env, capture_output=True, text=True, timeout=900
    )
    if proc.returncode != 0:
        log = (proc.stdout + proc.stderr)[-6000:]
        stop()
        pytest.fail(f"start_local_slurm.sh failed (exit {proc.returncode}):\n{log}", pytrace=False)
    conf = str(base / "cluster" / "etc" / "slurm.conf")
    try:
        yield Cluster(base, conf, {**os.environ, "SLURM_CONF": conf})
    finally:
        stop()


@pytest.fixture
def slurm_options(slurm_cluster: Cluster) -> dict:
    """SlurmResource fields for the test cluster: this Python, this checkout, fast polling."""
    return {
        "enabled": True,
        "slurm_conf": slurm_cluster.conf,
        "python": sys.executable,
        "env": {"PYTHONPATH": str(REPO)},
        "cpus_per_task": 1,
        "mem": "3G",
        "time_limit": "00:15:00",
        "poll_seconds": 0.3,
        "cancel_timeout": 60.0,
    }
