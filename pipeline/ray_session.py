"""Connect to the Ray cluster named by RAY_ADDRESS, or start a local one with this machine's CPUs; shared by the
jobs that fan out over Ray (explain's actors, SpRAy's class tasks)."""
from __future__ import annotations

import logging
import os


def start_ray():
    """(ray, started): the ray module, initialised, and whether this call started it (then the caller shuts it down)."""
    import ray

    if ray.is_initialized():
        return ray, False
    address = os.environ.get("RAY_ADDRESS")
    if not address:  # a local cluster: Ray's default token authentication stays on, without its banner
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    ray.init(address=address or None, num_cpus=None if address else os.cpu_count(), include_dashboard=False,
             configure_logging=False, log_to_driver=False)
    return ray, True
