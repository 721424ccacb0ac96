"""Daemon processes: started in their host's namespace stage by stage, ready when their
metrics endpoint answers, stopped by pid (checked against the start time, so a reused pid
is never signalled)."""

import os
import signal
import subprocess
import time
from pathlib import Path

from . import netns
from .plan import AGENT_BINARY, CU_BINARY, ETCD_BINARY, LINKEMU_BINARY, PROXY_BINARY
from .util import LabError, log_tail, progress

READY_TIMEOUT = 20.0     # per start stage
POLL_INTERVAL = 0.1
TERM_GRACE = 3.0
MAX_PARALLEL_PROBES = 64
# Forwarders must exist before agents point at them, and each RA must be up before its
# TA starts diverting traffic (pon-agent starts its RA first); the stages are started (and
# awaited) in this order.
# The link emulator goes first: the network is what it should be before PON starts using it.
START_STAGES = (("internet", LINKEMU_BINARY), ("cu", ETCD_BINARY), ("cu", CU_BINARY), ("proxy", "pon-forwarder"),
                ("proxy", PROXY_BINARY), ("proxy", "pon-monitor"), ("proxy", "pon-router"),
                ("app", "pon-ra"), ("app", "pon-ta"), ("app", AGENT_BINARY))


def proc_starttime(pid):
    """Start time of a process (clock ticks since boot), used to detect pid reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces/parens, so parse after the last ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] == "Z" else int(fields[19])


def pid_alive(pid, starttime):
    if not pid:
        return False
    current = proc_starttime(pid)
    return current is not None and (starttime is None or current == starttime)


class Processes:
    """The daemons this process started (Popen objects, so they can be reaped: otherwise a
    daemon killed during a failed `up` lingers as a zombie), and those it only knows by pid."""

    def __init__(self, lab):
        self.lab = lab
        self.children = {}

    def alive(self, d):
        proc = self.children.get(d["pid"])
        if proc is not None:
            return proc.poll() is None
        return pid_alive(d["pid"], d["starttime"])

    def start(self, hosts, after_stage=None):
        """Starts the daemons of `hosts` that are not running, stage by stage, each stage
        awaited; `after_stage(daemon)` runs once a stage is ready."""
        running = []
        for role, daemon in START_STAGES:
            started = [(h, d) for h in hosts if h["role"] == role
                       for d in h["daemons"] if d["name"] == daemon and not self.alive(d)]
            for h, d in started:
                self.spawn(h, d)
            self.lab.save()
            running += started
            if not started:
                continue
            progress(f"started {len(started)} x {daemon}; waiting for metrics endpoints")
            self.wait_ready(started, running)
            if after_stage:
                after_stage(daemon)

    def spawn(self, host, d):
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "info")
        with open(d["log"], "ab") as log:
            # Own session: the daemon must survive this script exiting and must not get
            # the terminal's Ctrl-C; `down` signals it by pid.
            proc = subprocess.Popen(
                ["ip", "netns", "exec", host["netns"], d["bin"],
                 *d.get("args", ["--config", d["config"]])],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env, start_new_session=True)
        # `ip netns exec` execs the binary in place, so this pid is the daemon's pid.
        self.children[proc.pid] = proc
        d["pid"] = proc.pid
        d["starttime"] = proc_starttime(proc.pid)
        (self.lab.dir / "pids" / f"{Path(d['log']).stem}.pid").write_text(f"{proc.pid}\n")

    def wait_ready(self, daemons, running):
        """Wait for `daemons` to serve metrics while every daemon in `running` stays alive
        (a forwarder crashing while its agents start must fail `up` too)."""
        deadline = time.monotonic() + READY_TIMEOUT
        pending = list(daemons)
        while pending:
            for h, d in running:
                if not self.alive(d):
                    proc = self.children.get(d["pid"])
                    code = proc.returncode if proc else "?"
                    raise LabError(f"{d['name']} on {h['name']} exited (status {code}) while "
                                   f"starting the lab (metrics endpoint {d['metrics']}); "
                                   f"last lines of {d['log']}:\n{log_tail(d['log'])}")
            pending = probe_many(pending)
            if not pending:
                break
            if time.monotonic() >= deadline:
                h, d = pending[0]
                names = ", ".join(f"{d['name']}@{h['name']}" for h, d in pending)
                raise LabError(f"timed out after {READY_TIMEOUT:.0f}s waiting for metrics of: "
                               f"{names}\nlast lines of {d['log']}:\n{log_tail(d['log'])}")
            time.sleep(POLL_INTERVAL)

    def stop(self, daemons, sig=signal.SIGTERM, quiet=False):
        """Signals the live ones, waits TERM_GRACE, then SIGKILLs what is left."""
        live = [d for d in daemons if self.alive(d)]
        for d in live:
            _kill(d["pid"], sig)
        deadline = time.monotonic() + TERM_GRACE
        while live and time.monotonic() < deadline:
            time.sleep(0.05)
            live = [d for d in live if self.alive(d)]
        for d in live:
            if not quiet:
                progress(f"{d['name']} (pid {d['pid']}) ignored SIGTERM; killing")
            _kill(d["pid"], signal.SIGKILL)

    def reap(self):
        for proc in self.children.values():
            try:
                proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass


def _kill(pid, sig):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def kill_all_in(namespaces):
    """Anything still running in a lab namespace (e.g. an iperf3 started via `exec`)
    keeps the namespace alive after `ip netns del`."""
    for ns in namespaces:
        for pid in netns.pids(ns):
            _kill(pid, signal.SIGKILL)


def _curl_cmd(h, d):
    # --noproxy: an inherited http_proxy would send the probe somewhere else entirely.
    return ["ip", "netns", "exec", h["netns"], "curl", "-sf", "-m", "1", "--noproxy", "*",
            "-o", "/dev/null", f"http://{d['metrics']}/metrics"]


def probe_many(pending):
    """Probe in parallel (big labs have hundreds of endpoints); return the ones not ready."""
    still = []
    for start in range(0, len(pending), MAX_PARALLEL_PROBES):
        batch = pending[start:start + MAX_PARALLEL_PROBES]
        procs = [(h, d, subprocess.Popen(_curl_cmd(h, d), stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)) for h, d in batch]
        still += [(h, d) for h, d, p in procs if p.wait() != 0]
    return still
