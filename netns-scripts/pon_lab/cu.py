"""The Central Unit's files (CA, certificates, admin credential, registry store in STATE/cu/),
the scoped join tokens the lab's agents enrol with (one per site and role family, made with
ponctl once the CU runs), and telling a running CU about a new site's address grant."""

import os
import signal
import time
from pathlib import Path

from . import renderer
from .plan import CU_BINARY
from .topology import CU_ADDR, public_addr, site_prefix
from .util import LabError, progress, run

PONCTL = "ponctl"
# The lab's tokens enrol any number of its agents of one site and role family; they only
# need to outlive `up` and the `add-site`s of a test run.
TOKEN_TTL = "7d"
RELOAD_TIMEOUT = 10.0
POLL_INTERVAL = 0.1


def directory(lab):
    return lab.dir / "cu"


def init(lab):
    """CA, certificates, admin credential and store, once per lab (a restarted CU keeps them)."""
    d = directory(lab)
    if (d / "ca.pem").exists():
        return
    d.mkdir(exist_ok=True)
    bin_dir = lab.state["bin_dir"]
    # The lab makes its own scoped tokens; pon-cu's first token is never handed out.
    run([str(Path(bin_dir) / CU_BINARY), "init", "--dir", str(d), "--ip", CU_ADDR,
         "--listen", f"{CU_ADDR}:{renderer.ports(bin_dir)['cu']}", "--token-ttl", "60s",
         "--token-uses", "1"])


def pmon_cert(lab, host):
    """A server certificate of the lab's CA for `host`'s PMon listener, named
    pmon.SITE and its address (made once, in STATE/cu/pmon/)."""
    init(lab)
    d = directory(lab) / "pmon"
    d.mkdir(exist_ok=True)
    base = d / f"{host['site']}-{host['host']}"
    cert, key = base.with_suffix(".pem"), base.with_suffix(".key")
    if not cert.exists():
        run([str(Path(lab.state["bin_dir"]) / CU_BINARY), "cert", "--dir", str(directory(lab)),
             "--name", f"pmon.{host['site']}", "--ip", host["address"], "--cert", str(cert),
             "--key", str(key), "--force"])
    return cert, key


def family(role):
    """The role family a token is scoped to: PROXY.SRC -> PROXY."""
    return role.split(".")[0]


def token_file(lab, site, role):
    return directory(lab) / "tokens" / f"{site}-{family(role).lower()}"


def cu_daemon(h):
    return next(d for d in h["daemons"] if d["name"] == CU_BINARY)


def ponctl(lab, *args):
    """ponctl in the CU's namespace (with replicas: the first one running), with the admin
    credential."""
    d = directory(lab)
    cus = lab.hosts("cu")
    cu = next((h for h in cus if lab.daemon_alive(cu_daemon(h))), cus[0])
    return run(["ip", "netns", "exec", cu["netns"], str(Path(lab.state["bin_dir"]) / PONCTL),
                "--cu", f"{cu['address']}:{renderer.ports(lab.state['bin_dir'])['cu']}",
                "--ca", str(d / "ca.pem"), "--cert", str(d / "admin.pem"),
                "--key", str(d / "admin.key"), *args])


def make_tokens(lab, sites):
    """One token per site and role family (the proxy's, the app VMs'), kept 0600 in
    STATE/cu/tokens/; sites that have theirs already are skipped."""
    tokens = directory(lab) / "tokens"
    tokens.mkdir(mode=0o700, exist_ok=True)
    made = 0
    for site in sites:
        for role in (site.get("role", "PROXY"), "APP"):
            path = token_file(lab, site["name"], role)
            if path.exists():
                continue
            token = ponctl(lab, "token", "create", "--cloud", site["name"], "--role",
                           family(role), "--uses", "unlimited", "--ttl", TOKEN_TTL).stdout.strip()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(token + "\n")
            made += 1
    if made:
        progress(f"made {made} join tokens (one per site and role family)")


def grants(lab):
    """[clouds]: each site may use its own /24; a NAT site's proxy is reached at its
    public address."""
    def grant(s):
        g = {"prefixes": [site_prefix(s["index"])]}
        if s.get("nat"):
            # Its elastic address, and the one a test rebinds it to.
            g["endpoints"] = [f"{public_addr(s['index'])}/32",
                              f"{public_addr(100 + s['index'])}/32"]
        return g
    return {s["name"]: grant(s) for s in lab.state["topology"]["sites"]}


def reloads(lab, cu):
    """pon_cu_reloads_total of the CU on host `cu` (None if it does not answer)."""
    port = renderer.metrics_port(CU_BINARY, lab.state["bin_dir"])
    out = run(["ip", "netns", "exec", cu["netns"], "curl", "-sf", "-m", "2",
               f"http://{cu['address']}:{port}/metrics"], check=False).stdout
    for line in out.splitlines():
        if line.startswith("pon_cu_reloads_total "):
            return int(float(line.split()[1]))
    return None


def reload(lab):
    """SIGHUP each running CU (replica) whose cu.toml was rewritten and wait until it took
    the grants."""
    for h in lab.hosts("cu"):
        d = cu_daemon(h)
        if not lab.daemon_alive(d):
            continue  # it reads the new file when it starts
        before = reloads(lab, h)
        os.kill(d["pid"], signal.SIGHUP)
        deadline = time.monotonic() + RELOAD_TIMEOUT
        while True:
            now = reloads(lab, h)
            if now is not None and before is not None and now > before:
                break
            if time.monotonic() >= deadline:
                raise LabError(f"the CU on {h['name']} did not reload its grants within "
                               f"{RELOAD_TIMEOUT:.0f}s (see {d['log']})")
            time.sleep(POLL_INTERVAL)
