"""A real single-node slurm cluster for tests: munged, slurmctld and slurmd from Debian's slurm-wlm, configured in
a temporary directory (CPUs and memory from `slurmd -C`), stopped again by the PIDs this code started."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_pid(path: Path, timeout: float = 20) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and path.read_text().strip():
            return int(path.read_text().strip())
        time.sleep(0.1)
    raise RuntimeError(f"{path} did not appear")


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.started: list[tuple[str, int]] = []

    @staticmethod
    def missing() -> Optional[str]:
        tools = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo")
        absent = [t for t in tools if shutil.which(t) is None and not os.path.exists(f"/usr/sbin/{t}")]
        if absent:
            return f"slurm/munge not installed ({', '.join(absent)} missing; apt-get install slurm-wlm munge)"
        if os.geteuid() != 0:
            return "a test slurm cluster needs root (slurmd runs jobs as root here)"
        return None

    def start(self) -> SlurmCluster:
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        node = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
        host = node.split()[0].split("=")[1]
        r = self.root
        self.conf.write_text(f"""ClusterName=llmforgetest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
JobRequeue=1
ReturnToService=2
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
KillWait=30
{node} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
            Path("/run/munge").mkdir(parents=True, exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            pidfile = Path("/run/munge/munged.pid")
            pidfile.unlink(missing_ok=True)
            subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
            self.started.append(("munged", _read_pid(pidfile)))
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([daemon, "-f", str(self.conf)], check=True, env=self.env)
            self.started.append((daemon, _read_pid(self.root / f"{daemon}.pid")))
        deadline = time.time() + 60
        while time.time() < deadline:
            out = self.run("sinfo", "-h", "-o", "%t").stdout.strip()
            if out == "idle":
                return self
            time.sleep(0.5)
        raise RuntimeError(
            f"slurm node never became idle: {out!r}\n{(self.root / 'log/slurmd.log').read_text()[-2000:]}"
        )

    def run(self, *cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), capture_output=True, text=True, env=self.env)

    def job_field(self, job: str, field: str) -> str:
        out = self.run("scontrol", "show", "job", job).stdout
        for token in out.split():
            if token.startswith(field + "="):
                return token.split("=", 1)[1]
        return ""

    def stop(self) -> None:
        for _name, pid in reversed(self.started):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
        self.started.clear()
