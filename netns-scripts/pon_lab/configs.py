"""What the lab sets in each daemon's configuration: only the values it decides (ids,
addresses, peers, routes, CU settings, the topology's options). Everything else is the
daemon's default, and the TOML is written by the daemon's own config type (renderer)."""


from . import cu, linkemu, renderer
from .plan import AGENT_BINARY, CU_BINARY, LINKEMU_BINARY, PROXY_BINARY, daemon_names
from .topology import (CU_NAME, ETCD_CLIENT_PORT, MTU, RELAY_PORT, app_addr, cu_replica_addr,
                       cu_replica_name, proxy_addr, proxy_id, proxy_number, public_addr,
                       relay_route)

LINKEMU_TUN = "wan0"
LINKEMU_RT_PRIORITY = 10  # SCHED_FIFO: above every ordinary process, below kernel threads


def write(lab, hosts):
    """Writes the configs of `hosts`' daemons (pon-cu init first, when a CU is among them)."""
    makers = {"pon-forwarder": forwarder, PROXY_BINARY: proxy, "pon-monitor": monitor,
              "pon-router": router, "pon-ra": ra, "pon-ta": ta, AGENT_BINARY: agent,
              LINKEMU_BINARY: linkemu_config, CU_BINARY: cu_config}
    jobs = []
    for h in hosts:
        for d in h["daemons"]:
            if d["name"] not in makers:
                continue  # etcd: flags only (plan.etcd_args)
            if d["name"] == CU_BINARY:
                cu.init(lab)
            jobs.append({"daemon": d["name"], "path": d["config"],
                         "config": makers[d["name"]](lab, h)})
    renderer.render_batch(jobs, lab.state["bin_dir"])


def ports(lab):
    return renderer.ports(lab.state["bin_dir"])


def metrics(lab, host, daemon):
    return f"{host['address']}:{ports(lab)['metrics'][daemon]}"


def local_addr(lab, daemon):
    """The split daemons' local link, on loopback."""
    return f"127.0.0.1:{ports(lab)['local'][daemon]}"


def cu_client(lab, host, role):
    """The [cu] section: the site's token for the role's family (the agent needs it only to
    enrol, on its first start)."""
    port = ports(lab)['cu']
    names = lab.state["topology"].get("cu_names", [CU_NAME])
    replicas = lab.state["topology"].get("cu_replicas", 1)
    if replicas > 1:
        # Every replica, each site starting with its own (site i: replica i mod N), so
        # the sites' agents spread over the replicas and move on when theirs fails.
        first = (host["site_index"] - 1) % replicas
        names = [cu_replica_name((first + j) % replicas + 1) for j in range(replicas)]
    addr = [f"{n}:{port}" for n in names] if len(names) > 1 else f"{names[0]}:{port}"
    cfg = {"addr": addr, "ca": str(cu.directory(lab) / "ca.pem"),
           "token_file": str(cu.token_file(lab, host["site"], role)), "cloud": host["site"],
           "role": role}
    if lab.state["topology"].get("cu_relay"):
        # Proxies relay their site's app VMs' sessions; app VMs go through them first.
        if host["role"] == "proxy":
            cfg["relay_listen"] = f"{host['address']}:{RELAY_PORT}"
        else:
            site = lab.site(host["site"])
            cfg["relay"] = [f"{proxy_addr(host['site_index'], n)}:{RELAY_PORT}"
                            for n in range(1, site.get("proxies", 1) + 1)]
    return cfg


def state_dir(lab, host, daemon):
    """Where a daemon keeps its keys and certificate: one directory per daemon, so no two
    agents ever share a key."""
    return str(lab.dir / "state" / f"{host['site']}-{host['host']}-{daemon}")


def cu_config(lab, host):
    d = cu.directory(lab)
    cfg = {"listen": f"{host['address']}:{ports(lab)['cu']}",
           "cert": str(d / "cu.pem"), "key": str(d / "cu.key"), "ca": str(d / "ca.pem"),
           "ca_key": str(d / "ca.key"), "admin_cert": str(d / "admin.pem"),
           "store": str(d / "registry.redb"), "metrics": metrics(lab, host, CU_BINARY),
           "clouds": cu.grants(lab)}
    replicas = lab.state["topology"].get("cu_replicas", 1)
    if replicas > 1:
        # The replicas share the CA and certificate (STATE/cu/) and the registry (etcd).
        # Its own host's member first; the others are where it fails over to.
        me = int(host["host"].removeprefix("cu"))
        order = [(me - 1 + j) % replicas + 1 for j in range(replicas)]
        cfg["etcd"] = {"endpoints": [f"http://{cu_replica_addr(k)}:{ETCD_CLIENT_PORT}"
                                     for k in order],
                       "prefix": "/pon", "replica": host["host"]}
    return cfg


def forwarder(lab, host, daemon="pon-forwarder"):
    topo = lab.state["topology"]
    i, me = host["site_index"], lab.site(host["site"])
    others = [s for s in topo["sites"] if s["index"] != i]
    ids = {s["name"]: s["index"] for s in topo["sites"]}
    pon_port = ports(lab)["pon"]
    routes = [{"to": s["index"], "via": [ids[r] for r in via]}
              for s in others if (via := relay_route(topo, me["name"], s["name"]))]
    cfg = {"id": proxy_id(i, proxy_number(host["host"])),
           "listen": f"{host['address']}:{pon_port}", "local_addr": host["address"],
           "underlay_mtu": MTU, "metrics": metrics(lab, host, daemon), "route": routes,
           "state_dir": state_dir(lab, host, daemon)}
    if topo.get("tunnel"):
        cfg["tunnel"] = dict(topo["tunnel"])
    if topo.get("encrypt_lan"):
        cfg["encrypt_lan"] = True
    if topo.get("split") and topo.get("routing") is not None:
        keys = local_keys(lab, host)
        cfg["local"] = {"listen": local_addr(lab, "pon-forwarder"),
                        "monitor": local_addr(lab, "pon-monitor"),
                        "monitor_key": keys["pon-monitor"],
                        "router": local_addr(lab, "pon-router"),
                        "router_key": keys["pon-router"]}
    if topo.get("cu"):
        # The CU hands out peers, agents and destinations; we ask for id i so that
        # relay routes (by id) and the tests' expectations hold.
        cfg["cu"] = cu_client(lab, host, me.get("role", "PROXY"))
        return cfg
    # Static mode names each peer's key, as WireGuard configs do; the
    # identities are made now, each in its proxy's state directory.
    dirs = {s["name"]: state_dir(lab, {"site": s["name"], "host": host["host"]}, daemon)
            for s in others}
    keys = renderer.identities(dirs.values(), lab.state["bin_dir"])
    # A peer behind NAT is reached at its public address.
    cfg["peer"] = [{"id": s["index"],
                    "addr": f"{(public_addr if s.get('nat') else proxy_addr)(s['index'])}:{pon_port}",
                    "public_key": keys[dirs[s["name"]]]}
                   for s in others]
    # ... and each agent's key (the TA's identity, which the RA shares).
    apps = [app_dir(lab, host["site"], j) for j in range(1, me["apps"] + 1)]
    app_keys = renderer.identities(apps, lab.state["bin_dir"])
    cfg["agent"] = [{"addr": app_addr(i, j), "encap": topo["encap"],
                     "public_key": app_keys[apps[j - 1]]}
                    for j in range(1, me["apps"] + 1)]
    cfg["destination"] = [{"prefix": f"{app_addr(s['index'], j)}/32", "proxy": s["index"]}
                          for s in others for j in range(1, s["apps"] + 1)]
    return cfg


def proxy(lab, host):
    """pon-proxy: the forwarder's configuration plus the topology's [routing] settings (and
    with proxy_pmon, its own PMon listener)."""
    cfg = forwarder(lab, host, PROXY_BINARY) | {"routing": dict(lab.state["topology"]["routing"])}
    if lab.state["topology"].get("proxy_pmon"):
        cert, key = cu.pmon_cert(lab, host)
        cfg["pmon"] = {"listen": f"{host['address']}:{ports(lab)['pmon']}", "cert": str(cert),
                       "key": str(key), "admin_cert": str(cu.directory(lab) / "admin.pem")}
    return cfg


SPLIT_PARTS = ("pon-forwarder", "pon-monitor", "pon-router")


def local_keys(lab, host):
    """The public keys of a split proxy's three processes (each its own identity,
    made now in its state directory): the local link between them is authenticated."""
    dirs = {d: state_dir(lab, host, d) for d in SPLIT_PARTS}
    keys = renderer.identities(dirs.values(), lab.state["bin_dir"])
    return {d: keys[dirs[d]] for d in SPLIT_PARTS}


def split_part(lab, host, daemon):
    """pon-monitor's or pon-router's local link: its own address and state
    directory, the other two parts' addresses and keys."""
    keys = local_keys(lab, host)
    cfg = {"listen": local_addr(lab, daemon), "state_dir": state_dir(lab, host, daemon),
           "metrics": metrics(lab, host, daemon)}
    for other in SPLIT_PARTS:
        if other != daemon:
            name = other.removeprefix("pon-")
            cfg[name] = local_addr(lab, other)
            cfg[f"{name}_key"] = keys[other]
    return cfg


def monitor(lab, host):
    return split_part(lab, host, "pon-monitor")


def router(lab, host):
    return split_part(lab, host, "pon-router") | {"routing": dict(lab.state["topology"]["routing"])}


def agent_options(lab):
    """Settings the TA and RA share; only set when not the default, so that older binaries
    (benchmarked against) still read the config."""
    return {} if lab.state["topology"].get("offload", True) else {"offload": False}


def app_dir(lab, site, j):
    """The state directory of app VM j's TA, which its RA shares (one identity per VM)."""
    return state_dir(lab, {"site": site, "host": f"app{j}"}, "pon-ta")


def proxy_key(lab, site):
    """The static key of `site`'s proxy (made now in its state directory if new)."""
    proxy = next(h for h in lab.state["hosts"] if h["site"] == site and h["role"] == "proxy")
    d = state_dir(lab, proxy, daemon_names(lab.state["topology"], "proxy")[0])
    return renderer.identities([d], lab.state["bin_dir"])[d]


def ra(lab, host):
    # The VM's identity (the TA's) is made now, so the RA, which reads it, need not
    # wait for the TA to start.
    renderer.identities([state_dir(lab, host, "pon-ta")], lab.state["bin_dir"])
    return agent_options(lab) | {"proxy": proxy_addr(host["site_index"]),
                                 "proxy_key": proxy_key(lab, host["site"]),
                                 "state_dir": state_dir(lab, host, "pon-ta"),
                                 "local_addr": host["address"],
                                 "metrics": metrics(lab, host, "pon-ra")}


def ta(lab, host):
    topo = lab.state["topology"]
    cfg = ({"mtu": topo["ta_mtu"]} if topo.get("ta_mtu") else {}) | agent_options(lab) | {
        "local_addr": host["address"], "encap": topo["encap"], "underlay_mtu": MTU,
        "metrics": metrics(lab, host, "pon-ta")}
    cfg["state_dir"] = state_dir(lab, host, "pon-ta")
    if topo.get("encrypt_lan"):
        cfg["encrypt_lan"] = True
    if topo.get("cu"):
        return cfg | {"cu": cu_client(lab, host, "APP")}
    return cfg | {"forwarder": proxy_addr(host["site_index"]),
                  "forwarder_key": proxy_key(lab, host["site"]),
                  "intercept": [f"{app_addr(s['index'], j)}/32" for s in topo["sites"]
                                if s["index"] != host["site_index"]
                                for j in range(1, s["apps"] + 1)]}


def agent(lab, host):
    """pon-agent: the TA's and the RA's configurations as its [ta] and [ra] tables. Besides
    its own page (both parts' counters), it serves each part's page where pon-ta and pon-ra
    serve theirs, so whoever scrapes an app VM finds the same pages whichever runs."""
    return {"metrics": metrics(lab, host, AGENT_BINARY), "ta": ta(lab, host), "ra": ra(lab, host)}


def linkemu_config(lab, host):
    return {
        "tun_name": LINKEMU_TUN,
        "mtu": MTU,
        # Real-time data path: packets leave on time also on a loaded machine.
        "realtime_priority": LINKEMU_RT_PRIORITY,
        "control": str(linkemu.control_socket(lab)),
        "metrics": metrics(lab, host, LINKEMU_BINARY),
        "site": linkemu.sites(lab),
        "link": linkemu.directed_links(lab),
    }
