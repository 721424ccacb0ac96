"""Hosts and daemons of a lab, decided up front: the plan is saved in state.json before
anything is created, so `down` can always clean up a half-made lab."""

import shutil
import time
from pathlib import Path

from . import renderer
from .util import LabError
from .topology import (CU_ADDR, CU_GATEWAY, ETCD_CLIENT_PORT, ETCD_PEER_PORT, app_addr,
                       bridge_name, cu_replica_addr, gateway_addr, inet_port_name, proxy_addr,
                       proxy_host, proxy_port_index)

STATE_VERSION = 1
IFNAMSIZ = 15  # usable characters in a Linux interface name

CU_BINARY = "pon-cu"
# With `cu_replicas`, each CU host also runs an etcd member (Debian's etcd-server): started
# before its pon-cu, which loads the shared registry from it.
ETCD_BINARY = "etcd"
LINKEMU_BINARY = "pon-linkemu"
# Proxies run pon-proxy by default: forwarder, monitor and router in one process, choosing
# paths at run time (a [routing] table tunes it); `routing = false`: pon-forwarder with static
# routes, for experiments.
PROXY_BINARY = "pon-proxy"
# App VMs run pon-agent: the TA and the RA in one process, as a VM's one service would.
# `split_agents = true`: pon-ra and pon-ta as two processes instead (experiments).
AGENT_BINARY = "pon-agent"
SPLIT_AGENT_BINARIES = ("pon-ra", "pon-ta")
DAEMON_BINARIES = ("pon-forwarder", AGENT_BINARY)
# `split = true` (with routing): the three parts as separate processes instead, talking over
# loopback UDP (pon-forwarder [local], pon-monitor, pon-router).
SPLIT_BINARIES = ("pon-monitor", "pon-router")


def plan(lab, topology, bin_dir, with_daemons):
    """The state of a lab about to be created."""
    hosts = []
    for site in topology["sites"]:
        i = site["index"]
        hosts += site_hosts(lab, site)
    hosts.append({
        "name": "inet", "site": None, "host": "inet", "netns": lab.inet_netns,
        "role": "internet", "site_index": None,
        "addresses": [f"{gateway_addr(s['index'])}/24" for s in topology["sites"]],
        "address": gateway_addr(topology["sites"][0]["index"]),
        "daemons": [],
    })
    if topology.get("cu") and topology.get("cu_replicas", 1) > 1:
        for k in range(1, topology["cu_replicas"] + 1):
            hosts.append({
                "name": f"cu{k}", "site": None, "host": f"cu{k}", "netns": f"{lab.prefix}cu{k}",
                "role": "cu", "site_index": None, "addresses": [f"{cu_replica_addr(k)}/24"],
                "address": cu_replica_addr(k), "gateway": CU_GATEWAY, "inet_port": f"cu{k}",
                "daemons": [],
            })
    elif topology.get("cu"):
        hosts.append({
            "name": "cu", "site": None, "host": "cu", "netns": f"{lab.prefix}cu",
            "role": "cu", "site_index": None, "addresses": [f"{CU_ADDR}/24"],
            "address": CU_ADDR, "gateway": CU_GATEWAY, "inet_port": "cu0", "daemons": [],
        })
    for h in hosts:
        # The link emulator is part of the network, not of PON: it runs with --no-daemons too.
        if h["role"] == "internet":
            if topology["link_emulator"]:
                h["daemons"] = plan_daemons(lab, topology, h, bin_dir)
        elif with_daemons:
            h["daemons"] = plan_daemons(lab, topology, h, bin_dir)
    return {
        "version": STATE_VERSION,
        "name": lab.name,
        "phase": "creating",
        "topology": topology,
        "bin_dir": str(bin_dir) if bin_dir else None,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "netns": [],  # namespaces we are about to create / have created
        "hosts": hosts,
        # Current link settings (topology's [[link]] plus `impair` changes).
        "links": [dict(lk) for lk in topology.get("links", [])],
    }


def site_hosts(lab, site):
    """A site's hosts: its proxies, then its app VMs."""
    i = site["index"]
    hosts = [plan_host(lab, site, proxy_host(n), proxy_port_index(n), proxy_addr(i, n), "proxy")
             for n in range(1, site.get("proxies", 1) + 1)]
    return hosts + [plan_host(lab, site, f"app{j}", j, app_addr(i, j), "app")
                    for j in range(1, site["apps"] + 1)]


def plan_host(lab, site, host, k, addr, role):
    name = f"{site['name']}/{host}"
    port = inet_port_name(site["index"], k)
    assert len(port) <= IFNAMSIZ and len(bridge_name(site["index"])) <= IFNAMSIZ
    return {
        "name": name, "site": site["name"], "host": host,
        "netns": lab.host_netns(site["name"], host), "role": role,
        "site_index": site["index"], "addresses": [f"{addr}/24"],
        "address": addr, "gateway": gateway_addr(site["index"]), "inet_port": port,
        "daemons": [],
    }


def daemon_names(topology, role):
    """The daemons a host of `role` runs, in start order."""
    if role == "proxy":
        if topology.get("routing") is None:
            return ["pon-forwarder"]
        return ["pon-forwarder", *SPLIT_BINARIES] if topology.get("split") else [PROXY_BINARY]
    cu = [ETCD_BINARY, CU_BINARY] if topology.get("cu_replicas", 1) > 1 else [CU_BINARY]
    return {"app": list(agent_binaries(topology)), "internet": [LINKEMU_BINARY],
            "cu": cu}.get(role, [])


def agent_binaries(topology):
    """What runs on an app VM, in start order (the RA before the TA when they are apart)."""
    return SPLIT_AGENT_BINARIES if topology.get("split_agents") else (AGENT_BINARY,)


def needed_binaries(topology, with_daemons):
    need = []
    if with_daemons:
        need += ("pon-forwarder", *agent_binaries(topology))
        if topology.get("routing") is not None:
            need += SPLIT_BINARIES if topology.get("split") else (PROXY_BINARY,)
        if topology["cu"]:
            need.append(CU_BINARY)
    if topology["link_emulator"]:
        need.append(LINKEMU_BINARY)
    return tuple(need)


def plan_daemons(lab, topology, host, bin_dir):
    base = f"{host['site']}-{host['host']}" if host["site"] else host["host"]
    daemons = [{
        "name": daemon,
        "bin": str(Path(bin_dir) / daemon),
        "config": str(lab.dir / "configs" / f"{base}-{daemon}.toml"),
        "log": str(lab.dir / "logs" / f"{base}-{daemon}.log"),
        "metrics": f"{host['address']}:{metrics_port(daemon, bin_dir)}",
        "pid": None,
        "starttime": None,
    } for daemon in daemon_names(topology, host["role"])]
    for d in daemons:
        if d["name"] == CU_BINARY:
            d["args"] = ["run", "--config", d["config"]]
        if d["name"] == ETCD_BINARY:
            d["bin"] = shutil.which(ETCD_BINARY)
            if d["bin"] is None:
                raise LabError("cu_replicas needs etcd (Debian: etcd-server; "
                               "netns-scripts/install-deps installs it)")
            d["config"] = None  # flags only
            d["args"] = etcd_args(lab, topology, host)
    return daemons


def metrics_port(daemon, bin_dir):
    # etcd serves /metrics on its client port.
    if daemon == ETCD_BINARY:
        return ETCD_CLIENT_PORT
    return renderer.metrics_port(daemon, bin_dir)


def etcd_args(lab, topology, host):
    """One member of the lab's etcd cluster, on its CU host's address; its data in
    STATE/cu/etcd-HOST (a restarted member rejoins with it)."""
    me = host["address"]
    members = ",".join(f"cu{k}=http://{cu_replica_addr(k)}:{ETCD_PEER_PORT}"
                       for k in range(1, topology["cu_replicas"] + 1))
    return ["--name", host["host"], "--data-dir", str(lab.dir / "cu" / f"etcd-{host['host']}"),
            "--listen-client-urls", f"http://{me}:{ETCD_CLIENT_PORT}",
            "--advertise-client-urls", f"http://{me}:{ETCD_CLIENT_PORT}",
            "--listen-peer-urls", f"http://{me}:{ETCD_PEER_PORT}",
            "--initial-advertise-peer-urls", f"http://{me}:{ETCD_PEER_PORT}",
            "--initial-cluster", members, "--initial-cluster-state", "new",
            "--initial-cluster-token", f"pon-lab-{lab.name}"]
