"""Fan work out to a pool of Ray actors, each holding one model replica (evaluation, teacher cache)."""

from __future__ import annotations

from typing import Any, Iterator


def map_on_actors(cls: type, init_args: tuple, method: str, items: list, actors: int, cpus: float = 1.0,
                  gpus: float | None = None) -> Iterator[Any]:
    """Yield `cls(*init_args).<method>(item)` for every item, in completion order, from
    min(actors, len(items)) Ray actors of `cpus` CPUs and `gpus` GPUs each (None: one GPU when the
    cluster has any). Joins RAY_ADDRESS's cluster or starts a local Ray; kills the actors afterwards."""
    import ray
    from ray.util import ActorPool

    from vaemo.config import project_root
    from vaemo.train.launch import connect_ray, forwarded_env

    connect_ray()
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **forwarded_env(),
           "PYTHONPATH": str(project_root())}
    remote = ray.remote(num_cpus=cpus, num_gpus=gpus, runtime_env={"env_vars": env})(cls)
    handles = [remote.remote(*init_args) for _ in range(min(actors, len(items)))]
    try:
        yield from ActorPool(handles).map_unordered(lambda actor, item: getattr(actor, method).remote(item), items)
    finally:
        for handle in handles:
            ray.kill(handle)
