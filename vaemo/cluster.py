"""Ray from the driver's side: joining a cluster or starting a local one, the environment Ray's workers and
actors must see, and pools of actors that each hold one model replica (evaluation, teacher cache)."""

from __future__ import annotations

import os
from typing import Any, Iterator

from vaemo import progress
from vaemo.config import project_root
from vaemo.errors import UserError

FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM", "RAY_AUTH_MODE")
FORWARDED_PREFIXES = ("VAEMO_", "NCCL_", "CUDA_")


def connect_ray() -> None:
    """Join the cluster RAY_ADDRESS names (as under `ray job submit`), else start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # must match the `ray` CLI; see README, Ray notes
    address = os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address)
        ray.init(address=address, log_to_driver=True)
    else:
        start_local_ray()


def check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Fail with one line when nothing listens at RAY_ADDRESS: ray.init would retry a dead head forever."""
    import socket

    if address in ("auto", "local"):  # Ray resolves these itself and fails fast when there is none
        return
    if address.startswith(("http://", "https://")):
        raise UserError(
            f"RAY_ADDRESS={address} is a dashboard (job submission) address; drivers join the head's own "
            "address, host:port (6379 unless `ray start --port` said otherwise)"
        )
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as err:
        raise UserError(f"RAY_ADDRESS={address}: no Ray cluster answers there ({err}); start one or unset RAY_ADDRESS") from None


def start_local_ray() -> None:
    """A Ray of our own on this machine, in a private temp folder that records its address.

    Ray's own helpers look clusters up by address (Train's placement-group cleaner asks the state API
    whether the controller is alive). With another Ray instance on the machine (a test session, a
    `ray start` head) Ray 2.60 resolves to the wrong one or none; the cleaner's thread dies and the
    worker group's placement group is never freed, so the next Tune trial waits forever. Processes of
    this cluster inherit RAY_TMPDIR and so find its address file, and only its.
    """
    import tempfile

    import ray
    from ray._private.utils import write_ray_address

    private = tempfile.mkdtemp(prefix="vaemo-ray-")
    previous = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = private  # read when Ray spawns its processes, inside ray.init
    try:
        context = ray.init(address="local", num_cpus=os.cpu_count(), log_to_driver=True, configure_logging=False)
        write_ray_address(context.address_info["gcs_address"], os.path.join(private, "ray"))
    finally:
        if previous is None:
            os.environ.pop("RAY_TMPDIR", None)  # our child processes (not Ray's) must not inherit it
        else:
            os.environ["RAY_TMPDIR"] = previous
    progress.log(f"started a local Ray (logs: {private}/ray/session_latest/logs)")


def remove_placement_groups_of_this_job() -> list[str]:
    """Remove the placement groups this driver's job still holds; returns their ids. Tune can create one for
    a trial just as a sweep ends, and Ray 2.60 then keeps it, with its CPUs, after the job is gone: on a
    shared head a 0.5-CPU group left by a sweep made every later 2-worker run wait for good."""
    import ray
    from ray._common.utils import hex_to_binary
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    job = ray.get_runtime_context().get_job_id()  # a placement group's id ends with its job's
    left = [pg for pg, info in ray.util.placement_group_table().items() if pg.endswith(job) and info["state"] != "REMOVED"]
    for pg in left:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(hex_to_binary(pg))))
    return left


def forwarded_env() -> dict[str, str]:
    """The driver's variables that Ray workers and actors must see: vaemo's, the hub switches, and NCCL/CUDA
    tuning (a cluster's NCCL_SOCKET_IFNAME, NCCL_IB_*...). CUDA_VISIBLE_DEVICES is Ray's to set per worker."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env.update({k: v for k, v in os.environ.items() if k.startswith(FORWARDED_PREFIXES) and k != "CUDA_VISIBLE_DEVICES"})
    return env


def map_on_actors(
    cls: type, init_args: tuple, method: str, items: list, actors: int, cpus: float = 1.0, gpus: float | None = None
) -> Iterator[Any]:
    """Yield `cls(*init_args).<method>(item)` for every item, in completion order, from
    min(actors, len(items)) Ray actors of `cpus` CPUs and `gpus` GPUs each (None: one GPU when the
    cluster has any). Joins RAY_ADDRESS's cluster or starts a local Ray; kills the actors afterwards."""
    import ray
    from ray.util import ActorPool

    connect_ray()
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    env = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **forwarded_env(),
        "PYTHONPATH": str(project_root()),
    }
    remote = ray.remote(num_cpus=cpus, num_gpus=gpus, runtime_env={"env_vars": env})(cls)
    handles = [remote.remote(*init_args) for _ in range(min(actors, len(items)))]
    try:
        yield from ActorPool(handles).map_unordered(lambda actor, item: getattr(actor, method).remote(item), items)
    finally:
        for handle in handles:
            ray.kill(handle)
