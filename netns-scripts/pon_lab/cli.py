"""The command line: `lab up|status|exec|impair|add-site|stop|start|down|list` (see
netns-scripts/lab for the full usage). Unchanged by the split into modules: other tools
(tests/src/lib.rs, netns-scripts/demo, the benchmarks) drive it."""

import argparse
import json
import os
import re
import sys
from pathlib import Path

from . import netns
from .lab import STATE_ROOT, Lab
from .plan import DAEMON_BINARIES, needed_binaries
from .topology import LAB_NAME_RE, LINK_FIELDS, load_topology
from .util import LabError, progress

REPO = Path(__file__).resolve().parent.parent.parent
DESCRIPTION = ("lab: build a multi-site PON topology in Linux network namespaces and run PON "
               "daemons in it.")


def resolve_bin_dir(arg, need=DAEMON_BINARIES):
    if arg:
        bin_dir = Path(arg)
    elif os.environ.get("PON_BIN_DIR"):
        bin_dir = Path(os.environ["PON_BIN_DIR"])
    elif (REPO / "target/release/pon-forwarder").exists():
        bin_dir = REPO / "target/release"
    else:
        bin_dir = REPO / "target/debug"
    bin_dir = bin_dir.resolve()
    missing = [b for b in need if not os.access(bin_dir / b, os.X_OK)]
    if missing:
        raise LabError(f"bin dir {bin_dir} lacks executable {', '.join(missing)} "
                       "(build the workspace, or pass --bin-dir / set PON_BIN_DIR)")
    return bin_dir


def cmd_up(args):
    lab = Lab(args.name)
    topology = load_topology(args.topology)
    need = needed_binaries(topology, with_daemons=not args.no_daemons)
    bin_dir = resolve_bin_dir(args.bin_dir, need) if need else None
    lab.up(topology, bin_dir, with_daemons=not args.no_daemons)
    lab.print_table()
    apps = lab.hosts("app")
    target = next((h for h in apps if h["site"] != apps[0]["site"]), apps[0])
    print(f"\ntry:  {sys.argv[0]} exec {lab.name} {apps[0]['name']} -- ping -c1 {target['address']}"
          f"\nstop: {sys.argv[0]} down {lab.name}")
    return 0


def cmd_status(args):
    lab = Lab(args.name)
    lab.load()
    if args.json:
        print(json.dumps(lab.describe(), indent=2))
    else:
        lab.print_table()
    return 0


def cmd_exec(args):
    lab = Lab(args.name)
    lab.load()
    host = lab.find_host(args.host)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        command = [os.environ.get("SHELL", "/bin/sh")]
    # Replace ourselves so stdin/stdout/signals and the exit status pass straight through.
    os.execvp("ip", ["ip", "netns", "exec", host["netns"], *command])


def cmd_impair(args):
    if args.down and args.up:
        raise LabError("--down and --up exclude each other")
    changes = {k: getattr(args, k) for k in LINK_FIELDS if getattr(args, k) is not None}
    down = True if args.down else False if args.up else None
    if not changes and down is None:
        raise LabError("nothing to change: give --delay-ms, --jitter-ms, --loss, --rate-mbit, "
                       "--down or --up")
    lab = Lab(args.name)
    if not lab.dir.is_dir():
        raise LabError(f"no lab named {args.name!r} (no {lab.dir})")
    lk = lab.impair(args.site_a, args.site_b, changes, down)
    rate = f"{lk['rate_mbit']:g} Mbit/s" if lk["rate_mbit"] else "unlimited"
    progress(f"{args.site_a} <-> {args.site_b}: delay {lk['delay_ms']:g} ms, jitter "
             f"{lk['jitter_ms']:g} ms, loss {lk['loss']:g}, rate {rate}, "
             f"{'DOWN' if lk['down'] else 'up'}")
    return 0


def cmd_add_site(args):
    lab = Lab(args.name)
    if not lab.dir.is_dir():
        raise LabError(f"no lab named {args.name!r} (no {lab.dir})")
    new = lab.add_site(args.site, args.apps, args.role)
    progress(f"site {args.site} added: " + ", ".join(f"{h['name']} {h['address']}" for h in new))
    return 0


def cmd_stop(args):
    lab = Lab(args.name)
    if not lab.dir.is_dir():
        raise LabError(f"no lab named {args.name!r} (no {lab.dir})")
    names = lab.stop_host(args.host, args.graceful)
    progress(f"{args.host}: stopped {', '.join(names)} ({'SIGTERM' if args.graceful else 'SIGKILL'})")
    return 0


def cmd_start(args):
    lab = Lab(args.name)
    if not lab.dir.is_dir():
        raise LabError(f"no lab named {args.name!r} (no {lab.dir})")
    lab.start_host(args.host)
    progress(f"{args.host}: started")
    return 0


def cmd_down(args):
    lab = Lab(args.name)
    lab.teardown()
    progress(f"lab {args.name!r} is down")
    return 0


def cmd_list(args):
    names = set()
    if STATE_ROOT.is_dir():
        names |= {p.name for p in STATE_ROOT.iterdir() if p.is_dir() and LAB_NAME_RE.match(p.name)}
    # Also labs whose state dir is gone but whose namespaces survived (so they can be `down`ed).
    for ns in netns.existing():
        m = re.match(r"^pon-([a-z0-9]{1,8})-", ns)
        if m:
            names.add(m.group(1))
    for name in sorted(names):
        print(name)
    return 0


def add_command(sub, cmd, func, help_text, lab=True):
    """A subcommand running `func`; with `lab`, on an existing lab named first."""
    p = sub.add_parser(cmd, help=help_text)
    p.set_defaults(func=func)
    if lab:
        p.add_argument("name")
    return p


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="lab", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = add_command(sub, "up", cmd_up, "create namespaces and start daemons", lab=False)
    p.add_argument("topology", help="topology TOML file")
    p.add_argument("--name", required=True, help="lab name, [a-z0-9]{1,8}")
    p.add_argument("--bin-dir", help="directory with the PON binaries (pon-forwarder, "
                   "pon-agent, ...)")
    p.add_argument("--no-daemons", action="store_true", help="build only the namespaces")

    p = add_command(sub, "status", cmd_status, "show hosts, addresses and daemons")
    p.add_argument("--json", action="store_true")

    p = add_command(sub, "exec", cmd_exec, "run a command inside a host (SITE/HOST or inet)")
    p.add_argument("host")
    p.add_argument("command", nargs=argparse.REMAINDER)

    p = add_command(sub, "impair", cmd_impair, "change the emulated link between two sites "
                    "while traffic flows (both directions; unnamed settings are kept)")
    p.add_argument("site_a")
    p.add_argument("site_b")
    for key, (maximum, help_text) in LINK_FIELDS.items():
        p.add_argument(f"--{key.replace('_', '-')}", dest=key, type=float, metavar="N",
                       help=f"{help_text}, 0..{maximum}")
    p.add_argument("--down", action="store_true",
                   help="drop every packet between the two sites, both directions")
    p.add_argument("--up", action="store_true",
                   help="end --down; the other settings are as before")

    p = add_command(sub, "add-site", cmd_add_site,
                    "add a site (proxy and app VMs) to a running CU-mode lab")
    p.add_argument("site")
    p.add_argument("--apps", type=int, default=1)
    p.add_argument("--role", default="PROXY", help="the proxy's role (default PROXY)")

    p = add_command(sub, "stop", cmd_stop, "stop a host's daemons (SIGKILL: a crash)")
    p.add_argument("host", help="SITE/HOST or cu")
    p.add_argument("--graceful", action="store_true", help="SIGTERM instead: a clean goodbye")

    p = add_command(sub, "start", cmd_start, "start a stopped host's daemons again")
    p.add_argument("host", help="SITE/HOST or cu")

    add_command(sub, "down", cmd_down, "stop daemons and delete everything")
    add_command(sub, "list", cmd_list, "names of existing labs", lab=False)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if os.geteuid() != 0:
        print("lab: must run as root (network namespaces)", file=sys.stderr)
        return 1
    try:
        return args.func(args)
    except LabError as e:
        print(f"lab: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `lab status x --json | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
