"""The Central Unit's files: CA, certificate, token and registry store in STATE/cu/."""

from pathlib import Path

from . import renderer
from .plan import CU_BINARY
from .topology import CU_ADDR
from .util import run


def directory(lab):
    return lab.dir / "cu"


def init(lab):
    """CA, certificate and token, once per lab (a restarted CU keeps them)."""
    d = directory(lab)
    if (d / "token").exists():
        return
    d.mkdir(exist_ok=True)
    bin_dir = lab.state["bin_dir"]
    run([str(Path(bin_dir) / CU_BINARY), "init", "--dir", str(d), "--ip", CU_ADDR,
         "--listen", f"{CU_ADDR}:{renderer.ports(bin_dir)['cu']}"])
