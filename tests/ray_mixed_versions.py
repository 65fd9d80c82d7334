"""A Ray cluster of this machine whose second node runs another copy of airobackend, and what the head says of it.
Run by tests/test_ray.py as `python ray_mixed_versions.py MODEL OTHER`, from a folder that holds no airobackend.

Ray puts the driver's working folder and its script's folder first on every worker's sys.path (so that tasks find
the driver's own modules; ray/_private/worker.py, `_py_driver_sys_path`): a driver started from a checkout makes
the workers of every node import that checkout, whatever the node's own environment. Started from elsewhere, a
node's workers import what their raylet's environment gives them: here PYTHONPATH=OTHER on the second node, as on a
machine with another install of airobackend.

Prints one JSON object: which airobackend each node's workers import, the errors of the Python API (`Llama`, 2
stages) and of `airobackend serve` (2 stages, 2 replicas) on the 2 nodes, and the class names of every actor the
cluster has had."""
from __future__ import annotations

import json
import os
import subprocess
import sys

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")     # as tests/test_ray.py: stay on the loopback
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402

STORE = 80 << 20
SLOW_START = {"worker_register_timeout_seconds": 600}      # a loaded 2-core machine starts workers slowly


@ray.remote(num_cpus=0)
def imported() -> dict:
    """The airobackend a worker of this node imports, and where its node check (airobackend.cluster) comes from."""
    import airobackend
    from airobackend import cluster
    return {"file": airobackend.__file__, "cluster": cluster.__file__, "version": airobackend.__version__,
            "code": cluster.code_digest()}


@ray.remote(num_cpus=0)
class Witness:
    """An actor of a known class: shows that the actor table read below lists this cluster's actors."""


def main(model: str, other: str) -> dict:
    c = Cluster(initialize_head=True, head_node_args=dict(num_cpus=1, object_store_memory=STORE,
                                                          include_dashboard=False, _system_config=SLOW_START))
    odd = c.add_node(num_cpus=1, object_store_memory=STORE, env_vars={"PYTHONPATH": other})
    c.wait_for_nodes(timeout=600)
    out: dict = {"odd_node": odd.node_id}
    ray.init(address=c.address, include_dashboard=False, log_to_driver=False)
    try:
        out["imports"] = {nd["NodeID"]: ray.get(imported.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            nd["NodeID"], soft=False)).remote()) for nd in ray.nodes() if nd["Alive"]}

        from airobackend import AiroError, Llama
        try:
            Llama(model, ray=c.address, stages=2, n_ctx=64, n_threads=1).close()
            out["api"] = None
        except AiroError as e:
            out["api"] = {"type": type(e).__name__, "message": str(e)}

        # Only once the API refused: a `serve` that is not refused serves until it is stopped.
        for how in ("--stages", "--replicas") if out["api"] else ():
            cli = subprocess.run([sys.executable, "-m", "airobackend", "serve", "--ray", c.address, how, "2",
                                  "--port", "0", "-c", "64", "-t", "1", model],
                                 capture_output=True, text=True, timeout=600)
            out["serve " + how] = {"rc": cli.returncode, "stderr": cli.stderr[-4000:]}

        ray.get(Witness.remote().__ray_ready__.remote())
        # Every actor the cluster has had, dead ones included (the GCS keeps them): Ray's developer API, as the
        # public state API needs the dashboard.
        out["actors"] = sorted({a["ActorClassName"] for a in ray._private.state.actors().values()})
    finally:
        ray.shutdown()
        c.shutdown()
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
