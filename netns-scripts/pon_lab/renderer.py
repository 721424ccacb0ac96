"""pon-lab-config (crate netns-scripts/lab-config): the daemons' configurations are written by
their own Rust config types, and the well-known ports come from the Rust side too. The lab
only decides values (ids, addresses, peers, routes, CU settings); it keeps no schema.

The renderer is looked for in $PON_LAB_CONFIG, the lab's bin dir, then $CARGO_TARGET_DIR's and
this checkout's target/release and target/debug, so a lab running older daemons (--bin-dir)
still finds it, also when cargo builds elsewhere than target/.
"""

import functools
import json
import os
from pathlib import Path

from .util import LabError, run

BINARY = "pon-lab-config"
REPO = Path(__file__).resolve().parent.parent.parent


def find(bin_dir=None):
    candidates = [os.environ.get("PON_LAB_CONFIG")]
    if bin_dir:
        candidates.append(Path(bin_dir) / BINARY)
    targets = [Path(t) for t in [os.environ.get("CARGO_TARGET_DIR")] if t] + [REPO / "target"]
    candidates += [t / profile / BINARY for t in targets for profile in ("release", "debug")]
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return str(c)
    raise LabError(f"{BINARY} not found (build it: cargo build --release -p {BINARY}; "
                   "or set PON_LAB_CONFIG)")


@functools.cache
def ports(bin_dir=None):
    """{"pon", "agent_udp", "ra_udp", "steering", "cu", "local": {daemon: port},
    "metrics": {daemon: port}}"""
    return json.loads(run([find(bin_dir), "ports"]).stdout)


def metrics_port(daemon, bin_dir=None):
    return ports(bin_dir)["metrics"][daemon]


def identities(dirs, bin_dir=None):
    """{dir: public key} of the identities kept in `dirs` (made there if new)."""
    return json.loads(run([find(bin_dir), "identity", *map(str, dirs)]).stdout)


def render_batch(jobs, bin_dir=None):
    """Writes configs: jobs are {"daemon", "path", "config"} (config: JSON-able values).
    All are checked by the daemons' own parsers before any is written; a bad value fails
    with the daemon's message naming the field and the file."""
    if jobs:
        run([find(bin_dir), "render-batch"], input=json.dumps(jobs))
