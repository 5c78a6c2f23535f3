"""A throw-away one-node Slurm cluster for tests: munged, slurmctld and slurmd started as child processes.

Needs root and Debian's `slurm-wlm` and `munge` packages (see shared/docs/machines.md). Every daemon runs in
the foreground as a child of the test, so it is stopped by its PID; nothing is installed as a service and
nothing outside one temporary directory is written. Clients reach the cluster through `SLURM_CONF`, which
`env` carries (and which sbatch exports into the jobs, so their inner `srun` finds the cluster too).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "sinfo")
# Job states after which a job no longer changes by itself (a requeued job goes back to PENDING instead).
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# Seconds a job credential lives, which is also how long a requeued job waits before it may start again (its old
# credential must expire first); Slurm's default of 120 would make every requeue test wait two minutes. With
# sched_interval=1 (slurm.conf) the scheduler then starts it within a second rather than a minute.
CRED_EXPIRE = 5


def missing_requirements() -> str | None:
    """Why this machine cannot run the cluster, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (munged runs as user munge, slurmd as root)"
    absent = [name for name in DAEMONS if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]
    if absent:
        return f"missing {', '.join(absent)} (apt-get install -y slurm-wlm munge)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' user (apt-get install -y munge)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmCluster:
    """`with SlurmCluster(cpus=2) as cluster: cluster.sbatch([...])`; daemons stop (by PID) on exit."""

    def __init__(self, cpus: int = 2) -> None:
        self.cpus = cpus
        # Not pytest's tmp_path: its parents are mode 0700, and user munge must be able to reach its own files.
        self.root = Path(tempfile.mkdtemp(prefix="pope-lm-slurm-"))
        self.root.chmod(0o711)
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.node = socket.gethostname().split(".")[0]
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._procs: dict[str, subprocess.Popen] = {}

    def __enter__(self) -> SlurmCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> None:
        self._start_munged(timeout)
        self._write_conf()
        for daemon in ("slurmctld", "slurmd"):
            log = open(self.root / f"{daemon}.stdout", "wb")  # noqa: SIM115 - the daemon holds it while it runs
            # -D: stay in the foreground (our child, stoppable by PID); -c: ignore any state of earlier runs.
            args = [_binary(daemon), "-D", "-c"] if daemon == "slurmctld" else [_binary(daemon), "-D"]
            self._procs[daemon] = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self._wait(lambda: "idle" in self.run(["sinfo", "-h", "-o", "%T"], check=False).stdout, timeout,
                   "the node to become idle")

    def _start_munged(self, timeout: float) -> None:
        munge = pwd.getpwnam("munge")
        directory = self.munge_socket.parent
        directory.mkdir(mode=0o711)
        os.chown(directory, munge.pw_uid, munge.pw_gid)
        key = directory / "munge.key"
        subprocess.run([_binary("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
        os.chown(key, munge.pw_uid, munge.pw_gid)
        key.chmod(0o400)
        self._procs["munged"] = subprocess.Popen(
            [_binary("munged"), "--foreground", f"--socket={self.munge_socket}", f"--key-file={key}",
             f"--pid-file={directory / 'munged.pid'}", f"--log-file={directory / 'munged.log'}",
             f"--seed-file={directory / 'munged.seed'}"],
            user="munge", group="munge", stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        self._wait(self.munge_socket.exists, timeout, "munged's socket")

    def _write_conf(self) -> None:
        state = self.root / "state"
        for sub in ("ctld", "spool"):
            (state / sub).mkdir(parents=True)
        self.conf.write_text(f"""\
ClusterName=popelm
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire={CRED_EXPIRE}
StateSaveLocation={state / 'ctld'}
SlurmdSpoolDir={state / 'spool'}
SlurmctldPidFile={self.root / 'slurmctld.pid'}
SlurmdPidFile={self.root / 'slurmd.pid'}
SlurmctldLogFile={self.root / 'slurmctld.log'}
SlurmdLogFile={self.root / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=1
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
KillWait=5
MinJobAge=600
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def stop(self) -> None:
        """Cancel what still runs, then stop the daemons in reverse start order, each by its PID."""
        if "slurmctld" in self._procs:
            self.run(["scancel", "--user=root"], check=False)
        for name in reversed(list(self._procs)):
            proc = self._procs.pop(name)
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    def run(self, args: list[str], check: bool = True, **kwargs: object) -> subprocess.CompletedProcess:
        return subprocess.run(args, env=kwargs.pop("env", self.env), check=check, capture_output=True, text=True,
                              **kwargs)  # type: ignore[call-overload]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, RestartCnt, ExitCode, StdOut, ...)."""
        out = self.run(["scontrol", "show", "job", "--oneliner", job_id]).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_for_state(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        info: dict[str, str] = {}

        def reached() -> bool:
            nonlocal info
            info = self.job(job_id)
            return info.get("JobState") in states

        self._wait(reached, timeout, f"job {job_id} to reach {sorted(states)} (last: {info.get('JobState')})")
        return info

    def logs(self) -> str:
        """The daemons' logs, for a failing test's message."""
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in
                         sorted(self.root.glob("*.log")))

    def _wait(self, condition: object, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}\n{self.logs()}")
            if condition():  # type: ignore[operator]
                return
            time.sleep(0.2)
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs()}")
