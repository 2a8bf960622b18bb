"""The quiet console: the command's own lines and the project's progress stay, Ray's forwarded
output and warnings go to the log only, and every line is in the log."""

from __future__ import annotations

import io
import threading
import warnings
from pathlib import Path

from pipelines.cli import error_message, is_user_error
from pipelines.console import (
    ConsoleFilter,
    current_log,
    log_only,
    quiet_console,
    ray_output_on_main_thread,
)


def forwarded(stream: ConsoleFilter, text: str) -> None:
    """Write from another thread, as Ray's log-forwarding thread does."""
    worker = threading.Thread(target=stream.write, args=(text,))
    worker.start()
    worker.join()


def test_filter_keeps_own_lines_and_logs_everything() -> None:
    shown, log = io.StringIO(), io.StringIO()
    stream = ConsoleFilter(shown, log, live=False)
    stream.write("summary line\n  indented detail\n")
    forwarded(stream, "Reporting training result 1: TrainingReport(...)\n")
    forwarded(stream, "(RayTrainWorker pid=12) [segnext] validation at it 4: mIoU 0.5\n")
    forwarded(stream, "[segnext] it 2/8 loss 1.0\n")
    stream.write("partial ")
    stream.write("line\n")
    assert shown.getvalue().splitlines() == [
        "summary line", "  indented detail", "[segnext] validation at it 4: mIoU 0.5",
        "[segnext] it 2/8 loss 1.0", "partial line",
    ]
    assert "Reporting training result 1" in log.getvalue()
    assert log.getvalue().count("\n") == 6


def test_progress_lines_replace_each_other_on_a_terminal() -> None:
    shown, log = io.StringIO(), io.StringIO()
    stream = ConsoleFilter(shown, log, live=True)
    forwarded(stream, "[segnext] it 2/8 loss 1.0\n")
    forwarded(stream, "[segnext] it 4/8 loss 0.9\n")
    stream.write("done\n")
    assert shown.getvalue() == (
        "\r\x1b[2K[segnext] it 2/8 loss 1.0\r\x1b[2K[segnext] it 4/8 loss 0.9\ndone\n"
    )


def test_a_worker_line_is_never_glued_to_one_of_ours() -> None:
    """print() writes the text and the newline apart: Ray's log thread (one long-lived thread)
    may write in between."""
    shown, log = io.StringIO(), io.StringIO()
    stream = ConsoleFilter(shown, log, live=False)
    turn = [threading.Event(), threading.Event()]

    def ray_log_thread() -> None:
        stream.write("[2026-12-01 23:25:46,646 E 1 2] core_worker.cc:2465: Actor ...")
        turn[0].set()
        turn[1].wait(timeout=10)
        stream.write("\n")

    worker = threading.Thread(target=ray_log_thread)
    stream.write("[segnext] ours")
    worker.start()
    assert turn[0].wait(timeout=10)
    stream.write("\n")
    turn[1].set()
    worker.join()
    assert shown.getvalue() == "[segnext] ours\n"
    assert log.getvalue().splitlines() == [
        "[segnext] ours", "[2026-12-01 23:25:46,646 E 1 2] core_worker.cc:2465: Actor ...",
    ]


def test_lines_ray_prints_on_the_main_thread_count_as_forwarded() -> None:
    """At ray.shutdown() Ray's de-duplicator prints the lines it held back on the main thread,
    through the same printer as its log thread (a core_worker.cc line reached the terminal)."""
    from ray._private import worker

    shown, log = io.StringIO(), io.StringIO()
    stream = ConsoleFilter(shown, log, live=False)
    batch = {"ip": "10.0.0.1", "localhost": "10.0.0.1", "pid": 1085, "actor_name": "TrainController"}
    core_line = "[2026-12-01 23:28:48,797 E 1085 1142] core_worker.cc:2465: Actor with class name"
    for ignore_prefix in (True, False):
        worker.print_worker_logs({**batch, "lines": [core_line]}, stream, ignore_prefix)
    worker.print_worker_logs({**batch, "lines": ["[segnext] validation at it 4"]}, stream, True)
    stream.write("main thread line\n")
    assert shown.getvalue().splitlines() == ["[segnext] validation at it 4", "main thread line"]
    assert log.getvalue().count("core_worker.cc:2465") == 2


def test_ray_records_below_error_go_to_the_log_only() -> None:
    """The driver's Ray log records (token-auth WARNING of ray.init) in Ray's own format."""
    import logging

    from ray._common.formatters import TextFormatter

    shown, log = io.StringIO(), io.StringIO()
    stream = ConsoleFilter(shown, log, live=False)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter())
    logger = logging.getLogger("ray.test_console_records")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("Token authentication is enabled for this Ray cluster.")
        logger.error("The node with node id: abc has been marked dead")
    finally:
        logger.removeHandler(handler)
    assert len(shown.getvalue().splitlines()) == 1
    assert "ERROR" in shown.getvalue() and "marked dead" in shown.getvalue()
    assert "Token authentication" in log.getvalue() and "marked dead" in log.getvalue()


def test_quiet_console_sends_warnings_and_detail_to_the_log(tmp_path: Path, capsys) -> None:
    with quiet_console("train", log_dir=tmp_path) as path:
        assert current_log() == path
        warnings.warn("deprecated thing", UserWarning, stacklevel=1)
        log_only("resolved config: lots of YAML")
        print("visible")
    assert current_log() is None
    out = capsys.readouterr()
    assert "visible" in out.out and "lots of YAML" not in out.out
    assert "deprecated thing" not in out.out + out.err
    text = path.read_text()
    assert "deprecated thing" in text and "lots of YAML" in text and "visible" in text


def test_ray_tunes_table_printed_on_the_main_thread_goes_to_the_log(tmp_path: Path,
                                                                    capsys) -> None:
    """Inside `Tuner.fit` Ray Tune prints its trial table on the main thread, between the
    search's own status lines: only ours reach the terminal."""
    from ray.tune.experimental.output import TuneTerminalReporter

    with quiet_console("tune", log_dir=tmp_path) as path:
        with ray_output_on_main_thread():
            TuneTerminalReporter(verbosity=1).experiment_started(
                "search", "/tmp/search", "random", "ASHA", 4
            )
            print("Trial status: 1 RUNNING")
            print("[segnext tune] trials: 1 running, 0 done")
        print("summary after the search")
    out = capsys.readouterr().out
    assert "Configuration for experiment" not in out and "Trial status" not in out
    assert "[segnext tune] trials: 1 running" in out and "summary after the search" in out
    text = path.read_text()
    assert "Configuration for experiment" in text and "Trial status: 1 RUNNING" in text


def test_mlflow_draws_no_download_bar_under_the_quiet_console(tmp_path: Path, capsys) -> None:
    import mlflow

    folder = tmp_path / "artifacts"
    folder.mkdir()
    for name in ("MLmodel", "checkpoint.pt"):
        (folder / name).write_text(name)
    with quiet_console("tune", log_dir=tmp_path / "logs"):
        mlflow.artifacts.download_artifacts(folder.as_uri(), dst_path=str(tmp_path / "got"))
    assert "Downloading artifacts" not in capsys.readouterr().err
    assert (tmp_path / "got" / "artifacts" / "MLmodel").is_file()
    mlflow.artifacts.download_artifacts(folder.as_uri(), dst_path=str(tmp_path / "again"))
    assert "Downloading artifacts" in capsys.readouterr().err  # the setting is put back


def test_error_messages_are_one_line_for_users() -> None:
    from pipelines.config import ConfigError

    error = ConfigError("data.root /x does not exist; write shards there first")
    assert is_user_error(error)
    assert error_message("train", error) == (
        "segnext train: error: data.root /x does not exist; write shards there first"
    )
    bug = KeyError("boom")
    assert not is_user_error(bug)
    assert "rerun with `segnext --debug" in error_message("eval", bug)


def test_a_failure_inside_ray_workers_is_reported_by_its_cause() -> None:
    import ray.exceptions
    from ray.train.v2.api.exceptions import WorkerGroupError

    from data.samples import SampleReadError

    try:
        raise SampleReadError("/d/train-000000.tar: sample 'k': cannot decode 'image.jpg'")
    except SampleReadError as cause:
        in_task = ray.exceptions.RayTaskError("fn", "Traceback ...", cause).as_instanceof_cause()
    wrapped = WorkerGroupError("Training failed due to worker errors:\nTraceback ...", {1: in_task})
    assert is_user_error(in_task)
    assert error_message("train", wrapped) == (
        "segnext train: error: /d/train-000000.tar: sample 'k': cannot decode 'image.jpg'"
    )
