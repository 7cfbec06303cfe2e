"""Ray from the driver's side: joining a cluster or starting a local one, the environment Ray's workers and
actors must see, and pools of actors that each hold one model replica (evaluation, teacher cache)."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path
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
    if address in ("auto", "local"):  # Ray resolves these itself and fails fast when there is none
        return
    if address.startswith(("http://", "https://")):
        raise UserError(
            f"RAY_ADDRESS={address} is a dashboard (job submission) address; drivers join the head's own "
            "address, host:port (6379 unless `ray start --port` said otherwise)"
        )
    err = connection_error(address.removeprefix("ray://"), timeout_s)
    if err is not None:
        raise UserError(f"RAY_ADDRESS={address}: no Ray cluster answers there ({err}); start one or unset RAY_ADDRESS")


def connection_error(address: str, timeout_s: float) -> Exception | None:
    """Why nothing answers at host:port, or None when something does."""
    import socket

    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as err:
        return err
    return None


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

    remove_stopped_local_rays(Path(tempfile.gettempdir()))
    private = tempfile.mkdtemp(prefix=LOCAL_RAY_PREFIX)
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


def check_nodes_see(inputs: list[tuple[str, str]], output: tuple[str, Path], per_worker: dict[str, float]) -> None:
    """Every other node that can host a worker (its resources hold `per_worker`) sees what the driver sees,
    at the same paths: it imports vaemo, finds each input (field, path) that exists here, and writes into
    the output folder (flag, path). A path only the head has would fail the workers at their first
    checkpoint, hours in, and again on each retry. Raises one line naming the node and the path; a
    one-node cluster (a local Ray, a job on a single machine) has nothing to check."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    others = [
        node
        for node in ray.nodes()
        if node["Alive"]
        and node["NodeID"] != here
        and all(node["Resources"].get(name, 0) >= amount for name, amount in per_worker.items() if amount > 0)
    ]
    if not others:
        return
    flag, folder = output
    marker = folder / f".vaemo-node-check-{uuid.uuid4().hex}"
    marker.write_text("written by the driver; every node must see it")
    seen_here = [(field, path) for field, path in inputs if os.path.exists(path)]

    def unseen(paths: list[tuple[str, str]], folder: str, marker: str) -> list[str]:
        # Defined here so that Ray sends the function itself: a node without the project must still run it.
        import importlib.util

        # (found, not imported: a check of seconds, not of torch's import time)
        absent = [name for name in ("vaemo", *PACKAGES_WORKERS_IMPORT) if importlib.util.find_spec(name) is None]
        problems = [f"cannot import {', '.join(absent)} (python {sys.executable})"] if absent else []
        problems += [f"cannot see {field} '{path}'" for field, path in paths if not os.path.exists(path)]
        if not os.path.exists(marker):
            problems.append(f"cannot see {flag} '{folder}' (the file the driver wrote there is missing)")
        if not problems:
            probe = os.path.join(folder, f".vaemo-node-write-{os.getpid()}")
            try:
                with open(probe, "w") as f:
                    f.write("ok")
                os.remove(probe)
            except OSError as err:
                problems.append(f"cannot write into {flag} '{folder}' ({err.strerror})")
        return problems

    task = ray.remote(num_cpus=0, max_retries=0)(unseen)
    env = {"env_vars": {"PYTHONPATH": str(project_root())}}
    try:
        answers = {
            f"{node['NodeManagerHostname']} ({node['NodeManagerAddress']})": task.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False), runtime_env=env
            ).remote(seen_here, str(folder), str(marker))
            for node in others
        }
        for name, answer in answers.items():
            try:
                problems = ray.get(answer, timeout=NODE_CHECK_TIMEOUT_S)
            except ray.exceptions.GetTimeoutError:
                raise UserError(f"node {name} did not run a 0-CPU check task within {NODE_CHECK_TIMEOUT_S:g} s") from None
            except ray.exceptions.RayError as err:
                raise UserError(f"node {name} could not run a check task: {str(err).strip().splitlines()[0][:200]}") from None
            if problems:
                raise UserError(
                    f"node {name} {problems[0]}"
                    + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                    + ": every node must see the project, the data, the models and the run folder at the same "
                    "paths (shared storage)"
                )
    finally:
        marker.unlink(missing_ok=True)


# What a training worker imports first: a node whose Python lacks one runs another interpreter than the venv's.
PACKAGES_WORKERS_IMPORT = ("torch", "deepspeed", "transformers", "ray", "rich")
# Starting a Python worker on a node takes seconds; a minute more means the node cannot start one.
NODE_CHECK_TIMEOUT_S = 120.0


LOCAL_RAY_PREFIX = "vaemo-ray-"


def remove_stopped_local_rays(temp: Path, keep: int = 3) -> list[Path]:
    """Remove the private folders (logs, a few MB each) of earlier commands' local Rays that have stopped,
    but the `keep` newest: their logs are what a user reads after a failure. A Ray still answering at the
    address its folder records (a command still running) keeps its folder. Returns what was removed."""
    import time

    stopped = []
    for folder in temp.glob(f"{LOCAL_RAY_PREFIX}*"):
        address = folder / "ray" / "ray_current_cluster"
        try:
            modified = folder.stat().st_mtime
            recorded = address.read_text().strip() if address.exists() else None
        except OSError:  # removed meanwhile by another command
            continue
        if recorded is None and time.time() - modified < 600:  # a Ray still starting there
            continue
        if recorded is not None and connection_error(recorded, timeout_s=1.0) is None:  # running
            continue
        stopped.append((modified, folder))
    removed = [folder for _, folder in sorted(stopped, reverse=True)[keep:]]
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
    return removed


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
    cls: type,
    init_args: tuple,
    method: str,
    items: list,
    actors: int,
    cpus: float = 1.0,
    gpus: float | None = None,
    autoscaling: bool = False,
) -> Iterator[Any]:
    """Yield `cls(*init_args).<method>(item)` for every item, in completion order, from up to
    min(actors, len(items)) Ray actors of `cpus` CPUs and `gpus` GPUs each (None: one GPU when the
    cluster has any). Joins RAY_ADDRESS's cluster or starts a local Ray; kills the actors afterwards.

    Items go only to actors that have started: actors the cluster cannot place now (GPUs another job
    holds, a node not yet up) join when they start, and the work never waits on them. Actors the nodes
    up now could never place are not asked for, unless `autoscaling` (the cluster adds nodes on demand:
    asking is what makes it add them). Until the first starts, a line every minute says what the pool
    waits for."""
    import ray
    from ray.util import ActorPool

    if not items:
        return
    connect_ray()
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    count = actors_to_ask(min(actors, len(items)), nodes, cpus, gpus, autoscaling)
    env = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **forwarded_env(),
        "PYTHONPATH": str(project_root()),
    }
    remote = ray.remote(num_cpus=cpus, num_gpus=gpus, runtime_env={"env_vars": env})(cls)
    handles = [remote.remote(*init_args) for _ in range(count)]
    starting = {handle.__ray_ready__.remote(): handle for handle in handles}
    pool = ActorPool([])
    for item in items:  # queued until an actor is free
        pool.submit(lambda actor, item: getattr(actor, method).remote(item), item)

    def admit(timeout: float) -> None:
        started, _ = ray.wait(list(starting), num_returns=len(starting), timeout=timeout, fetch_local=False)
        for ref in started:
            pool.push(starting.pop(ref))

    try:
        waited = 0.0
        admit(0)
        while not pool.has_next():  # no actor has started yet
            ray.wait(list(starting), num_returns=1, timeout=ACTOR_WAIT_LOG_S, fetch_local=False)
            admit(0)
            if not pool.has_next():
                waited += ACTOR_WAIT_LOG_S
                free = ray.available_resources()
                progress.log(
                    f"waiting {waited / 60:.0f} min for an actor of {cpus:g} CPU and {gpus:g} GPU to start "
                    f"(free now: {free.get('CPU', 0):g} CPU, {free.get('GPU', 0):g} GPU; loading a model also takes time)"
                )
        while pool.has_next():
            # nothing finished within the wait: look for actors that started since
            with contextlib.suppress(TimeoutError):
                yield pool.get_next_unordered(timeout=ACTOR_WAIT_LOG_S)
            if starting:
                admit(0)
        if starting:
            progress.log(f"{len(starting)} of {count} actor(s) never started: the cluster had no room for them")
    finally:
        for handle in handles:
            ray.kill(handle)


# How long the pool waits on its actors before it looks again (for actors that started, or to say it waits).
ACTOR_WAIT_LOG_S = 60.0


def workers_that_fit(nodes: list[dict[str, float]], per_worker: dict[str, float], strategy: str) -> int:
    """How many workers of `per_worker` resources nodes with these total resources hold together, as a Ray
    placement strategy places them: STRICT_PACK all on one node, STRICT_SPREAD each on its own, PACK and
    SPREAD anywhere. Node by node: a cluster's totals can hold a group no node can (GPUs on one node, the
    CPUs each worker needs beside its GPU on another)."""
    fits = [actors_that_fit(node, per_worker.get("CPU", 0), per_worker.get("GPU", 0)) for node in nodes]
    if strategy == "STRICT_PACK":
        return max(fits, default=0)
    if strategy == "STRICT_SPREAD":
        return sum(1 for fit in fits if fit >= 1)
    return sum(fits)


def actors_to_ask(wanted: int, nodes: list[dict[str, float]], cpus: float, gpus: float, autoscaling: bool) -> int:
    """How many of `wanted` actors to ask for, given the total resources of the nodes up now: those they hold
    (a line when fewer than wanted), or, with `autoscaling`, all of them (the autoscaler adds nodes for the
    actors Ray cannot place). One line and no actor where nothing could place one."""
    count = min(wanted, sum(actors_that_fit(node, cpus, gpus) for node in nodes))
    if count < wanted and autoscaling:
        progress.log(
            f"the nodes up now hold {count} of {wanted} actor(s) of {cpus:g} CPU and {gpus:g} GPU each: "
            "the rest wait for the autoscaler to add nodes"
        )
        return wanted
    if count < 1:
        have = {name: sum(node.get(name, 0) for node in nodes) for name in ("CPU", "GPU")}
        raise UserError(
            f"no node of this Ray cluster can hold one actor of {cpus:g} CPU and {gpus:g} GPU "
            f"(the cluster has {have['CPU']:g} CPU, {have['GPU']:g} GPU; where nodes start on demand, set "
            "scaling.autoscaling=true in the preset given with --config)"
        )
    if count < wanted:
        progress.log(f"{count} actor(s) instead of {wanted}: the cluster holds no more of {cpus:g} CPU and {gpus:g} GPU each")
    return count


def actors_that_fit(resources: dict[str, float], cpus: float, gpus: float) -> int:
    """How many actors of `cpus` CPUs and `gpus` GPUs a node's total resources hold."""
    counts = [resources.get(name, 0) / amount for name, amount in (("CPU", cpus), ("GPU", gpus)) if amount > 0]
    # (Ray counts resources in units of 1e-4: 33 CPUs hold 30 actors of 1.1, though 33 / 1.1 is 29.999...)
    return int(min(counts) + 1e-6) if counts else 1 << 30
