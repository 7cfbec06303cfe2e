"""The cluster checks that need no cluster: whether a worker group fits, node by node, as Ray's placement
strategies place it (the facts as `ray.nodes()` gives them), and a worker's check of its own node. The
driver's check of every node runs on a real second node in tests/test_train.py."""

from __future__ import annotations

import pytest

from vaemo.cluster import actors_to_ask, workers_that_fit
from vaemo.errors import UserError

GPU_WORKER = {"CPU": 8, "GPU": 1}
# a CPU-only head, an 8-GPU node with 32 CPUs (4 workers of 8 CPUs), a 2-GPU node with 64 CPUs
NODES = [{"CPU": 16}, {"CPU": 32, "GPU": 8}, {"CPU": 64, "GPU": 2}]


@pytest.mark.parametrize(
    "strategy,expected",
    [("PACK", 6), ("SPREAD", 6), ("STRICT_PACK", 4), ("STRICT_SPREAD", 2)],
)
def test_a_group_fits_node_by_node_not_by_the_clusters_totals(strategy, expected):
    # the totals (112 CPU, 10 GPU) would hold 10 such workers: the GPUs sit where the CPUs do not
    assert workers_that_fit(NODES, GPU_WORKER, strategy) == expected


def test_an_autoscaling_cluster_before_its_gpu_nodes_start_holds_no_gpu_worker():
    assert workers_that_fit([{"CPU": 4}], GPU_WORKER, "PACK") == 0
    assert workers_that_fit([], GPU_WORKER, "STRICT_PACK") == 0
    assert workers_that_fit([{"CPU": 4}, {"CPU": 2.5}], {"CPU": 1.0}, "PACK") == 6
    assert workers_that_fit([{"CPU": 33}], {"CPU": 1.1}, "PACK") == 30  # 33 / 1.1 is 29.999... in floats; Ray fits 30


def test_an_actor_pool_asks_for_what_the_nodes_hold_or_with_autoscaling_for_every_actor(capsys):
    # eval and teacher-cache pools of one GPU an actor, before and after the GPU nodes start
    assert actors_to_ask(8, NODES, 1.0, 1.0, autoscaling=False) == 8
    assert actors_to_ask(16, NODES, 1.0, 1.0, autoscaling=False) == 10
    assert "10 actor(s) instead of 16" in capsys.readouterr().out
    with pytest.raises(UserError, match="no node of this Ray cluster can hold one actor of 1 CPU and 1 GPU.*autoscaling"):
        actors_to_ask(8, [{"CPU": 4}], 1.0, 1.0, autoscaling=False)
    assert actors_to_ask(8, [{"CPU": 4}], 1.0, 1.0, autoscaling=True) == 8
    assert "hold 0 of 8 actor(s) of 1 CPU and 1 GPU each: the rest wait for the autoscaler" in capsys.readouterr().out
    assert actors_to_ask(3, [{"CPU": 4}], 1.0, 0.0, autoscaling=True) == 3  # enough now: no line
    assert "autoscaler" not in capsys.readouterr().out


def test_a_worker_on_a_node_that_cannot_see_the_run_folder_or_the_shards_stops_before_loading(tmp_path):
    """The driver reaches only the nodes up when it starts; a node an autoscaler adds later is checked by its
    worker: the run folder must hold the file the driver wrote for this launch, and the local shards must be there."""
    import json

    from vaemo.errors import UserError
    from vaemo.train.trainer import LAUNCH_FILE, check_this_node_sees

    shard = tmp_path / "train-000.tar"
    shard.write_bytes(b"")
    loop_config = {"launch_id": "abc", "shards": {"data.train_shards": [str(shard), "s3://bucket/x.tar"], "data.val_shards": []}}
    run_dir = tmp_path / "run"
    with pytest.raises(UserError, match=rf"^node \S+ cannot see --out '{run_dir}' \(the file the driver wrote"):
        check_this_node_sees(run_dir, loop_config, 0, 1, 2)  # a node-local folder: nothing the driver wrote
    (run_dir / "workers").mkdir(parents=True)
    (run_dir / "workers" / LAUNCH_FILE).write_text(json.dumps({"launch_id": "older"}))
    with pytest.raises(UserError, match="cannot see --out"):
        check_this_node_sees(run_dir, loop_config, 0, 1, 2)  # an earlier launch's file: not the folder this driver writes to
    (run_dir / "workers" / LAUNCH_FILE).write_text(json.dumps({"launch_id": "abc"}))
    check_this_node_sees(run_dir, loop_config, 0, 1, 2)
    shard.unlink()
    with pytest.raises(UserError, match=rf"cannot see data.train_shards '{shard}': every node must see the data"):
        check_this_node_sees(run_dir, loop_config, 0, 1, 2)
    # a rank looks for its own shards only: rank 1 of 2 reads the other one
    other = tmp_path / "train-001.tar"
    other.write_bytes(b"")
    loop_config["shards"]["data.train_shards"] = [str(shard), str(other)]
    check_this_node_sees(run_dir, loop_config, 1, 2, 1)
    with pytest.raises(UserError, match="train-000.tar"):
        check_this_node_sees(run_dir, loop_config, 0, 2, 1)
