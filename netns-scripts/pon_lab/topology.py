"""The topology file (netns-scripts/topologies/*.toml): validation into the normalized dict
that state.json stores, relay paths, and the lab's fixed addressing."""

import re
import tomllib
from pathlib import Path

from .util import LabError

LAB_NAME_RE = re.compile(r"^[a-z0-9]{1,8}$")
SITE_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,9}$")
ROLE_RE = re.compile(r"^[A-Z0-9_]+(\.[A-Z0-9_]+)*$")
MAX_SITES = 50
MAX_APPS = 50
# Proxies per site: hosts proxy, proxy2, ... at .1, .2, ... (app VMs start at .11).
MAX_PROXIES = 4
ENCAPS = ("ipip", "udp")
# Agent legs when the topology names none: UDP, the fast one (GSO sends and
# GRO receives carry a batch per system call; raw IP-in-IP sockets go packet
# by packet, see BENCHMARKS.md). Tests that need IP-in-IP say so.
DEFAULT_ENCAP = "udp"
LINK_FIELDS = {          # [[link]] settings: (maximum, help); all >= 0
    "delay_ms": (60000, "one-way delay, each direction (ms)"),
    "jitter_ms": (60000, "jitter: uniform +- this around the delay (ms)"),
    "loss": (1, "fraction of packets dropped, each direction"),
    "rate_mbit": (1000000, "rate limit, each direction (Mbit/s; 0 = unlimited)"),
}

# Addressing (fixed: tests depend on it). Site i is 198.18.i.0/24; the CU has its own network.
MTU = 1500               # every veth and bridge; the daemons' underlay_mtu
CU_ADDR = "198.18.250.1"
# The name agents reach the CU by, as operators name services: each namespace's
# /etc/hosts (ip netns exec mounts /etc/netns/NS/hosts over it) maps it to CU_ADDR.
CU_NAME = "cu.pon.lab"
CU_GATEWAY = "198.18.250.254"
# `cu_replicas = N` (N >= 2): hosts cu1..cuN at 198.18.250.1..N, each running one etcd member
# and one pon-cu replica; agents know them as cu1.pon.lab .. cuN.pon.lab.
MAX_CU_REPLICAS = 5
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380


def cu_replica_addr(k):
    return f"198.18.250.{k}"


def cu_replica_name(k):
    return f"cu{k}.pon.lab"


def validate_lab_name(name):
    if not LAB_NAME_RE.match(name or ""):
        raise LabError(f"invalid lab name {name!r}: must match [a-z0-9]{{1,8}}")
    return name


def check_role(role):
    return isinstance(role, str) and bool(ROLE_RE.match(role)) and role.startswith("PROXY")


def load_topology(path):
    """Parse and validate a topology file into a normalized dict (what state.json stores)."""
    path = Path(path)
    where = str(path)
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as e:
        raise LabError(f"{where}: cannot read: {e.strerror}")
    except tomllib.TOMLDecodeError as e:
        raise LabError(f"{where}: invalid TOML: {e}")

    def fail(field, msg):
        raise LabError(f"{where}: {field}: {msg}")

    def check_keys(table, allowed, field):
        if not isinstance(table, dict):
            fail(field, "must be a table")
        for key in table:
            if key not in allowed:
                fail(f"{field}.{key}", f"unknown key (expected one of: {', '.join(allowed)})")

    check_keys(raw, ("encap", "ta_mtu", "offload", "site", "path", "link", "link_emulator", "cu",
                     "routing", "split", "split_agents", "tunnel", "encrypt_lan", "cu_names",
                     "cu_replicas", "proxy_pmon", "cu_relay"),
               "top level")
    encrypt_lan = raw.get("encrypt_lan", False)
    # The names agents try for the CU, in order (default: just CU_NAME); only
    # CU_NAME resolves in the lab, so others exercise falling over to the next.
    cu_names = raw.get("cu_names", [CU_NAME])
    if (not isinstance(cu_names, list) or not cu_names
            or not all(isinstance(n, str) and n for n in cu_names)):
        fail("cu_names", f"must be a non-empty list of host names, got {cu_names!r}")
    if not isinstance(encrypt_lan, bool):
        fail("encrypt_lan", f"must be true or false, got {encrypt_lan!r}")
    split = raw.get("split", False)
    if not isinstance(split, bool):
        fail("split", f"must be true or false, got {split!r}")
    # split_agents = true runs pon-ra and pon-ta on app VMs instead of pon-agent.
    split_agents = raw.get("split_agents", False)
    if not isinstance(split_agents, bool):
        fail("split_agents", f"must be true or false, got {split_agents!r}")
    # routing: true, or a table of pon-proxy [routing] settings (policy, interval_ms, ...),
    # passed through as they are (pon-proxy checks them and names the field).
    routing = raw.get("routing", True)
    if routing is True:
        routing = {}
    elif routing is False:
        routing = None
    elif not isinstance(routing, dict) or any(isinstance(v, (dict, list)) for v in routing.values()):
        fail("routing", "must be true, false, or a table of plain [routing] settings")
    # tunnel: the proxies' [tunnel] settings (rekey_after_ms, rekey_after_messages),
    # passed through; the daemons check them and name the field.
    tunnel = raw.get("tunnel", {})
    if not isinstance(tunnel, dict) or any(isinstance(v, (dict, list)) for v in tunnel.values()):
        fail("tunnel", "must be a table of plain [tunnel] settings")
    if split and routing is None:
        fail("split", "needs routing (the processes it splits are the monitor and the router)")
    # offload = false turns the agents' TUN offloads off: benchmarks compare.
    offload = raw.get("offload", True)
    if type(offload) is not bool:
        fail("offload", f"must be true or false, got {offload!r}")
    cu = raw.get("cu", True)
    if not isinstance(cu, bool):
        fail("cu", f"must be true or false, got {cu!r}")
    # proxy_pmon = true: each pon-proxy also serves PMon subscriptions itself ([pmon]).
    proxy_pmon = raw.get("proxy_pmon", False)
    if not isinstance(proxy_pmon, bool):
        fail("proxy_pmon", f"must be true or false, got {proxy_pmon!r}")
    if proxy_pmon and not cu:
        fail("proxy_pmon", "needs CU mode (no `cu = false`)")
    # cu_relay = true: app VMs' CU sessions go through their site's proxies ([cu] relay,
    # relay_listen on RELAY_PORT).
    cu_relay = raw.get("cu_relay", False)
    if not isinstance(cu_relay, bool):
        fail("cu_relay", f"must be true or false, got {cu_relay!r}")
    if cu_relay and not cu:
        fail("cu_relay", "needs CU mode (no `cu = false`)")
    # cu_replicas >= 2: replicated CU on a three-member (N-member) etcd cluster.
    cu_replicas = raw.get("cu_replicas", 1)
    if type(cu_replicas) is not int or not 1 <= cu_replicas <= MAX_CU_REPLICAS:
        fail("cu_replicas", f"must be an integer in 1..{MAX_CU_REPLICAS}, got {cu_replicas!r}")
    if cu_replicas > 1 and not cu:
        fail("cu_replicas", "needs CU mode (no `cu = false`)")
    if cu_replicas > 1 and "cu_names" in raw:
        fail("cu_names", "replicas are named cu1.pon.lab .. cuN.pon.lab; leave cu_names out")
    # ta_mtu overrides the TAs' derived TUN MTU: tests use it to make the
    # forwarder, not the sender's stack, meet packets that do not fit.
    ta_mtu = raw.get("ta_mtu")
    if ta_mtu is not None and (type(ta_mtu) is not int or not 576 <= ta_mtu <= 9000):
        fail("ta_mtu", f"must be an integer in 576..9000, got {ta_mtu!r}")
    encap = raw.get("encap", DEFAULT_ENCAP)
    if encap not in ENCAPS:
        fail("encap", f"must be one of {', '.join(map(repr, ENCAPS))}, got {encap!r}")

    raw_sites = raw.get("site", [])
    if not isinstance(raw_sites, list) or not raw_sites:
        fail("site", "at least one [[site]] table is required")
    if len(raw_sites) > MAX_SITES:
        fail("site", f"at most {MAX_SITES} sites are supported, got {len(raw_sites)}")

    sites = []
    for i, s in enumerate(raw_sites, start=1):
        field = f"site[{i}]"
        check_keys(s, ("name", "apps", "role", "nat", "proxies"), field)
        name = s.get("name")
        if not isinstance(name, str) or not SITE_NAME_RE.match(name):
            fail(f"{field}.name", f"must match [a-z][a-z0-9]{{0,9}}, got {name!r}")
        if any(o["name"] == name for o in sites):
            fail(f"{field}.name", f"duplicate site name {name!r}")
        apps = s.get("apps")
        if type(apps) is not int or not 1 <= apps <= MAX_APPS:
            fail(f"{field}.apps", f"must be an integer in 1..{MAX_APPS}, got {apps!r}")
        role = s.get("role", "PROXY")
        if not check_role(role):
            fail(f"{field}.role", f"must be a dotted PROXY role such as PROXY.SRC, got {role!r}")
        nat = s.get("nat", False)
        if not isinstance(nat, bool):
            fail(f"{field}.nat", f"must be true or false, got {nat!r}")
        proxies = s.get("proxies", 1)
        if type(proxies) is not int or not 1 <= proxies <= MAX_PROXIES:
            fail(f"{field}.proxies", f"must be an integer in 1..{MAX_PROXIES}, got {proxies!r}")
        if proxies > 1 and nat:
            fail(f"{field}.proxies", "a NAT site has one public address: one proxy")
        if proxies > 1 and raw.get("cu", True) is False:
            fail(f"{field}.proxies", "several proxies per site need the CU (it names them to the agents)")
        sites.append({"name": name, "index": i, "apps": apps, "role": role, "nat": nat,
                      "proxies": proxies})
    names = {s["name"] for s in sites}

    paths = []
    raw_paths = raw.get("path", [])
    if not isinstance(raw_paths, list):
        fail("path", "must be an array of tables ([[path]])")
    for n, p in enumerate(raw_paths, start=1):
        field = f"path[{n}]"
        check_keys(p, ("between", "via"), field)
        between = p.get("between")
        if (not isinstance(between, list) or len(between) != 2
                or not all(isinstance(x, str) for x in between)):
            fail(f"{field}.between", "must be a list of two site names")
        for x in between:
            if x not in names:
                fail(f"{field}.between", f"unknown site {x!r}")
        if between[0] == between[1]:
            fail(f"{field}.between", "the two sites must differ")
        via = p.get("via", [])
        if not isinstance(via, list) or not all(isinstance(x, str) for x in via):
            fail(f"{field}.via", "must be a list of site names")
        for x in via:
            if x not in names:
                fail(f"{field}.via", f"unknown site {x!r}")
            if x in between:
                fail(f"{field}.via", f"must not contain the endpoint {x!r}")
        if len(set(via)) != len(via):
            fail(f"{field}.via", "lists a site more than once")
        if any(set(q["between"]) == set(between) for q in paths):
            fail(f"{field}.between", f"a path between {between[0]} and {between[1]} is already defined")
        paths.append({"between": list(between), "via": list(via)})

    links = []
    raw_links = raw.get("link", [])
    if not isinstance(raw_links, list):
        fail("link", "must be an array of tables ([[link]])")
    for n, lk in enumerate(raw_links, start=1):
        field = f"link[{n}]"
        check_keys(lk, ("between", *LINK_FIELDS), field)
        between = lk.get("between")
        if (not isinstance(between, list) or len(between) != 2
                or not all(isinstance(x, str) for x in between)):
            fail(f"{field}.between", "must be a list of two site names")
        for x in between:
            if x not in names:
                fail(f"{field}.between", f"unknown site {x!r}")
        if between[0] == between[1]:
            fail(f"{field}.between", "the two sites must differ")
        if any(set(q["between"]) == set(between) for q in links):
            fail(f"{field}.between", f"a link between {between[0]} and {between[1]} is already defined")
        settings = {}
        for key in LINK_FIELDS:
            try:
                settings[key] = check_link_value(key, lk.get(key, 0))
            except ValueError as e:
                fail(f"{field}.{key}", str(e))
        links.append({"between": list(between), **settings, "down": False})
    emulator = raw.get("link_emulator", bool(links))
    if not isinstance(emulator, bool):
        fail("link_emulator", f"must be true or false, got {emulator!r}")
    if links and not emulator:
        fail("link_emulator", "is false, but [[link]] tables need the link emulator")

    return {"file": str(path.resolve()), "encap": encap, "ta_mtu": ta_mtu, "offload": offload,
            "sites": sites, "paths": paths, "links": links, "link_emulator": emulator, "cu": cu,
            "routing": routing, "split": split, "split_agents": split_agents, "tunnel": tunnel,
            "encrypt_lan": encrypt_lan, "cu_names": cu_names, "cu_replicas": cu_replicas,
            "proxy_pmon": proxy_pmon, "cu_relay": cu_relay}


def check_link_value(key, value):
    """A [[link]] / impair setting as a float, or ValueError saying what is wrong."""
    maximum = LINK_FIELDS[key][0]
    if type(value) not in (int, float) or not 0 <= value <= maximum:
        raise ValueError(f"must be a number in 0..{maximum}, got {value!r}")
    return float(value)


def link_key(a, b):
    return tuple(sorted((a, b)))


def relay_route(topology, src, dst):
    """Relay site names from src to dst (empty = direct); reverse paths use the reversed list."""
    for p in topology["paths"]:
        if p["between"] == [src, dst]:
            return p["via"]
        if p["between"] == [dst, src]:
            return list(reversed(p["via"]))
    return []


# addressing


def site_net(index):
    return f"198.18.{index}"


def gateway_addr(index):
    return f"{site_net(index)}.254"


# Where proxies listen for their site's app VMs' relayed CU sessions (cu_relay = true).
RELAY_PORT = 7402


def proxy_addr(index, n=1):
    """The address of proxy n (1, 2, ...) of site `index`."""
    return f"{site_net(index)}.{n}"


def proxy_host(n):
    """The host name of a site's proxy n: proxy, proxy2, proxy3, ..."""
    return "proxy" if n == 1 else f"proxy{n}"


def proxy_number(host):
    """The n of a proxy host name (proxy -> 1, proxy2 -> 2)."""
    return int(host.removeprefix("proxy") or 1)


def proxy_id(index, n=1):
    """The id a site's proxy n asks the CU for: the site index for the first (relay routes
    and tests name proxies by site), 100 (n - 1) + index for the others."""
    return index if n == 1 else 100 * (n - 1) + index


def proxy_port_index(n):
    """The k of inet_port_name for proxy n (0 for the first; app VMs use 1..MAX_APPS)."""
    return 0 if n == 1 else MAX_APPS + n


def app_addr(index, j):
    return f"{site_net(index)}.{10 + j}"


def public_addr(index):
    """A NAT site's proxy as the rest of the world sees it (TEST-NET-3)."""
    return f"203.0.113.{index}"


def site_prefix(index):
    return f"{site_net(index)}.0/24"


def bridge_name(index):
    return f"br{index}"


def inet_port_name(index, k):
    return f"s{index}h{k}"
