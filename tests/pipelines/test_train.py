"""`segnext train` end to end on tiny synthetic shards: 2 CPU workers, MLflow in a temp store."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pipelines.checkpoint_io import load_checkpoint
from pipelines.cli import main
from pipelines.config import ConfigError, load_config
from pipelines.train import driver as train_module
from pipelines.train.cli import summary
from pipelines.train.resolve import resolve


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, tiny_shards: Path, experiment_yaml) -> Path:
    """exp.yaml (the tiny experiment of tests/conftest.py on `tiny_shards`), an MLflow store
    and a Ray storage folder."""
    root = tmp_path_factory.mktemp("train")
    experiment_yaml(root, tiny_shards)
    return root


class _Version:
    version = "1"


@pytest.fixture
def no_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything gets as far as starting Ray or building the trainer."""

    def forbidden(*args, **kwargs):
        raise AssertionError("Ray was started although the configuration is invalid")

    monkeypatch.setattr("ray.init", forbidden)
    monkeypatch.setattr(train_module, "_fit", forbidden)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.nope=1", "unknown config key train.nope"),
        ("schedule.iterations=many", "schedule.iterations = 'many' has type str, expected int"),
        ("data.root=/does/not/exist", "data.root /does/not/exist does not exist"),
        ("model.num_classes=3", "remove model.num_classes"),
        ("data.val_split=test", "data.val_split = 'test' is not in"),
        ("model.nmf={bogus: 1}", "model options rejected by create_model"),
        ("optim.lr=.inf", "optim.lr = inf is not a finite number"),
        ("loss.weights.variance=.nan", "loss.weights.variance = nan is not a finite number"),
        ("data.val_size=[8, 8]", "data.val_size is gone"),
        ("data.train_split=[train, nope]", "data.train_split = ['train', 'nope'] is not in"),
        ("data.train_split=[train, train]", "repeats a split"),
        ("loss.class_frequencies=[0.5, 0.5]", "loss.class_frequencies lists 2 values for"),
        ("optim.betas=[1.5, -2]", "optim.betas must be [beta1, beta2], each in [0, 1)"),
        ("schedule.power=-1", "schedule.power must be > 0"),
        ("data.cat_max_ratio=-3", "data.cat_max_ratio must be in (0, 1]"),
        ("loss.weights.general=-1", "loss.weights.general = -1"),
        ("model.classifier_kwargs={top_k: 100}", "top_k = 100 must be a whole number in 1..7"),
        ("data.cache_bytes=-1", "data.cache_bytes must be a whole number of bytes >= 0"),
    ],
)
def test_bad_config_fails_before_workers(
    workdir: Path, no_workers: None, capsys: pytest.CaptureFixture, override: str, needle: str
) -> None:
    code = main(["train", "--config", str(workdir / "exp.yaml"), override])
    assert code == 2
    assert needle in capsys.readouterr().err


def test_an_unusable_registry_name_fails_before_workers(
    workdir: Path, no_workers: None, capsys: pytest.CaptureFixture
) -> None:
    overrides = ["registry.register=true", "registry.name=bad/name:x"]
    assert main(["train", "--config", str(workdir / "exp.yaml"), *overrides]) == 2
    assert "registry.name = 'bad/name:x' is not a model registry name" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "needle"),
    [
        (["predict", "--model", "m.pt", "--input", "x.png", "--out", "o", "--batch-size", "-1"],
         "--batch-size: -1 must be >= 1"),
        (["export", "--model", "m.pt", "--out", "m.onnx", "--min-agreement", "1.01"],
         "--min-agreement: 1.01 must be in [0, 1]"),
        (["export", "--model", "m.pt", "--out", "m.onnx", "--opset", "5"],
         "--opset: 5 is outside 7.."),
        (["export", "--model", "m.pt", "--out", "m.onnx", "--height", "0", "--width", "8"],
         "--height: 0 must be >= 1"),
        (["predict", "--model", "m.pt", "--input", "x.png", "--out", "o", "--alpha", "1.5"],
         "--alpha: 1.5 must be in [0, 1]"),
        (["predict", "--model", "m.pt", "--input", "x.png", "--out", "o", "--threads", "0"],
         "--threads: 0 must be >= 1"),
        (["eval", "--model", "m.pt", "--data", "d", "--batch-size", "0"],
         "--batch-size: 0 must be >= 1"),
        (["eval", "--model", "m.pt", "--data", "d", "--crop", "512", "-1"],
         "--crop: -1 must be >= 1"),
        (["eval", "--model", "m.pt", "--data", "d", "--stride", "0", "8"],
         "--stride: 0 must be >= 1"),
        (["eval", "--model", "m.pt", "--data", "d", "--workers", "0"],
         "--workers: 0 must be >= 1"),
        (["register", "--run", "r", "--name", "bad/name:x"],
         "--name: 'bad/name:x' is not a model registry name"),
    ],
)
def test_command_options_out_of_range_stop_at_once(
    command: list[str], needle: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as stopped:  # argparse's exit, before any work
        main(command)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and len(err) < 2000


def test_a_refused_ray_address_leaves_no_running_mlflow_run(
    workdir: Path, capsys: pytest.CaptureFixture
) -> None:
    from mlflow import MlflowClient

    from pipelines.tracking.runs import RUN_NAME_TAG

    code = main(["train", "--config", str(workdir / "exp.yaml"), "ray.address=127.0.0.1:1",
                 "run.name=refused"])
    assert code != 0 and "127.0.0.1:1" in capsys.readouterr().err
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("test")
    runs = client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.`{RUN_NAME_TAG}` = 'refused'")
    assert runs and [run.info.status for run in runs] == ["FAILED"]
    assert "127.0.0.1:1" in runs[0].data.tags.get("mlflow.note.content", "")
    assert not (workdir / "ray" / "refused").exists()  # never started: the name is free again


def test_class_balance_reads_the_training_split_pixel_shares(
    workdir: Path, tiny_shards: Path
) -> None:
    from data.manifest import load_manifest

    counts = load_manifest(tiny_shards).class_pixel_counts["train"]
    prepared = resolve(load_config(workdir / "exp.yaml"))
    shares = prepared.cfg.loss.class_frequencies
    assert shares == pytest.approx([n / sum(counts) for n in counts])
    assert prepared.cfg.loss.class_balance_for("integrated") == 0.5  # the heads' default
    assert prepared.cfg.loss.class_balance_for("standard") == 0.5  # issue 27: +2.8 mIoU


def test_the_integrated_head_predicts_with_its_general_classifier_by_default(
    workdir: Path, tiny_shards: Path
) -> None:
    """The CamVid study's rule (issue 27) is the config's default, written into the meta that
    eval, export and serving rebuild the model from; a rule the config gives wins."""
    from pipelines.train.loop import build_model

    chosen = resolve(load_config(workdir / "exp.yaml", ["model.classifier=integrated"]))
    assert chosen.meta.classifier_kwargs.to_dict()["decision"] == "general"
    assert build_model(chosen.cfg, 3).decode_head.classifier.decision == "general"
    given = resolve(load_config(workdir / "exp.yaml", [
        "model.classifier=integrated", "model.classifier_kwargs.decision=product"]))
    assert given.meta.classifier_kwargs.to_dict()["decision"] == "product"
    standard = resolve(load_config(workdir / "exp.yaml", ["model.classifier=standard"]))
    assert "decision" not in standard.meta.classifier_kwargs.to_dict()


def test_class_balance_without_pixel_counts_fails_before_workers(
    workdir: Path, tiny_shards: Path, no_workers: None, tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    import json
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    manifest = json.loads((shards / "dataset.json").read_text())
    manifest["class_pixel_counts"] = {}
    (shards / "dataset.json").write_text(json.dumps(manifest))
    code = main(["train", "--config", str(workdir / "exp.yaml"), f"data.root={shards}"])
    assert code == 2
    assert "needs class pixel counts" in capsys.readouterr().err
    unweighted = load_config(workdir / "exp.yaml", [f"data.root={shards}", "loss.class_balance=0"])
    assert resolve(unweighted).cfg.loss.class_frequencies is None


def test_missing_shard_fails_before_workers(
    workdir: Path, tiny_shards: Path, no_workers: None, tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    import shutil

    from data.manifest import load_manifest

    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    gone = Path(load_manifest(shards).shard_urls("val")[0])
    gone.unlink()
    code = main(["train", "--config", str(workdir / "exp.yaml"), f"data.root={shards}"])
    assert code == 2
    assert f"{gone}: shard missing" in capsys.readouterr().err


def test_elastic_range_that_cannot_split_a_step_fails_before_workers(
    workdir: Path, no_workers: None, capsys: pytest.CaptureFixture
) -> None:
    overrides = ["train.per_worker_batch_size=2", "ray.num_workers=4", "ray.min_workers=3"]
    code = main(["train", "--config", str(workdir / "exp.yaml"), *overrides])
    assert code == 2
    assert "3 workers cannot share 4 micro-batches of 2" in capsys.readouterr().err
    code = main(["train", "--config", str(workdir / "exp.yaml"), "ray.min_workers=3"])
    assert code == 2
    assert "ray.min_workers must be between 1 and ray.num_workers (2)" in capsys.readouterr().err


def test_resume_needs_an_existing_run(workdir: Path, no_workers: None) -> None:
    with pytest.raises(ConfigError, match="--resume nosuchrun: no run folder"):
        train_module.train(load_config(workdir / "exp.yaml"), resume="nosuchrun")


@pytest.mark.parametrize("name", ["../../escape", "a/b", ".hidden", "x..y"])
def test_a_run_name_stays_inside_the_storage_path(workdir: Path, no_workers: None, name: str,
                                                  capsys: pytest.CaptureFixture) -> None:
    code = main(["train", "--config", str(workdir / "exp.yaml"), f"run.name={name!r}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "must be one folder name under run.storage_path" in err
    assert not (workdir / "escape").exists() and not (workdir.parent / "escape").exists()


def _claim(config: str, name: str, start: object, results: object) -> None:
    """Resolve a new run named `name` once `start` is set; put "ok" or the error in results."""
    start.wait()
    try:
        resolve(load_config(config, [f"run.name={name}"]), exists_already=False)
        results.put("ok")
    except ConfigError as error:
        results.put(str(error))


def test_two_racing_runs_with_one_name_one_starts(workdir: Path, no_workers: None) -> None:
    """Two processes resolve a new run of one name at the same moment: exactly one claims it,
    the other is refused before Ray, naming the first; a later run of that name is refused."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    start, results = context.Event(), context.Queue()
    racers = [context.Process(target=_claim, args=(str(workdir / "exp.yaml"), "raced", start,
                                                   results)) for _ in range(2)]
    for racer in racers:
        racer.start()
    time.sleep(5)  # both imported and waiting
    start.set()
    outcomes = [results.get(timeout=120) for _ in racers]
    for racer in racers:
        racer.join(30)
    assert outcomes.count("ok") == 1, outcomes
    [refused] = [outcome for outcome in outcomes if outcome != "ok"]
    assert "run raced already exists" in refused  # "claimed just now", or its folder was there
    with pytest.raises(ConfigError, match="run raced already exists.*--resume raced"):
        resolve(load_config(workdir / "exp.yaml", ["run.name=raced"]), exists_already=False)


def test_a_name_taken_by_an_mlflow_run_is_refused(
    workdir: Path, no_workers: None, capsys: pytest.CaptureFixture
) -> None:
    """A name whose run folder is gone (another storage path, cleaned up) but whose MLflow run
    exists is taken too: a second run would log into the first one's MLflow run."""
    from mlflow import MlflowClient

    from pipelines.tracking.runs import RUN_NAME_TAG, ensure_experiment

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    taken = MlflowClient(uri).create_run(ensure_experiment(uri, "test"),
                                         tags={RUN_NAME_TAG: "logged-elsewhere"})
    code = main(["train", "--config", str(workdir / "exp.yaml"), "run.name=logged-elsewhere"])
    assert code == 2
    assert (f"run logged-elsewhere already has MLflow run {taken.info.run_id} in experiment "
            "'test'") in capsys.readouterr().err
    assert not (workdir / "ray" / "logged-elsewhere").exists()  # nothing claimed


@pytest.mark.parametrize("fused", [False, True])
def test_fused_msca_switch_keeps_checkpoint_keys(workdir: Path, fused: bool) -> None:
    """train.fused_msca swaps MSCA for FusedMSCA without changing the state_dict layout."""
    from pipelines.train.loop import build_model
    from segnext.fast import FusedMSCA

    cfg = load_config(workdir / "exp.yaml", [f"train.fused_msca={str(fused).lower()}"])
    model = build_model(cfg, num_classes=7)
    reference = build_model(load_config(workdir / "exp.yaml"), num_classes=7)
    assert any(isinstance(m, FusedMSCA) for m in model.modules()) is fused
    assert list(model.state_dict()) == list(reference.state_dict())


def _corrupt_first_planned_image(root: Path, splits: list[str], global_batch: int) -> None:
    """Overwrite the image bytes of the first sample the batch plan trains on (seed 0), so the
    run is sure to read it (a plan leaves an epoch's remainder out)."""
    from data.manifest import load_manifest
    from data.plan import BatchPlan
    from data.sample_index import build_sample_index

    index, _ = build_sample_index(load_manifest(root), splits)
    first = BatchPlan(len(index), global_batch, global_batch, seed=0).epoch_order(0)[0]
    row = index.rows([first])
    with open(row["shard"][0], "r+b") as handle:
        handle.seek(int(row["image_at"][0]))
        handle.write(b"\0" * 64)


def _corrupt_first_image(root: Path, split: str = "train") -> None:
    """Overwrite the first image's bytes of `split` in place (same size: only decoding can tell)."""
    import tarfile

    from data.manifest import load_manifest

    shard = load_manifest(root).shard_urls(split)[0]
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if ".image." in m.name)
    with open(shard, "r+b") as handle:
        handle.seek(member.offset_data)
        handle.write(b"\0" * 64)


@pytest.mark.slow
def test_validation_scores_as_eval_and_skips_are_tracked(
    workdir: Path, tiny_shards: Path, ray_session: None
) -> None:
    """Several training splits, a test resize (data.scale), a corrupt train sample skipped: the
    val mIoU of the last checkpoint equals what `segnext eval` computes on it, and the skip
    shows in MLflow and the summary."""
    import shutil

    from mlflow.tracking import MlflowClient

    from pipelines.commands.evaluate import evaluate

    shards = workdir / "broken-shards"
    shutil.copytree(tiny_shards, shards)
    _corrupt_first_planned_image(shards, ["train", "val"], global_batch=8)
    cfg = load_config(workdir / "exp.yaml", [
        f"data.root={shards}", "data.train_split=[train, val]", "data.scale=[48, 40]",
        "data.on_error=skip", "schedule.iterations=4", "run.name=skips",
    ])
    result = train_module.train(cfg)
    assert result.iteration == 4
    latest = load_checkpoint(workdir / "ray" / "skips" / "checkpoint_0000004")
    # the epoch follows both splits' counts: 38 samples hold 4 global batches of 8, so after 4
    # steps the next step opens epoch 1
    assert latest["epoch"] == 4 // ((32 + 6) // 8) == 1
    assert latest["data_position"]["num_samples"] == 38

    scored = evaluate(str(workdir / "ray" / "skips" / "checkpoint_0000004"), str(shards),
                      split="val", distributed="off", progress=False)
    assert scored.settings["scale"] == (48, 40)
    assert abs(latest["metrics"]["val/mIoU"] - scored.scores["mIoU"]) < 1e-6
    assert abs(result.metrics["val/aAcc"] - scored.scores["aAcc"]) < 1e-6

    assert result.skipped["train+val"] >= 1 and result.skipped["val"] == 0
    assert "skipped samples  train+val" in summary(result)
    run = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}").get_run(result.run_id)
    assert run.data.metrics["data/skipped/train_val"] == result.skipped["train+val"]
    assert run.data.tags["data.skipped.train_val"] == str(result.skipped["train+val"])
    # the splits it read are the run's MLflow datasets (val both trained and validated on)
    import json

    from data.manifest import load_manifest
    from pipelines.tracking.datasets import ROOT_TAG, split_digest

    manifest = load_manifest(shards)
    inputs = {item.dataset.name: item for item in run.inputs.dataset_inputs}
    contexts = {name: {tag.key: tag.value for tag in item.tags}["mlflow.data.context"]
                for name, item in inputs.items()}
    assert contexts == {f"{manifest.name}/train": "training",
                        f"{manifest.name}/val": "training,validation"}
    for split in ("train", "val"):
        dataset = inputs[f"{manifest.name}/{split}"].dataset
        assert dataset.digest == split_digest(manifest.split(split)["shards"])
        # MLflow keeps the source of the first run that logged this (name, digest): the copy's
        # bytes match the fixture's manifest, so the root this run read is the input's tag
        tags = {tag.key: tag.value for tag in inputs[f"{manifest.name}/{split}"].tags}
        assert tags[ROOT_TAG] == shards.resolve().as_uri()
        assert json.loads(dataset.source)["uri"].startswith("file:///")


@pytest.mark.slow
def test_a_second_cluster_mid_run_does_not_disturb_the_run(
    workdir: Path, ray_session: None
) -> None:
    """`ray start --head` by someone else while a run trains on its own cluster: before the
    address pin, Ray Train's placement-group cleaner resolved `auto` to the newer cluster,
    decided the controller was dead and killed the workers (a restart). Now: no restart."""
    import os
    import subprocess
    import sys
    import threading

    from ray._common.utils import get_ray_address_file

    from pipelines.cluster import _free_port

    run_dir = workdir / "ray" / "second-cluster"
    address_file = Path(get_ray_address_file(None))
    saved = address_file.read_text() if address_file.exists() else None
    ray_cli = Path(sys.executable).with_name("ray")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    head: list[subprocess.Popen] = []

    def start_second_cluster_after_first_checkpoint() -> None:
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoint_0000002").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        head.append(subprocess.Popen(
            [str(ray_cli), "start", "--head", "--block", f"--port={_free_port()}",
             f"--dashboard-port={_free_port()}", "--num-cpus=1", "--disable-usage-stats"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))

    thread = threading.Thread(target=start_second_cluster_after_first_checkpoint, daemon=True)
    thread.start()
    try:
        cfg = load_config(workdir / "exp.yaml",
                          ["schedule.iterations=10", "run.name=second-cluster"])
        result = train_module.train(cfg)
    finally:
        thread.join(timeout=130)
        for process in head:
            process.terminate()
            process.wait(timeout=60)
        if saved is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_text(saved)
    assert head, "the second cluster never started"
    assert result.iteration == 10 and result.start_iteration == 0  # no restart


@pytest.mark.slow
def test_unreadable_validation_data_ends_the_run_without_retries(
    workdir: Path, tiny_shards: Path, ray_session: None
) -> None:
    """A val sample that cannot be read (on_error: raise) is a data problem a restart would
    only repeat: the run ends at the first validation with the shard and key named, even with
    restarts allowed, and its MLflow run is marked FAILED."""
    import shutil

    from mlflow.tracking import MlflowClient

    shards = workdir / "bad-val-shards"
    shutil.copytree(tiny_shards, shards)
    _corrupt_first_image(shards, "val")
    cfg = load_config(workdir / "exp.yaml", [
        f"data.root={shards}", "train.max_failures=2", "run.name=bad-val",
    ])
    with pytest.raises(ConfigError, match="validation at iteration 2 failed: .*cannot decode"):
        train_module.train(cfg)
    from pipelines.tracking.runs import find_run

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    run_id = find_run(client, client.get_experiment_by_name("test").experiment_id, "bad-val")
    assert client.get_run(run_id).info.status == "FAILED"


def test_demo_on_the_users_data_writes_no_synthetic_shards(
    workdir: Path, tiny_shards: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture
) -> None:
    """`segnext demo data.root=X` trains on X: the synthetic set is not written, and the last
    line names X."""
    from pipelines.commands import demo

    def no_synthetic(out):
        raise AssertionError(f"wrote the synthetic shards to {out}")

    trained = []

    def fake_train(cfg, **kwargs):
        trained.append(cfg.data.root)
        return train_module.TrainResult(run_name="r", run_id="id", path="p", best_checkpoint=None,
                                        best_val_miou=0.5, data_root=cfg.data.root)

    monkeypatch.setattr(demo, "ensure_shards", no_synthetic)
    monkeypatch.setattr("pipelines.cluster.init_ray", lambda *args, **kwargs: "local")
    monkeypatch.setattr(train_module, "train", fake_train)
    demo.run_demo([f"data.root={tiny_shards}", f"mlflow.tracking_uri=sqlite:///{workdir}/d.db"])
    assert trained == [str(tiny_shards)]
    assert f"on {tiny_shards} (val split)" in capsys.readouterr().out


@pytest.mark.parametrize(("override", "needle"), [
    ("ray.use_gpu=true", "'GPU': 1.0"),
    ("ray.cpus_per_worker=64", "'CPU': 64"),
])
def test_a_run_the_private_cluster_can_never_hold_is_refused(
    workdir: Path, ray_session: None, capsys: pytest.CaptureFixture, override: str, needle: str
) -> None:
    """Ray would wait forever for resources a private cluster cannot grow; refused instead."""
    started = time.perf_counter()
    code = main(["train", "--config", str(workdir / "exp.yaml"), override,
                 f"run.name=never-{override.split('=')[0].split('.')[1]}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "cannot run on the private Ray cluster" in err and needle in err
    assert time.perf_counter() - started < 60


def test_overrides_may_follow_resume_as_for_tune(
    workdir: Path, no_workers: None, capsys: pytest.CaptureFixture
) -> None:
    """`--resume NAME key=value` parses (argparse alone rejected the second group)."""
    code = main(["train", "--config", str(workdir / "exp.yaml"), "train.log_every=1",
                 "--resume", "nosuchrun", "schedule.iterations=8"])
    assert code == 2
    assert "--resume nosuchrun: no run folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--config", str(workdir / "exp.yaml"), "--resume", "x", "--bogus"])


def _started(workdir: Path, name: str) -> None:
    """A new run named `name` as `segnext train` starts it, up to Ray: its folder claimed and
    its config saved."""
    resolve(load_config(workdir / "exp.yaml", [f"run.name={name}"]), exists_already=False)


def test_a_resume_that_changes_the_loss_is_refused_naming_the_keys(
    workdir: Path, no_workers: None, capsys: pytest.CaptureFixture
) -> None:
    _started(workdir, "keeps-its-loss")
    code = main(["train", "--config", str(workdir / "exp.yaml"), "--resume", "keeps-its-loss",
                 "loss.class_balance=0.2", "optim.lr=1e-3", "schedule.iterations=8"])
    assert code == 2
    err = capsys.readouterr().err
    assert "loss.class_balance: saved 0.5, given 0.2" in err
    assert "optim.lr: saved 0.002, given 0.001" in err
    assert "schedule.iterations" not in err.split("A resume may change")[0]  # allowed


def test_a_resume_keeps_the_saved_value_of_a_changed_default(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's case: the integrated head's class_balance default changed after the run
    started; the resume trains with the value the run started with."""
    from pipelines import config_schema

    _started(workdir, "old-default")
    monkeypatch.setitem(config_schema.DEFAULT_CLASS_BALANCE, "integrated", 0.25)
    resumed = resolve(load_config(workdir / "exp.yaml"), run_name="old-default",
                      exists_already=True)
    assert resumed.cfg.loss.class_balance == 0.5 and resumed.resume_changes == {}


def test_a_resume_may_extend_the_run_and_the_mlflow_run_records_it(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from mlflow import MlflowClient

    from pipelines.train.resume import SAVED_CONFIG

    _started(workdir, "extended")
    trained = []

    def fit(run, callbacks, record):  # stands in for Ray Train: what would it train?
        trained.append((run.cfg, record.run_id))
        raise RuntimeError("stop before Ray")

    monkeypatch.setattr(train_module, "init_ray", lambda address: "nowhere")
    monkeypatch.setattr(train_module, "check_fits", lambda *args, **kwargs: None)
    monkeypatch.setattr(train_module, "_fit", fit)
    code = main(["train", "--config", str(workdir / "exp.yaml"), "--resume", "extended",
                 "schedule.iterations=8", "ray.num_workers=1"])
    assert code == 1 and "stop before Ray" in capsys.readouterr().err
    [(cfg, run_id)] = trained
    assert (cfg.schedule.iterations, cfg.ray.num_workers) == (8, 1)
    assert cfg.train.per_worker_batch_size == 4  # the saved micro-batch: 2 accumulated steps
    tags = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}").get_run(run_id).data.tags
    assert tags["resume.changed"] == ("ray.num_workers: 2 -> 1; schedule.iterations: 6 -> 8")
    saved = load_config(workdir / "ray" / "extended" / SAVED_CONFIG)
    assert saved.schedule.iterations == 8  # the next resume compares with the new length


def test_a_run_saved_before_configs_were_resumes_with_the_command_line(
    workdir: Path, capsys: pytest.CaptureFixture
) -> None:
    from pipelines.train.resume import SAVED_CONFIG

    _started(workdir, "older")
    (workdir / "ray" / "older" / SAVED_CONFIG).unlink()
    resumed = resolve(load_config(workdir / "exp.yaml", ["optim.lr=1e-3"]), run_name="older",
                      exists_already=True)
    assert resumed.cfg.optim.lr == 1e-3
    assert "has no saved config" in capsys.readouterr().out
    assert (workdir / "ray" / "older" / SAVED_CONFIG).is_file()  # checked from now on


@pytest.mark.slow
def test_a_wait_for_workers_a_joined_cluster_lacks_is_announced_and_bounded(
    workdir: Path, joined_cluster: str, capsys: pytest.CaptureFixture
) -> None:
    import _thread
    import re
    import signal
    import threading

    from mlflow import MlflowClient

    from pipelines.tracking.runs import RUN_NAME_TAG

    # A SIGINT handler that swallows the interrupt, as the one `TorchTrainer.fit` leaves behind
    # (it aborts its own, finished run): the wait must end all the same. Should it reach this
    # handler, a second interrupt 20 s later ends the wait instead of hanging the test.
    calls: list[int] = []

    def swallowing(signum: int, frame: object) -> None:
        calls.append(signum)
        if len(calls) == 1:
            threading.Timer(20, _thread.interrupt_main).start()
        else:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, swallowing)
    try:
        code = main(["train", "--config", str(workdir / "exp.yaml"),
                     f"ray.address={joined_cluster}", "ray.resources_per_worker={segnext_missing: 1}",
                     "ray.start_timeout_s=8", "run.name=never-placed"])
    finally:
        signal.signal(signal.SIGINT, previous)
    out, err = capsys.readouterr()
    assert code == 2, err
    assert not calls, "the wait was ended through the process's own SIGINT handler"
    # the free CPUs are those the read-worker prestart's tasks leave at that moment
    assert re.search(
        r"\[segnext\] waiting for 2 worker\(s\) of \{CPU: 0.5, segnext_missing: 1\} \(the cluster "
        r"has \{CPU: [\d.]+, segnext_missing: 0\} free of \{CPU: 2, segnext_missing: 0\}\); gives "
        r"up after 8 s \(ray.start_timeout_s\)", out), out
    assert "ray.start_timeout_s: the Ray cluster did not place 2 worker(s)" in err
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("test")
    [run] = client.search_runs([experiment.experiment_id],
                               filter_string=f"tags.`{RUN_NAME_TAG}` = 'never-placed'")
    assert run.info.status == "FAILED"
