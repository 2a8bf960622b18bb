"""Real faults against `segnext train`, each run for real through the command line.

    .venv/bin/python bench/faults.py [--out runs/faults]

Scenarios (tiny synthetic shards, SegNeXt-T, 2 CPU workers, 12 iterations, checkpoint every 4):

1. worker-sigkill: SIGKILL one Ray Train worker at iteration 6 (a checkpoint at 4); Ray Train
   restarts the worker group from the latest registered checkpoint (train.max_failures=1) and
   the run must finish at iteration 12.
2. driver-sigkill: SIGKILL the `segnext train` process at iteration 6, then
   `segnext train --resume NAME`: the same run (and MLflow run) must finish at 12.
3. shard-corrupt: a train shard is damaged on disk after the first checkpoint (between
   epochs): with on_error=raise the run must stop naming the shard; with on_error=skip it must
   finish and count the skipped samples.
After each: the processes of the run's private Ray cluster (found by its GCS port) must be gone.
Prints one table row per scenario (for BENCHMARKS.md) and writes them to OUT/faults.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEGNEXT = Path(sys.executable).with_name("segnext")
ITERATIONS, CHECKPOINT_EVERY = 12, 4
CONFIG = """
model: {{variant: tiny, classifier: standard, drop_path_rate: 0.0}}
data: {{root: {shards}, crop_size: [64, 64], ratio_range: [0.75, 1.25], read_cpus: 0.25,
        on_error: {on_error}}}
optim: {{lr: 2.0e-3}}
schedule: {{iterations: {iterations}, warmup_iters: 1}}
train: {{global_batch_size: 8, log_every: 2, val_every: {every}, checkpoint_every: {every},
         keep_best: 2, max_failures: {max_failures}}}
eval: {{batch_size: 8}}
ray: {{num_workers: 2, cpus_per_worker: 0.5, address: local}}
mlflow: {{tracking_uri: "sqlite:///{store}", experiment: faults}}
registry: {{register: false}}
run: {{storage_path: {storage}}}
"""


def write_config(out: Path, name: str, *, shards: Path, on_error: str = "raise",
                 max_failures: int = 0) -> Path:
    path = out / f"{name}.yaml"
    path.write_text(CONFIG.format(shards=shards, on_error=on_error, iterations=ITERATIONS,
                                  every=CHECKPOINT_EVERY, max_failures=max_failures,
                                  store=out / "mlflow.db", storage=out / "ray"))
    return path


def start(args: list[str], log: Path) -> subprocess.Popen:
    handle = open(log, "w")  # noqa: SIM115 - closed when the process ends (see finish)
    return subprocess.Popen([str(SEGNEXT), *args], stdout=handle, stderr=subprocess.STDOUT,
                            cwd=REPO, start_new_session=True)


def finish(process: subprocess.Popen, timeout: float = 600) -> int:
    try:
        return process.wait(timeout=timeout)
    finally:
        process.stdout and process.stdout.close()


def wait_for(predicate, timeout: float = 300, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.5)


def gcs_port(log: Path) -> str | None:
    found = re.search(r"private Ray cluster at [\d.]+:(\d+)", log.read_text(errors="replace"))
    return found.group(1) if found else None


def cluster_processes(port: str) -> list[tuple[int, str]]:
    """(pid, title) of live processes of the cluster: its GCS port in the command line (gcs,
    raylet, dashboard) or in RAY_ADDRESS (workers and actors, which pipelines.cluster pins;
    their command line is only a title such as `ray::RayTrainWorker`)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if "faults.py" in cmdline or "segnext train" in cmdline:
            continue
        pinned = any(v.startswith(b"RAY_ADDRESS=") and v.endswith(f":{port}".encode())
                     for v in environ)
        if pinned or f":{port}" in cmdline:
            found.append((int(entry.name), cmdline.strip()[:60]))
    return found


def leftovers(port: str | None, grace: float = 20) -> int:
    """Processes of the cluster still alive `grace` seconds after the run ended."""
    if port is None:
        return -1
    deadline = time.monotonic() + grace
    while cluster_processes(port) and time.monotonic() < deadline:
        time.sleep(1)
    return len(cluster_processes(port))


def worker_pids(port: str) -> list[int]:
    return [pid for pid, title in cluster_processes(port) if "RayTrainWorker" in title]


def past_iteration(log: Path, iteration: int) -> bool:
    return f"[segnext] it {iteration}/" in log.read_text(errors="replace")


def restored_at(log: Path) -> int | None:
    """The iteration the last restart restored (None: no restore happened)."""
    found = re.findall(r"restored checkpoint of iteration (\d+)", log.read_text(errors="replace"))
    return int(found[-1]) if found else None


def summary_iteration(log: Path) -> int | None:
    found = re.findall(r"finished at iteration (\d+)", log.read_text(errors="replace"))
    return int(found[-1]) if found else None


def loss_steps(out: Path, run_name: str) -> tuple[int, list[int]]:
    """(number of MLflow runs with this Ray run name, sorted train/loss steps of the first)."""
    from mlflow.tracking import MlflowClient

    from pipelines.tracking.runs import RUN_NAME_TAG

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("faults")
    runs = client.search_runs([experiment.experiment_id],
                              f"tags.`{RUN_NAME_TAG}` = '{run_name}'")
    if not runs:
        return 0, []
    history = client.get_metric_history(runs[0].info.run_id, "train/loss")
    return len(runs), sorted({m.step for m in history})


def first_checkpoint(out: Path, name: str) -> Path:
    return out / "ray" / name / f"checkpoint_{CHECKPOINT_EVERY:07d}" / "checkpoint.pt"


def scenario_worker_sigkill(out: Path, shards: Path) -> dict:
    name = "worker-sigkill"
    log = out / f"{name}.log"
    config = write_config(out, name, shards=shards, max_failures=1)
    process = start(["train", "--config", str(config), f"run.name={name}"], log)
    wait_for(lambda: past_iteration(log, 6), what="iteration 6")
    port = gcs_port(log)
    victims = worker_pids(port) if port else []
    if victims:
        os.kill(victims[0], signal.SIGKILL)
    code = finish(process)
    runs, steps = loss_steps(out, name)
    return {"fault": "SIGKILL of a Ray Train worker at iteration 6 (checkpoint at 4)",
            "killed_pid": victims[0] if victims else None, "exit": code,
            "restored_at": restored_at(log), "final_iteration": summary_iteration(log),
            "mlflow_runs": runs, "loss_steps": steps, "leftover_processes": leftovers(port)}


def scenario_driver_sigkill(out: Path, shards: Path) -> dict:
    name = "driver-sigkill"
    log = out / f"{name}.log"
    config = write_config(out, name, shards=shards)
    process = start(["train", "--config", str(config), f"run.name={name}"], log)
    wait_for(lambda: past_iteration(log, 6), what="iteration 6")
    port = gcs_port(log)
    os.kill(process.pid, signal.SIGKILL)
    finish(process)
    left_after_kill = leftovers(port, grace=30)
    resumed_log = out / f"{name}-resume.log"
    resumed = start(["train", "--config", str(config), "--resume", name], resumed_log)
    code = finish(resumed)
    runs, steps = loss_steps(out, name)
    return {"fault": "SIGKILL of the driver at iteration 6 (checkpoint at 4), then --resume",
            "leftover_after_kill": left_after_kill, "exit": code,
            "restored_at": restored_at(resumed_log),
            "final_iteration": summary_iteration(resumed_log), "mlflow_runs": runs,
            "loss_steps": steps, "leftover_processes": leftovers(gcs_port(resumed_log))}


def corrupt_shard(shards: Path) -> str:
    """Damage the first image of the first train shard in place (same size)."""
    import tarfile

    from data.manifest import load_manifest

    shard = load_manifest(shards).shard_urls("train")[0]
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if ".image." in m.name)
    with open(shard, "r+b") as handle:
        handle.seek(member.offset_data)
        handle.write(b"\0" * 64)
    return shard


def scenario_shard_corrupt(out: Path, clean: Path, on_error: str) -> dict:
    import shutil

    name = f"shard-corrupt-{on_error}"
    shards = out / f"shards-{on_error}"
    shutil.rmtree(shards, ignore_errors=True)
    shutil.copytree(clean, shards)
    log = out / f"{name}.log"
    config = write_config(out, name, shards=shards, on_error=on_error)
    process = start(["train", "--config", str(config), f"run.name={name}"], log)
    wait_for(lambda: first_checkpoint(out, name).exists(), what="the first checkpoint")
    shard = corrupt_shard(shards)
    code = finish(process)
    text = log.read_text(errors="replace")
    skipped = re.findall(r"skipped samples  (.*)", text)
    errors = [line for line in text.splitlines() if line.startswith("segnext train: ")]
    return {"fault": f"train shard damaged on disk after iteration 4 (on_error={on_error})",
            "exit": code, "final_iteration": summary_iteration(log),
            "error_line": errors[-1][:200] if errors else None,
            "error_names_shard": any(shard in line for line in errors),
            "skipped": skipped[-1] if skipped else None,
            "leftover_processes": leftovers(gcs_port(log))}


SCENARIOS = {
    "worker-sigkill": scenario_worker_sigkill,
    "driver-sigkill": scenario_driver_sigkill,
    "shard-raise": lambda out, shards: scenario_shard_corrupt(out, shards, "raise"),
    "shard-skip": lambda out, shards: scenario_shard_corrupt(out, shards, "skip"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "runs" / "faults"))
    parser.add_argument("--only", nargs="+", choices=SCENARIOS, default=list(SCENARIOS),
                        help="run only these scenarios")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    if out.exists():
        raise SystemExit(f"{out} exists; pass another --out or remove it")
    out.mkdir(parents=True)
    from data.shard_writer import write_shards
    from data.sources import Synthetic

    # 32 train images = 4 iterations per epoch: the damage lands between epochs.
    write_shards(Synthetic(num_train=32, num_val=8, size=(64, 64)), out / "shards", shard_size=8)
    results = []
    for name in args.only:
        started = time.monotonic()
        result = SCENARIOS[name](out, out / "shards")
        result["wall_s"] = round(time.monotonic() - started, 1)
        print(json.dumps(result), flush=True)
        results.append(result)
    (out / "faults.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
