"""Elastic training on a local two-node Ray cluster: shrink when a node goes, then add it back.

`tests/pipelines/test_multinode.py` checks the shrink in `make test`; this script also adds the
node back once the shrunk run has registered a checkpoint, to see whether Ray Train V2's resize
check (`ray.resize_interval_s`) grows the run to two workers again. It prints the worker-group
timeline from Ray Train's own log and the global batch the run trained with at every step
(`train/images_per_step`). Measured results: BENCHMARKS.md, "Elastic runs".

    .venv/bin/python bench/elastic.py                      # ~5 min on 2 quiet cores
    .venv/bin/python bench/elastic.py --iterations 80 --resize-interval 5
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIG = """
model: {{variant: tiny, classifier: standard, drop_path_rate: 0.0}}
data: {{root: {root}/shards, crop_size: [64, 64], ratio_range: [0.75, 1.25], read_cpus: 0.25}}
optim: {{lr: 2.0e-3}}
schedule: {{iterations: {iterations}, warmup_iters: 1}}
train: {{global_batch_size: 8, per_worker_batch_size: 2, log_every: 1, val_every: 2,
        checkpoint_every: 2, keep_best: 1, max_failures: 4}}
eval: {{batch_size: 8}}
ray: {{num_workers: 2, min_workers: 1, cpus_per_worker: 0.5, resize_interval_s: {interval},
      resources_per_worker: {{segnext_node: 1}}, address: {address}}}
mlflow: {{tracking_uri: "sqlite:///{root}/mlflow.db", experiment: elastic}}
registry: {{register: false}}
run: {{storage_path: {root}/ray, name: elastic}}
"""


def latest_checkpoint(run_dir: Path) -> int:
    """Iteration of the latest checkpoint Ray Train has registered (-1: none yet)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return -1
    name = (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name") or ""
    return int(name.rsplit("_", 1)[1]) if name else -1


def chaos(cluster, node, run_dir: Path, events: list, running) -> None:
    """Remove `node` after the first registered checkpoint, add one back after the next
    (gives up when the run ends first: `running()` turns false)."""
    while latest_checkpoint(run_dir) < 0:
        if not running():
            return
        time.sleep(0.2)
    removed_at = latest_checkpoint(run_dir)
    cluster.remove_node(node)
    events.append((time.time(), f"removed a node after checkpoint {removed_at}"))
    while latest_checkpoint(run_dir) <= removed_at:
        if not running():
            return
        time.sleep(0.2)
    cluster.add_node(num_cpus=1, resources={"segnext_node": 1})
    events.append((time.time(), f"added a node back after checkpoint {latest_checkpoint(run_dir)}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--resize-interval", type=float, default=5.0)
    args = parser.parse_args()

    import ray
    from mlflow.tracking import MlflowClient
    from ray.cluster_utils import Cluster

    from data.shard_writer import write_shards
    from data.sources import Synthetic
    from pipelines.config import load_config
    from pipelines.train.driver import train

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {"segnext_node": 1}, "include_dashboard": False})
    second = cluster.add_node(num_cpus=1, resources={"segnext_node": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    events: list = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-elastic-") as folder:
            root = Path(folder)
            write_shards(Synthetic(num_train=32, num_val=4, size=(64, 64)), root / "shards")
            (root / "exp.yaml").write_text(CONFIG.format(
                root=root, iterations=args.iterations, interval=args.resize_interval,
                address=cluster.address))
            # Ray starts a node only from the main thread (it installs signal handlers), so the
            # run goes to a thread and the main thread removes and adds nodes.
            outcome: dict = {}
            runner = threading.Thread(daemon=True, target=lambda: outcome.update(
                result=train(load_config(root / "exp.yaml"))))
            started = time.time()
            runner.start()
            chaos(cluster, second, root / "ray" / "elastic", events, runner.is_alive)
            runner.join()
            if "result" not in outcome:
                raise SystemExit("the elastic run failed: see its output above")
            result = outcome["result"]
            wall = time.time() - started
            client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
            per_step = {m.step: m.value for m in
                        client.get_metric_history(result.run_id, "train/images_per_step")}
            timeline = worker_groups(Path(ray._private.worker._global_node.get_session_dir_path()))
    finally:
        ray.shutdown()
        cluster.shutdown()
    for moment, what in events:
        print(f"+{moment - started:6.1f} s  {what}")
    for moment, line in timeline:
        print(f"{moment}  {line}")
    print(f"finished at iteration {result.iteration} of {args.iterations} with "
          f"{result.world_size} worker(s), last attempt started at {result.start_iteration}, "
          f"{wall:.0f} s; images per step: {sorted(set(per_step.values()))} over "
          f"{len(per_step)} steps")


def worker_groups(session: Path) -> list[tuple[str, str]]:
    """(time, "Started training worker group of size N") lines from Ray Train's log."""
    out = []
    for path in sorted((session / "logs" / "train").rglob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            message = str(record.get("message", ""))
            if message.startswith(("Started training worker group", "Detected changes",
                                   "Detected ready")) or "RETRY" in message:
                out.append((record.get("asctime", "")[11:19], message.splitlines()[0]))
    return sorted(out)


if __name__ == "__main__":
    main()
