"""Lab: one lab's state file (/run/pon-lab/NAME/state.json) and its lifecycle. The work is
done by the other modules; this is the order it is done in, and what is saved when.

state.json records what is about to be created *before* it is created, so `down` can always
clean up a half-made lab; `down` additionally sweeps every namespace named pon-NAME-*."""

import fcntl
import json
import os
import shutil
import signal
import sys
from pathlib import Path

from . import configs, cu, linkemu, netns
from .daemons import Processes, kill_all_in
from .plan import CU_BINARY, LINKEMU_BINARY, plan, plan_daemons, site_hosts
from .topology import (MAX_APPS, MAX_SITES, SITE_NAME_RE, check_role, gateway_addr,
                       validate_lab_name)
from .util import LabError, print_table, progress

STATE_ROOT = Path("/run/pon-lab")


def _raise_interrupted(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


class Lab:
    def __init__(self, name):
        self.name = validate_lab_name(name)
        self.dir = STATE_ROOT / name
        self.state_file = self.dir / "state.json"
        self.state = None
        self.processes = Processes(self)

    # ---- naming and state

    @property
    def prefix(self):
        return f"pon-{self.name}-"

    @property
    def inet_netns(self):
        return f"{self.prefix}inet"

    def host_netns(self, site, host):
        return f"{self.prefix}{site}-{host}"

    def leftover_netns(self):
        return sorted(ns for ns in netns.existing() if ns.startswith(self.prefix))

    def load(self):
        try:
            self.state = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            raise LabError(f"no lab named {self.name!r} (no {self.state_file})")
        except (OSError, ValueError) as e:
            raise LabError(f"{self.state_file}: unreadable state: {e}")
        return self.state

    def save(self):
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2) + "\n")
        os.replace(tmp, self.state_file)  # atomic: `down` never sees a torn file

    def locked(self):
        """Serializes read-modify-write of state.json between concurrent lab commands."""
        lock = open(self.dir / "lock", "w")
        fcntl.flock(lock, fcntl.LOCK_EX)
        return lock

    def hosts(self, role=None):
        return [h for h in self.state["hosts"] if role is None or h["role"] == role]

    def site(self, name):
        return next(s for s in self.state["topology"]["sites"] if s["name"] == name)

    def find_host(self, spec):
        for h in self.state["hosts"]:
            if h["name"] == spec:
                return h
        known = ", ".join(h["name"] for h in self.state["hosts"])
        raise LabError(f"lab {self.name!r} has no host {spec!r} (hosts: {known})")

    def daemon_alive(self, d):
        return self.processes.alive(d)

    # ---- lifecycle

    def up(self, topology, bin_dir, with_daemons):
        # A killed `up` would strand a half-built lab; turn SIGTERM/SIGHUP into an
        # exception so they take the same cleanup path as Ctrl-C.
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _raise_interrupted)
        self.state = plan(self, topology, bin_dir, with_daemons)
        # Namespaces without a state dir are leftovers of a lab whose state was lost.
        if self.leftover_netns():
            raise LabError(f"namespaces of lab {self.name!r} already exist; run `lab down {self.name}` first")
        STATE_ROOT.mkdir(parents=True, exist_ok=True)
        try:
            self.dir.mkdir()  # atomic: two concurrent `up NAME` cannot both get here
        except FileExistsError:
            raise LabError(f"lab {self.name!r} already exists ({self.dir}); run `lab down {self.name}` first")
        try:
            for sub in ("configs", "logs", "pids"):
                (self.dir / sub).mkdir()
            self.save()
            progress(f"creating namespaces for lab {self.name!r}")
            netns.build_inet(self)
            netns.build_cu(self)
            for site in topology["sites"]:
                netns.build_site(self, site)
            netns.build_nat(self)
            self.state["phase"] = "plumbed"
            self.save()
            if with_daemons or topology.get("link_emulator"):
                configs.write(self, self.hosts())
                self.processes.start(self.hosts(), after_stage=self._stage_ready)
            self.state["phase"] = "up"
            self.save()
        except BaseException as e:
            self._undo_up(e)

    def _stage_ready(self, daemon):
        if daemon == LINKEMU_BINARY:
            netns.route_into_emulator(self)
        if daemon == CU_BINARY:
            # Before any agent starts: they enrol with these.
            cu.make_tokens(self, self.state["topology"]["sites"])

    def _undo_up(self, e):
        """Leave nothing behind: a half-built lab would block the next `up` and confuse tests."""
        msg = f"interrupted {e}".strip() if isinstance(e, KeyboardInterrupt) else str(e)
        if not isinstance(e, (LabError, KeyboardInterrupt)):
            msg = f"{type(e).__name__}: {e}"
        print(f"lab: up failed: {msg}", file=sys.stderr)
        print(f"lab: tearing down {self.name!r}", file=sys.stderr)
        # A second Ctrl-C must not abort the cleanup half-way.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        try:
            self.teardown()
        except Exception as te:
            raise LabError(f"up of lab {self.name!r} failed, and so did the cleanup: {te}; "
                           f"retry with `lab down {self.name}`") from None
        raise LabError(f"up of lab {self.name!r} failed (everything created was removed)") from None

    def teardown(self):
        """Idempotent: works from full, half-made, or missing state."""
        if self.state is None:
            try:
                self.load()
            except LabError:
                self.state = None  # missing/corrupt state: fall back to the name sweep
        state = self.state or {}
        self.processes.stop([d for h in state.get("hosts", []) for d in h.get("daemons", [])
                             if d.get("pid")])
        self.processes.reap()
        recorded = set(state.get("netns", []))
        targets = sorted((recorded & netns.existing()) | set(self.leftover_netns()))
        kill_all_in(targets)
        netns.delete(targets)
        remaining = self.leftover_netns()
        shutil.rmtree(self.dir, ignore_errors=True)
        if remaining:
            raise LabError(f"could not delete namespaces: {', '.join(remaining)}")

    # ---- run-time changes: sites joining, daemons crashing and coming back, links

    def add_site(self, name, apps, role):
        with self.locked():
            self.load()
            topo = self.state["topology"]
            if not topo.get("cu"):
                raise LabError(f"lab {self.name!r} runs static configs: the other sites would not "
                               "learn of a new site; add-site needs CU mode (no `cu = false`)")
            if self.state.get("phase") != "up":
                raise LabError(f"lab {self.name!r} is not up (phase {self.state.get('phase')})")
            if not SITE_NAME_RE.match(name):
                raise LabError(f"site name {name!r} must match [a-z][a-z0-9]{{0,9}}")
            if any(s["name"] == name for s in topo["sites"]):
                raise LabError(f"lab {self.name!r} already has a site {name!r}")
            if not 1 <= apps <= MAX_APPS:
                raise LabError(f"--apps must be in 1..{MAX_APPS}, got {apps}")
            if not check_role(role):
                raise LabError(f"--role must be a dotted PROXY role such as PROXY.SRC, got {role!r}")
            index = max(s["index"] for s in topo["sites"]) + 1
            if index > MAX_SITES:
                raise LabError(f"at most {MAX_SITES} sites")
            site = {"name": name, "index": index, "apps": apps, "role": role, "nat": False,
                    "proxies": 1}
            new = site_hosts(self, site)
            topo["sites"].append(site)
            for h in new:
                h["daemons"] = plan_daemons(self, topo, h, self.state["bin_dir"])
            self.state["hosts"].extend(new)
            for h in self.hosts("internet"):
                h["addresses"].append(f"{gateway_addr(index)}/24")
            self.save()
            netns.ip_batch(self.inet_netns, netns.bridge_cmds(index))
            netns.build_site(self, site)
            # The CU grants the new site its prefix (cu.toml rewritten, SIGHUP) and the lab
            # makes its tokens, before its agents start.
            configs.write(self, self.hosts("cu"))
            cu.reload(self)
            cu.make_tokens(self, [site])
            configs.write(self, new)
            self.processes.start(new)
            return new

    def start_host(self, spec):
        with self.locked():
            self.load()
            host = self.find_host(spec)
            if not host["daemons"]:
                raise LabError(f"{spec} runs no daemons")
            self.processes.start([host])

    def stop_host(self, spec, graceful):
        """Stops a host's daemons: SIGKILL (a crash) or SIGTERM (a clean leave)."""
        with self.locked():
            self.load()
            host = self.find_host(spec)
            live = [d for d in reversed(host["daemons"]) if self.daemon_alive(d)]
            if not live:
                raise LabError(f"no daemon of {spec} is running")
            self.processes.stop(live, signal.SIGTERM if graceful else signal.SIGKILL, quiet=True)
            return [d["name"] for d in host["daemons"]]

    def impair(self, a, b, changes, down):
        """Change the link between sites a and b (both directions) in the running emulator."""
        with self.locked():
            self.load()
            new = linkemu.impair(self, a, b, changes, down, self.daemon_alive)
            self.save()
            return new

    # ---- reporting

    def describe(self):
        hosts = [{
            "name": h["name"], "site": h["site"], "host": h["host"], "netns": h["netns"],
            "role": h["role"], "addresses": h["addresses"], "site_index": h["site_index"],
            "daemons": [{"name": d["name"], "pid": d["pid"], "alive": self.daemon_alive(d),
                         "log": d["log"], "metrics": d["metrics"], "config": d["config"]}
                        for d in h["daemons"]],
        } for h in self.hosts()]
        return {"name": self.name, "phase": self.state.get("phase"),
                "topology": self.state["topology"]["file"], "hosts": hosts,
                "link_emulator": self.emulator_info(), "links": self.state.get("links", [])}

    def emulator_info(self):
        return linkemu.info(self, self.daemon_alive)

    def print_table(self):
        desc = self.describe()
        print(f"lab {desc['name']}: phase {desc['phase']}, topology {desc['topology']}, "
              f"encap {self.state['topology']['encap']}")
        rows = []
        for h in desc["hosts"]:
            daemons = " ".join(f"{d['name']}[{d['pid'] or '-'} {'up' if d['alive'] else 'DOWN'}]"
                               for d in h["daemons"]) or "-"
            rows.append([h["name"], h["netns"], h["role"], " ".join(h["addresses"]), daemons])
        print_table(["HOST", "NETNS", "ROLE", "ADDRESS", "DAEMONS"], rows)
        emu = desc["link_emulator"]
        if not emu["enabled"]:
            print("\nlink emulator: off (no [[link]] in the topology): sites see the raw underlay")
            return
        print(f"\nlink emulator: {'up' if emu['alive'] else 'DOWN'}, metrics {emu['metrics']}; "
              "pairs not listed are unimpaired")
        rows = [[f"{lk['between'][0]} <-> {lk['between'][1]}", f"{lk['delay_ms']:g}",
                 f"{lk['jitter_ms']:g}", f"{lk['loss']:g}",
                 f"{lk['rate_mbit']:g}" if lk["rate_mbit"] else "unlimited",
                 "DOWN" if lk["down"] else "up"] for lk in desc["links"]]
        if rows:
            print_table(["LINK", "DELAY_MS", "JITTER_MS", "LOSS", "RATE_MBIT", "STATE"], rows)
