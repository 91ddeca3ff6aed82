"""A real single-node SLURM cluster on localhost, for the cluster tests (Debian's SLURM 22.05).

Everything is the real scheduler -- munged, slurmctld, slurmd, sbatch, srun, scontrol, squeue,
requeue and signals -- started without systemd from files in one temporary folder, and stopped by
PID. One stand-in: with no accounting database there is no working `sacct`, which submitit reads job
states from, so a small `sacct` on PATH answers from `squeue` (completed jobs stay there for
MinJobAge). Scheduling, requeue and the kill timings are shortened so a requeue takes seconds.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
DAEMONS = ["munged", "slurmctld", "slurmd", "sbatch"]

SACCT = """#!/bin/sh
# sacct stand-in (no accounting database here): job states from squeue, in the format submitit parses
ids=""
while [ $# -gt 0 ]; do
  case "$1" in -j) shift; ids="$1";; -j*) ids="${1#-j}";; esac
  shift
done
echo "JobID|State|NodeList"
squeue -h -a --states=all ${ids:+-j "$ids"} -o "%i|%T|%N" 2>/dev/null
"""


def missing() -> list[str]:
    return [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]


def install() -> str | None:
    """apt-get install the packages (as `make test` does in CI); None on success, else why not."""
    if not missing():
        return None
    apt = (["sudo"] if os.geteuid() else []) + ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-y", "-q"]
    for cmd in (apt + ["install", "--no-install-recommends", *PACKAGES], apt + ["update"],
                apt + ["install", "--no-install-recommends", *PACKAGES]):
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode == 0 and not missing():
            return None
    return f"apt-get could not install {PACKAGES}: {done.stderr.strip().splitlines()[-1:]}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    """`start()` writes the config and starts the daemons; `env` is what a client needs
    (SLURM_CONF, and PATH with the sacct stand-in first); `stop()` kills what it started."""

    def __init__(self, root: Path, cpus: int = 4):
        self.root = root
        self.cpus = cpus
        self.node = socket.gethostname().split(".")[0]
        self.pids: list[int] = []
        self.env: dict[str, str] = {}
        # munged runs as `munge`, which must reach its folder: one under a world-traversable /tmp
        # folder of its own (test temp folders are 0700)
        self._munge_parent = Path(tempfile.mkdtemp(prefix="tinymim-munge-"))
        self._munge_parent.chmod(0o755)
        self.munge_dir = self._munge_parent / "munge"

    def _conf(self) -> str:
        r = self.root
        return "\n".join([
            "ClusterName=tinymim-test", f"SlurmctldHost={self.node}(127.0.0.1)", "SlurmUser=root",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={self.munge_dir}/munge.socket,cred_expire=10",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool", f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd.pid", f"SlurmctldLogFile={r}/slurmctld.log", f"SlurmdLogFile={r}/slurmd.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU", "SlurmdParameters=config_overrides",
            "AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none",
            "ReturnToService=2", "MinJobAge=3600", "KillWait=2", "MessageTimeout=5", "InactiveLimit=0",
            "SchedulerParameters=sched_interval=1,sched_min_interval=100000", "SchedulerType=sched/builtin",
            "SlurmctldTimeout=10", "SlurmdTimeout=10", "JobRequeue=1",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=4000 State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO", ""])

    def _munge(self) -> None:
        d = self.munge_dir
        d.mkdir(mode=0o700)
        key = d / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        shutil.chown(d, "munge", "munge")
        shutil.chown(key, "munge", "munge")
        _run(["runuser", "-u", "munge", "--", "munged", f"--socket={d}/munge.socket", f"--key-file={key}",
              f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log", f"--seed-file={d}/munged.seed", "--force"])
        self.pids.append(int(_wait_for(d / "munged.pid").read_text()))

    def start(self, timeout: float = 30) -> LocalSlurm:
        for sub in ("state", "spool", "bin"):
            (self.root / sub).mkdir(parents=True)
        conf = self.root / "slurm.conf"
        conf.write_text(self._conf())
        sacct = self.root / "bin" / "sacct"
        sacct.write_text(SACCT)
        sacct.chmod(0o755)
        self.env = {"SLURM_CONF": str(conf), "PATH": f"{self.root / 'bin'}:{os.environ['PATH']}"}
        env = os.environ | self.env
        self._munge()
        for daemon, pid in (("slurmctld", "slurmctld.pid"), ("slurmd", "slurmd.pid")):
            _run([daemon, "-c"] if daemon == "slurmctld" else [daemon], env)
            self.pids.append(int(_wait_for(self.root / pid).read_text()))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout.strip()
            if state == "idle":
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"local SLURM node not idle after {timeout} s (sinfo: {state!r}); logs in {self.root}")

    def stop(self, drain_s: float = 20) -> None:
        """Cancel every job and wait for the queue to drain (a daemon killed under a running job
        leaves its tasks behind), kill the daemons, then anything still running with this
        cluster's SLURM_CONF in its environment."""
        env = os.environ | self.env
        if self.env:
            subprocess.run(["scancel", "--full", "--partition", "debug"], env=env, capture_output=True)
            deadline = time.monotonic() + drain_s
            while time.monotonic() < deadline and subprocess.run(
                    ["squeue", "-h", "-t", "PD,R,CG,RQ,S", "-o", "%i"], env=env, capture_output=True,
                    text=True).stdout.strip():
                time.sleep(0.3)
        for pid in reversed(self.pids):
            try:
                os.kill(pid, 15)
            except ProcessLookupError:
                pass
        self.pids.clear()
        if self.env:
            _kill_left_over(f"SLURM_CONF={self.env['SLURM_CONF']}".encode())
        shutil.rmtree(self._munge_parent, ignore_errors=True)


def _kill_left_over(marker: bytes) -> None:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                os.kill(int(proc.name), 9)
        except (OSError, ProcessLookupError):
            pass


def _run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{cmd[0] if cmd[0] != 'runuser' else cmd[4]} failed to start: {done.stderr.strip()}")


def _wait_for(path: Path, timeout: float = 15) -> Path:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().strip()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)
    return path
