"""Canaries: the Ray and MLflow internals this project leans on, one small test each.

pyproject.toml pins ray and mlflow to the versions these hooks were written against. After an
upgrade, a moved hook fails here, naming itself and the code that uses it, instead of as a
silent fallback (most are read with getattr or set as attributes, which never raise) or as an
ImportError deep inside a Ray worker.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from pathlib import Path

import pytest


def _hook(module: str, name: str, used_by: str):
    """`module.name`, or a failure saying which hook moved and where the code uses it."""
    try:
        found = importlib.import_module(module)
    except ImportError as error:
        pytest.fail(f"Ray/MLflow hook moved: module {module} is gone ({error}); used by {used_by}")
    if not hasattr(found, name):
        pytest.fail(f"Ray/MLflow hook moved: {module}.{name} is gone; used by {used_by}")
    return getattr(found, name)


def _params(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_installed_ray_and_mlflow_are_the_pinned_versions() -> None:
    """The hooks below were checked against the pins; an environment that drifted from them
    (a manual `pip install -U ray`) is not the one these canaries vouch for."""
    import tomllib
    from importlib.metadata import version

    from packaging.requirements import Requirement

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    pins = {r.name: r for r in map(Requirement, dependencies) if r.name in ("ray", "mlflow")}
    assert set(pins) == {"ray", "mlflow"}, f"{pyproject}: ray or mlflow is no longer listed"
    for name, requirement in pins.items():
        (spec,) = requirement.specifier  # one exact pin, ==X.Y.Z
        assert spec.operator == "==", f"{pyproject}: {requirement} is not an exact pin"
        assert version(name) == spec.version, (
            f"{name} {version(name)} is installed but {pyproject} pins {spec.version}: run "
            "`make install` (or re-check every canary here and move the pin)"
        )


# ---------------------------------------------------------------------------------- Ray


def test_ray_address_file_is_where_ray_start_writes_it() -> None:
    used_by = "pipelines/cluster.py::_named_cluster (which cluster `ray.address: null` joins)"
    get_ray_address_file = _hook("ray._common.utils", "get_ray_address_file", used_by)
    assert _params(get_ray_address_file) == ["temp_dir"], f"signature changed; used by {used_by}"
    path = Path(get_ray_address_file(None))
    assert path.name == "ray_current_cluster", f"address file renamed to {path}; used by {used_by}"
    assert Path(get_ray_address_file("/x/ray")) == Path("/x/ray/ray_current_cluster"), used_by


def test_cluster_yaml_validators_take_a_config() -> None:
    used_by = "tests/pipelines/test_cluster_yaml.py (the check `ray up cluster.yaml` runs)"
    for name in ("prepare_config", "validate_config"):
        function = _hook("ray.autoscaler._private.util", name, used_by)
        assert _params(function)[:1] == ["config"], f"{name} signature changed; used by {used_by}"


def test_data_context_attributes_the_stream_sets_exist() -> None:
    """Setting a field that no longer exists on a DataContext raises nothing: check the names."""
    from ray.data import DataContext, ExecutionOptions

    used_by = "data/stream.py (configure_data_context, TrainStream.dataset)"
    fields = {f.name for f in dataclasses.fields(DataContext)}
    for name in ("execution_options", "enable_progress_bars", "raise_original_map_exception"):
        assert name in fields, f"DataContext.{name} is gone; set by {used_by}"
    options = ExecutionOptions()
    for name in ("preserve_order", "resource_limits"):
        assert hasattr(options, name), f"ExecutionOptions.{name} is gone; set by {used_by}"


def test_from_blocks_keeps_blocks_and_starts_no_task() -> None:
    """`ray.data.from_blocks` (a developer API) builds the training stream: one block per
    micro-batch, metadata read in-process. If it changes, TrainStream.dataset must too."""
    import inspect

    import ray.data

    used_by = "data/stream.py (TrainStream.dataset)"
    assert hasattr(ray.data, "from_blocks"), f"ray.data.from_blocks is gone; used by {used_by}"
    assert list(inspect.signature(ray.data.from_blocks).parameters) == ["blocks"], used_by
    source = inspect.getsource(ray.data.from_blocks)
    assert ".remote(" not in source, f"from_blocks now starts Ray tasks; see {used_by}"
    assert "FromBlocks" in source, f"from_blocks no longer keeps the given blocks; see {used_by}"


def test_error_attributes_the_root_cause_is_read_from() -> None:
    """Read with getattr: a rename would silently report Ray's wrapper instead of the user's
    error."""
    from ray.exceptions import RayTaskError
    from ray.train import WorkerGroupError

    used_by = "pipelines/cli.py::root_cause and tune/run.py::_error_line"
    cause = ValueError("loss is nan")
    failed = WorkerGroupError("training failed", {0: cause})
    assert getattr(failed, "worker_failures", None) == {0: cause}, (
        f"WorkerGroupError.worker_failures moved; read by {used_by}"
    )
    wrapped = RayTaskError("trial", "Traceback ...", failed)
    assert getattr(wrapped, "cause", None) is failed, f"RayTaskError.cause moved; read by {used_by}"


def test_tune_trial_methods_the_search_reads() -> None:
    from ray.tune.experiment import Trial

    used_by = "tune/run.py::collect_outcomes and _error_line"
    for name in ("get_pickled_error", "get_error"):
        assert callable(getattr(Trial, name, None)), f"Trial.{name} is gone; used by {used_by}"
    for status in ("ERROR", "TERMINATED"):
        assert hasattr(Trial, status), f"Trial.{status} is gone; used by {used_by}"


# ---------------------------------------------------------------------------------- MLflow


def test_serving_environment_flag_is_set_by_the_scoring_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pyfunc applies its deadline only under `mlflow models serve`, told by this flag."""
    used_by = "pipelines/serving/pyfunc.py::SegNeXtPyfunc.predict (request deadline)"
    flag = _hook("mlflow.environment_variables", "_MLFLOW_IS_IN_SERVING_ENVIRONMENT", used_by)
    monkeypatch.setenv(flag.name, "true")
    assert flag.get() is True, f"{flag.name} no longer reads the environment; used by {used_by}"
    from mlflow.pyfunc import scoring_server

    assert "_MLFLOW_IS_IN_SERVING_ENVIRONMENT" in inspect.getsource(scoring_server.init), (
        f"the scoring server no longer sets the flag; {used_by} would never time out"
    )


def test_scoring_server_processes_are_told_and_stopped_as_the_pyfunc_expects() -> None:
    """The pyfunc knows it runs in a scoring server by MLflow's model-path variable, and sees a
    shutdown begin through uvicorn's SIGTERM handler, a bound `Server.handle_exit`."""
    import signal

    from pipelines.serving.shutdown import SCORING_SERVER_ENV, server_is_exiting

    used_by = "pipelines/serving/shutdown.py (a served process ends within seconds of SIGTERM)"
    name = _hook("mlflow.pyfunc.scoring_server", "_SERVER_MODEL_PATH", used_by)
    assert name == SCORING_SERVER_ENV, f"the model-path variable is now {name!r}; {used_by}"
    server_class = _hook("uvicorn", "Server", used_by)
    assert "self.handle_exit" in inspect.getsource(server_class.capture_signals), used_by
    server = server_class(_hook("uvicorn", "Config", used_by)(app=None))
    previous = signal.signal(signal.SIGTERM, server.handle_exit)
    try:
        assert not server_is_exiting()
        server.handle_exit(signal.SIGTERM, None)
        assert server_is_exiting(), f"handle_exit no longer sets should_exit; {used_by}"
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_error_codes_map_to_the_http_statuses_serving_promises() -> None:
    from mlflow.exceptions import MlflowException

    used_by = "pipelines/serving/pyfunc.py (400 bad input, 504 past the deadline, 503 stopping)"
    codes = (("INVALID_PARAMETER_VALUE", 400), ("DEADLINE_EXCEEDED", 504))
    for name, status in (*codes, ("TEMPORARILY_UNAVAILABLE", 503)):
        code = _hook("mlflow.protos.databricks_pb2", name, used_by)
        got = MlflowException("x", error_code=code).get_http_status_code()
        assert got == status, f"{name} now answers HTTP {got}, not {status}; used by {used_by}"


def test_a_missing_registered_model_or_alias_reads_as_missing(tmp_path: Path) -> None:
    """`tune.warm_start.if_missing: scratch` tells "not registered" from other registry errors
    by the MlflowException's error_code and message."""
    from mlflow.tracking import MlflowClient

    from pipelines.tracking.runs import ensure_experiment
    from pipelines.train.initial_weights import WarmStartMissing, _registered_checkpoint

    used_by = "pipelines/warm_start.py::_registered_checkpoint (tune.warm_start.if_missing)"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ensure_experiment(uri, "canary")  # the store is created once, before any reader
    MlflowClient(uri).create_registered_model("canary")
    for source in ("models:/absent@champion", "models:/canary@champion", "models:/canary/3"):
        try:
            _registered_checkpoint(source, uri, str(tmp_path / "ray"))
        except WarmStartMissing:
            continue
        except Exception as error:
            pytest.fail(f"MLflow's error for {source} changed ({error!r}); read by {used_by}")
        pytest.fail(f"{source} resolved in an empty registry; {used_by}")


def test_scheduling_loop_still_skips_its_wait_when_nothing_runs() -> None:
    """data/scheduler_idle.py wraps `process_completed_tasks` as the executor module calls it,
    because that function only waits (`ray.wait`) when tasks are in flight. If Ray moves the
    call or starts waiting by itself, the wrapper is wrong or obsolete: look again."""
    used_by = "data/scheduler_idle.py (install_idle_wait, called by TrainStream.dataset)"
    executor = "ray.data._internal.execution.streaming_executor"
    _hook(executor, "process_completed_tasks", used_by)
    loop = inspect.getsource(_hook(executor, "StreamingExecutor", used_by)._scheduling_loop_step)
    assert "process_completed_tasks(" in loop, f"the loop no longer calls it; see {used_by}"
    state = _hook("ray.data._internal.execution.streaming_executor_state",
                  "process_completed_tasks", used_by)
    assert "if active_tasks:" in inspect.getsource(state), (
        f"process_completed_tasks changed how it waits; the idle wait may be obsolete: {used_by}")
    operator = _hook("ray.data._internal.execution.interfaces", "PhysicalOperator", used_by)
    assert hasattr(operator, "num_active_tasks"), f"PhysicalOperator.num_active_tasks: {used_by}"


def test_train_sigint_hook_the_driver_overrides() -> None:
    """pipelines.train.driver._Trainer turns Ray Train's SIGINT handler off by overriding this
    method; fit() must still call it by that name (else Ctrl-C exits 1, the run FAILED)."""
    import inspect

    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    assert "self._register_sigint_handler(controller)" in inspect.getsource(DataParallelTrainer)


def test_actor_table_the_start_watch_reads() -> None:
    """pipelines.train.start_wait sees a run's workers come up in the GCS actor table, by the
    class name of Ray Train V2's worker actor; renamed, a run would be stopped after
    ray.start_timeout_s although its workers train."""
    from pipelines.train.start_wait import WORKER_CLASS

    used_by = "pipelines/train/start_wait.py (the bounded wait for a run's workers)"
    actors = _hook("ray._private.state", "actors", used_by)
    assert {"job_id", "actor_state_name"} <= set(_params(actors)), used_by
    _hook("ray.train.v2._internal.execution.worker_group.worker", WORKER_CLASS, used_by)


def test_train_task_env_names_exist() -> None:
    """The read-worker prestart sends tasks with exactly the environment Ray Train gives the
    tasks its workers send; if these move, the prestarted processes would go unused."""
    used_by = "pipelines/train/read_workers.py::train_task_env"
    _hook("ray._common.constants", "RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR", used_by)
    constants = "ray.train.v2._internal.constants"
    _hook(constants, "DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE", used_by)
    propagate = _hook(constants, "get_env_vars_to_propagate", used_by)
    assert isinstance(propagate(), dict), f"get_env_vars_to_propagate changed; used by {used_by}"
