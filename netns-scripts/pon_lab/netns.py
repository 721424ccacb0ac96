"""Namespaces and their plumbing: veths, the internet's bridges and its policy routing into
the link emulator. Both ends of every veth are created in their target namespaces: nothing
is ever created in, or changed in, the root namespace."""

import json
import shutil
from pathlib import Path

from . import linkemu
from .configs import LINKEMU_TUN
from .topology import (CU_ADDR, CU_GATEWAY, CU_NAME, MTU, bridge_name, cu_replica_addr,
                       cu_replica_name, gateway_addr,
                       proxy_addr, public_addr)
from .util import run


def ip_batch(netns, commands):
    """Run several `ip` commands in one process (one fork instead of dozens per host)."""
    if not commands:
        return
    prefix = ["ip"] if netns is None else ["ip", "-n", netns]
    run(prefix + ["-batch", "-"], input="\n".join(commands) + "\n")


def sysctl(netns, settings):
    if settings:
        run(["ip", "netns", "exec", netns, "sysctl", "-q", "-w"]
            + [f"{k}={v}" for k, v in settings.items()])


def base_sysctls():
    # Labs are IPv4-only; IPv6 would only add router solicitations and DAD noise to
    # captures. Setting "default" before any veth exists means new links start disabled.
    if not Path("/proc/sys/net/ipv6").exists():  # kernel booted with ipv6.disable=1
        return {}
    return {"net.ipv6.conf.all.disable_ipv6": 1, "net.ipv6.conf.default.disable_ipv6": 1}


def existing():
    out = run(["ip", "-j", "netns", "list"]).stdout.strip()
    return {entry["name"] for entry in json.loads(out or "[]")}


def pids(netns):
    proc = run(["ip", "netns", "pids", netns], check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


ETC_NETNS = Path("/etc/netns")


def delete(names):
    # -force: keep going past namespaces that vanished meanwhile.
    if names:
        run(["ip", "-force", "-batch", "-"],
            input="".join(f"netns del {ns}\n" for ns in names), check=False)
    for ns in names:
        shutil.rmtree(ETC_NETNS / ns, ignore_errors=True)


def create(lab, names):
    # Record first: if we die between `ip netns add` and save(), down still finds them.
    lab.state["netns"].extend(n for n in names if n not in lab.state["netns"])
    lab.save()
    for ns in names:
        run(["ip", "netns", "add", ns])
        # Processes started with `ip netns exec` see this as their /etc/hosts:
        # the CU by name, as agents are configured to reach it.
        (ETC_NETNS / ns).mkdir(parents=True, exist_ok=True)
        replicas = lab.state["topology"].get("cu_replicas", 1)
        cus = "".join(f"{cu_replica_addr(k)}\t{cu_replica_name(k)}\n"
                      for k in range(1, replicas + 1)) if replicas > 1 else ""
        (ETC_NETNS / ns / "hosts").write_text(
            f"127.0.0.1\tlocalhost\n{CU_ADDR}\t{CU_NAME}\n{cus}")
        # No DNS server is reachable from the lab: a name not in hosts fails at
        # once (nothing listens on the namespace's own port 53) instead of
        # waiting for the host's resolvers to time out.
        (ETC_NETNS / ns / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")


def bridge_cmds(index):
    # STP off + no forward delay: ports forward as soon as they are up, so the
    # lab is usable immediately after `up` (no 30 s listening/learning phase).
    br = bridge_name(index)
    return [f"link add {br} mtu {MTU} type bridge stp_state 0 forward_delay 0",
            f"addr add {gateway_addr(index)}/24 dev {br}",
            f"link set {br} up"]


def build_inet(lab):
    ns = lab.inet_netns
    emulated = lab.state["topology"].get("link_emulator")
    create(lab, [ns])
    sysctls = {**base_sysctls(), "net.ipv4.ip_forward": 1}
    if emulated:
        # Packets come back out of wan0 with site source addresses: no reverse-path check
        # (the effective value is the max of "all" and the device's, which inherits "default").
        sysctls |= {"net.ipv4.conf.all.rp_filter": 0, "net.ipv4.conf.default.rp_filter": 0}
    sysctl(ns, sysctls)
    cmds = ["link set lo up"]
    if emulated:
        # Locally originated packets and the emulator's output use the main table; all
        # forwarded traffic (from any bridge, also of sites added later) goes to table 100.
        # Its `unreachable` fallback makes traffic fail, not silently bypass the emulator,
        # when wan0 is gone; the wan0 route is added once the emulator is ready.
        cmds += ["rule add pref 1000 iif lo lookup main",
                 f"rule add pref 1001 iif {LINKEMU_TUN} lookup main",
                 f"rule add pref 1002 lookup {linkemu.TABLE}",
                 f"route add unreachable default metric 4294967295 table {linkemu.TABLE}"]
    for site in lab.state["topology"]["sites"]:
        cmds += bridge_cmds(site["index"])
    ip_batch(ns, cmds)


def route_into_emulator(lab):
    """Send forwarded traffic through the (ready) emulator's TUN."""
    ip_batch(lab.inet_netns,
             [f"route replace default dev {LINKEMU_TUN} metric 0 table {linkemu.TABLE}"])


def _veth(h, inet_netns):
    run(["ip", "link", "add", "eth0", "mtu", str(MTU), "netns", h["netns"],
         "type", "veth", "peer", "name", h["inet_port"], "mtu", str(MTU), "netns", inet_netns])


def _host_side(h):
    ip_batch(h["netns"], ["link set lo up", "link set eth0 up",
                          f"addr add {h['address']}/24 dev eth0",
                          f"route add default via {h['gateway']} dev eth0"])


CU_BRIDGE = "brcu"


def build_cu(lab):
    """The CU's own namespace, one hop from every site through inet (replicas: one
    namespace each, on one network bridged in inet)."""
    cus = lab.hosts("cu")
    if len(cus) > 1:
        create(lab, [h["netns"] for h in cus])
        ip_batch(lab.inet_netns, [f"link add {CU_BRIDGE} mtu {MTU} type bridge stp_state 0 "
                                  "forward_delay 0", f"addr add {CU_GATEWAY}/24 dev {CU_BRIDGE}",
                                  f"link set {CU_BRIDGE} up"])
        for h in cus:
            sysctl(h["netns"], base_sysctls())
            _veth(h, lab.inet_netns)
            ip_batch(lab.inet_netns, [f"link set {h['inet_port']} master {CU_BRIDGE}",
                                      f"link set {h['inet_port']} up"])
            _host_side(h)
        return
    h = next((h for h in cus), None)
    if h is None:
        return
    create(lab, [h["netns"]])
    sysctl(h["netns"], base_sysctls())
    _veth(h, lab.inet_netns)
    ip_batch(lab.inet_netns, [f"addr add {CU_GATEWAY}/24 dev {h['inet_port']}",
                              f"link set {h['inet_port']} up"])
    _host_side(h)


def nat_rules(lab):
    """A 1:1 NAT in front of each NAT site's proxy, in inet (its gateway), as a cloud's
    elastic address works: packets to the public address reach the proxy's private one,
    and what the proxy sends to any other site or the CU leaves with the public address.
    Stateless (the emulator sends each packet through inet twice, which conntrack would
    take for one flow): the destination is rewritten before inet routes it (so the
    emulator sees the site's own address), the source once it leaves for another site."""
    lines = ["table ip ponlab_nat {",
             "  chain pre { type filter hook prerouting priority -300; policy accept;"]
    nat_sites = [s for s in lab.state["topology"]["sites"] if s.get("nat")]
    for s in nat_sites:
        lines.append(f"    ip daddr {public_addr(s['index'])} ip daddr set {proxy_addr(s['index'])}")
    lines += ["  }", "  chain post { type filter hook postrouting priority 100; policy accept;"]
    for s in nat_sites:
        mine = bridge_name(s["index"])
        lines.append(f'    oifname != {{ "{mine}", "{LINKEMU_TUN}" }} ip saddr {proxy_addr(s["index"])} '
                     f"ip saddr set {public_addr(s['index'])}")
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def build_nat(lab):
    """Installs the NAT sites' 1:1 NAT in inet (nothing if no site is behind NAT)."""
    if not any(s.get("nat") for s in lab.state["topology"]["sites"]):
        return
    run(["ip", "netns", "exec", lab.inet_netns, "nft", "-f", "-"], input=nat_rules(lab))


def build_site(lab, site):
    hosts = [h for h in lab.hosts() if h["site"] == site["name"]]
    create(lab, [h["netns"] for h in hosts])
    for h in hosts:
        sysctl(h["netns"], base_sysctls())
        _veth(h, lab.inet_netns)
    # Bring the bridge side up first so host default routes are added on a link with carrier.
    ip_batch(lab.inet_netns,
             [f"link set {h['inet_port']} master {bridge_name(site['index'])} up" for h in hosts])
    for h in hosts:
        _host_side(h)
