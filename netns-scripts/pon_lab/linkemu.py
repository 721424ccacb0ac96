"""The link emulator (pon-linkemu in inet): its view of the sites and links, and run-time
changes through its Unix socket (`lab impair`)."""

import json
import socket

from .plan import LINKEMU_BINARY
from .topology import LINK_FIELDS, check_link_value, link_key, site_prefix
from .util import LabError

SOCKET = "linkemu.sock"  # in the lab's state dir
TABLE = 100              # inet's policy-routing table that leads into the emulator


def control_socket(lab):
    return lab.dir / SOCKET


def sites(lab):
    return [{"index": s["index"], "name": s["name"], "prefix": site_prefix(s["index"])}
            for s in lab.state["topology"]["sites"]]


def directed_links(lab):
    """The current links (topology plus `impair` changes), one entry per direction."""
    links = []
    for lk in lab.state.get("links", []):
        a, b = lk["between"]
        for src, dst in ((a, b), (b, a)):
            links.append({"from": src, "to": dst, "down": lk["down"],
                          **{k: lk[k] for k in LINK_FIELDS}})
    return links


def info(lab, daemon_alive):
    daemon = next((d for h in lab.hosts("internet") for d in h["daemons"]
                   if d["name"] == LINKEMU_BINARY), None)
    if daemon is None:
        return {"enabled": False}
    return {"enabled": True, "alive": daemon_alive(daemon), "pid": daemon["pid"],
            "metrics": daemon["metrics"], "control": str(control_socket(lab)),
            "log": daemon["log"]}


def impair(lab, a, b, changes, down, daemon_alive):
    """Change the link between sites a and b (both directions) in the running emulator.
    The caller holds the lab's lock and has loaded its state; returns the new settings."""
    emu = info(lab, daemon_alive)
    if not emu["enabled"]:
        raise LabError(f"lab {lab.name!r} runs without the link emulator; add [[link]] "
                       "tables or `link_emulator = true` to the topology and bring the lab "
                       "up again")
    if not emu["alive"]:
        raise LabError(f"the link emulator of lab {lab.name!r} is not running; see {emu['log']}")
    names = [s["name"] for s in lab.state["topology"]["sites"]]
    for x in (a, b):
        if x not in names:
            raise LabError(f"lab {lab.name!r} has no site {x!r} (sites: {', '.join(names)})")
    if a == b:
        raise LabError("the two sites must differ")
    links = lab.state.setdefault("links", [])
    link = next((lk for lk in links if link_key(*lk["between"]) == link_key(a, b)), None)
    new = dict(link) if link else {"between": [a, b], **{k: 0.0 for k in LINK_FIELDS},
                                   "down": False}
    for key, value in changes.items():
        try:
            new[key] = check_link_value(key, value)
        except ValueError as e:
            raise LabError(f"--{key.replace('_', '-')}: {e}")
    if down is not None:
        new["down"] = down
    settings = {k: new[k] for k in (*LINK_FIELDS, "down")}
    request = {"op": "set", "sites": sites(lab),
               "links": [{"from": a, "to": b, **settings}, {"from": b, "to": a, **settings}]}
    answer = _ask(emu["control"], request)
    if not answer.get("ok"):
        raise LabError(f"the link emulator refused the change: {answer.get('error')}")
    if link is None:
        links.append(new)
    else:
        link.update(new)
    return new


def _ask(path, request):
    """One JSON request, one JSON answer line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        try:
            sock.connect(path)
            sock.sendall(json.dumps(request).encode() + b"\n")
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
        except OSError as e:
            raise LabError(f"cannot reach the link emulator at {path}: {e}")
    try:
        return json.loads(reply)
    except ValueError:
        raise LabError(f"unreadable answer from the link emulator: {reply[:200]!r}")
