"""Serving: Segmenter pre/post-processing, the pyfunc input forms, a fresh-process round trip
through the registry, and `mlflow models serve` answering real HTTP requests."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_registry import CLASSES, single_thread, sqlite_store, tiny_checkpoint  # noqa: F401

from pipelines.checkpoint_io import load_checkpoint, model_from_checkpoint
from pipelines.inference.segmenter import InferenceSettings, Segmenter, settings_from_checkpoint
from pipelines.serving.payload import decode_mask_png, predict_any
from pipelines.tracking.models import load_segmenter

SIZES = ((40, 60), (33, 47))
SERVE = "models serve -m models:/segnext@champion --env-manager local --host 127.0.0.1"

pytestmark = pytest.mark.usefixtures(
    "single_thread"
)  # (H, W): different sizes, neither a multiple of 32


@pytest.fixture(autouse=True)
def one_inference_thread(monkeypatch):
    """What `pipelines.inference.threads` gives the code under test: one thread on the shared machine."""
    monkeypatch.setenv("SEGNEXT_THREADS", "1")


def _images(sizes=SIZES, seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def constant_model(tmp_path_factory) -> Path:
    """A checkpoint whose model predicts class 2 everywhere, whatever the pre-processing."""
    return tiny_checkpoint(tmp_path_factory.mktemp("constant"), constant_class=2)


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> str:
    """A SQLite store whose `segnext@champion` is a tiny random model; its tracking URI."""
    from mlflow import MlflowClient

    from pipelines.tracking.registry import register_checkpoint

    folder = tmp_path_factory.mktemp("registry")
    uri, experiment = sqlite_store(folder)
    run_id = MlflowClient(uri).create_run(experiment).info.run_id
    register_checkpoint(tiny_checkpoint(folder / "ckpt"), run_id=run_id, tracking_uri=uri)
    return uri


def _child_env(uri: str, **extra: str) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)  # `mlflow models serve` runs `uvicorn` from PATH
    return {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "OMP_NUM_THREADS": "1",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        **extra,
    }


# ------------------------------------------------------------------------------ Segmenter


@pytest.mark.parametrize(
    ("mode", "scale", "tta"),
    [("whole", None, False), ("slide", None, False), ("auto", (64, 32), True)],
)
def test_masks_come_back_at_input_size(constant_model, mode, scale, tta):
    payload = load_checkpoint(constant_model)
    settings = settings_from_checkpoint(payload, mode=mode, crop_size=(32, 32), tta=tta)
    settings = InferenceSettings(**{**vars(settings), "scale": scale})
    meta = payload["meta"]
    segmenter = Segmenter(
        model_from_checkpoint(payload),
        settings,
        class_names=meta.class_names,
        palette=meta.palette,
    )
    masks = segmenter.predict(_images(SIZES + ((70, 90),)))
    assert [mask.shape for mask in masks] == [(40, 60), (33, 47), (70, 90)]
    assert all(mask.dtype == np.uint8 and (mask == 2).all() for mask in masks)


def test_auto_mode_slides_only_over_large_images(constant_model):
    settings = settings_from_checkpoint(load_checkpoint(constant_model))  # crop 64x64
    assert settings.mode == "auto" and settings.stride == (42, 42)
    assert settings.mode_for(128, 128) == "whole"  # exactly 4 crops
    assert settings.mode_for(129, 128) == "slide"


def test_training_config_sets_test_resize_and_window(tmp_path):
    config = {"data.scale": [2048, 512], "eval.mode": "slide", "eval.crop": [96, 128]}
    payload = load_checkpoint(tiny_checkpoint(tmp_path, config=config))
    settings = settings_from_checkpoint(payload)
    assert (settings.scale, settings.mode, settings.crop_size) == ((2048, 512), "slide", (96, 128))
    assert settings_from_checkpoint(payload, mode="whole", tta=True).flip


# ------------------------------------------------------------------------------ pyfunc forms


def test_pyfunc_input_forms(constant_model):
    segmenter = load_segmenter(constant_model)
    images = _images()

    single = predict_any(segmenter, images[0])
    assert isinstance(single, np.ndarray) and single.shape == SIZES[0]
    batch = predict_any(segmenter, np.stack([images[0], images[0]]))
    assert batch.shape == (2, *SIZES[0])
    assert [m.shape for m in predict_any(segmenter, images)] == list(SIZES)
    from_json = predict_any(segmenter, images[1].astype(np.int64))  # JSON lists arrive as int64
    assert from_json.shape == SIZES[1]

    encoded = [_png(images[0]), base64.b64encode(_png(images[1])).decode()]  # bytes and base64
    for table in (pd.DataFrame({"image": encoded}), {"image": encoded}):
        out = predict_any(segmenter, table)
        assert list(out.columns) == ["mask", "height", "width"]
        masks = [decode_mask_png(text) for text in out["mask"]]
        assert [m.shape for m in masks] == list(SIZES)
        assert (out["height"].tolist(), out["width"].tolist()) == ([40, 33], [60, 47])
        assert all((m == 2).all() for m in masks)
        json.dumps(out.to_dict(orient="records"))  # what the scoring server returns


def test_pyfunc_rejects_bad_inputs_clearly(constant_model):
    segmenter = load_segmenter(constant_model)
    with pytest.raises(ValueError, match="integers 0..255"):
        predict_any(segmenter, np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="column named 'image'"):
        predict_any(segmenter, pd.DataFrame({"picture": [b"x"]}))
    with pytest.raises(ValueError, match="row 0: bytes are not a readable image"):
        predict_any(segmenter, pd.DataFrame({"image": [b"not an image"]}))
    with pytest.raises(ValueError, match=r"expected an RGB image \(H, W, 3\)"):
        predict_any(segmenter, np.zeros((8, 8), dtype=np.uint8))


def _pyfunc(checkpoint: Path, model_config: dict | None = None):
    from types import SimpleNamespace

    from pipelines.serving import SegNeXtPyfunc

    model = SegNeXtPyfunc()
    model.load_context(
        SimpleNamespace(artifacts={"checkpoint": str(checkpoint)}, model_config=model_config)
    )
    return model


def test_oversized_requests_are_refused_with_http_400(constant_model, monkeypatch):
    from mlflow.exceptions import MlflowException

    from pipelines.serving.payload import ImageTooLargeError
    from pipelines.serving.pyfunc import max_pixels_setting

    monkeypatch.delenv("SEGNEXT_MAX_PIXELS", raising=False)
    assert max_pixels_setting() == 16_000_000 and max_pixels_setting({"max_pixels": 10}) == 10
    monkeypatch.setenv("SEGNEXT_MAX_PIXELS", "2500")
    assert max_pixels_setting({"max_pixels": 10}) == 2500  # the server's setting wins
    segmenter = load_segmenter(constant_model)
    big = np.zeros((50, 51, 3), dtype=np.uint8)
    with pytest.raises(ImageTooLargeError, match=r"row 0: 51x50 = 0.0 MP is above .*"
                       r"SEGNEXT_MAX_PIXELS=2500\); send a smaller image"):
        predict_any(segmenter, pd.DataFrame({"image": [_png(big)]}), max_pixels=2500)
    with pytest.raises(ImageTooLargeError, match="input: 51x50"):
        predict_any(segmenter, big, max_pixels=2500)
    small = np.zeros((40, 40, 3), dtype=np.uint8)  # 1600 each, 3200 together
    with pytest.raises(ImageTooLargeError, match="2 images hold 0.0 MP together"):
        predict_any(segmenter, [small, small], max_pixels=2500)
    assert predict_any(segmenter, [small], max_pixels=2500)[0].shape == (40, 40)

    model = _pyfunc(constant_model)
    assert model.max_pixels == 2500
    with pytest.raises(MlflowException, match="above this model's limit") as refused:
        model.predict(None, pd.DataFrame({"image": [base64.b64encode(_png(big)).decode()]}))
    assert refused.value.get_http_status_code() == 400
    with pytest.raises(MlflowException, match="column named 'image'") as bad:
        model.predict(None, pd.DataFrame({"picture": [b"x"]}))
    assert bad.value.get_http_status_code() == 400
    monkeypatch.setenv("SEGNEXT_MAX_PIXELS", "many")
    with pytest.raises(ValueError, match="SEGNEXT_MAX_PIXELS='many': expected a whole number"):
        _pyfunc(constant_model)


def test_a_request_past_the_server_timeout_stops_computing(constant_model, monkeypatch):
    from mlflow.exceptions import MlflowException

    model = _pyfunc(constant_model, {"max_pixels": 0})
    calls = []

    def slow_window(module, args):  # runs after the deadline's own check: window 1 overshoots
        calls.append(time.monotonic())
        time.sleep(1.1 if len(calls) == 1 else 0)

    model.segmenter.model.register_forward_pre_hook(slow_window)
    image = _images([(140, 150)])[0]  # auto mode: 12 sliding windows of 64x64
    assert model.predict(None, image).shape == (140, 150)  # not serving: no deadline
    assert len(calls) == 12
    calls.clear()
    monkeypatch.setenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "true")
    monkeypatch.setenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", "1")
    with pytest.raises(MlflowException, match="ran past the scoring server's timeout") as late:
        model.predict(None, image)
    assert late.value.get_http_status_code() == 504
    assert len(calls) == 1  # stopped before the second window
    calls.clear()
    monkeypatch.setenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", "30")
    assert model.predict(None, image).shape == (140, 150)  # the deadline is per request


# -------------------------------------------------------------------------- registry round trip


@pytest.mark.slow
def test_champion_loads_and_predicts_in_a_fresh_process(registry):
    script = textwrap.dedent(
        """
        import json, sys
        import mlflow, numpy as np
        model = mlflow.pyfunc.load_model("models:/segnext@champion")
        rng = np.random.default_rng(0)
        images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(40, 60), (33, 47)]]
        masks = model.predict(images)
        names = model.metadata.metadata["class_names"]
        print(json.dumps({"shapes": [m.shape for m in masks], "max": max(int(m.max()) for m in masks),
                          "classes": names}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=_child_env(registry),
        cwd="/",  # nothing importable from the checkout's folder: only the installed package
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["shapes"] == [list(size) for size in SIZES]
    assert result["max"] < len(CLASSES) and result["classes"] == list(CLASSES)


@pytest.mark.slow
def test_model_uris_resolve_to_their_checkpoint_and_run(registry):
    from mlflow import MlflowClient

    from pipelines.tracking.models import resolve_model
    from pipelines.tracking.registry import using_tracking_uri

    with using_tracking_uri(registry):
        source = resolve_model("models:/segnext@champion")
        segmenter = load_segmenter("models:/segnext/1")
    assert source.checkpoint.name == "checkpoint.pt" and source.checkpoint.is_file()
    assert source.run_id == MlflowClient(registry).get_model_version("segnext", "1").run_id
    masks = segmenter.predict(_images())
    assert [mask.shape for mask in masks] == list(SIZES)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_ping(url: str, server: subprocess.Popen, deadline: float) -> None:
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"server exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1.0)
    raise AssertionError("server did not answer /ping in time")


@pytest.mark.slow
def test_mlflow_models_serve_answers_http(registry, tmp_path):
    port = _free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", *SERVE.split(), "-p", str(port)],
        env=_child_env(registry, SEGNEXT_MAX_PIXELS="5000"),  # the two images hold 3951
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: uvicorn is a grandchild
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_ping(url, server, time.monotonic() + 240)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(_request(url, [np.zeros((60, 90, 3), np.uint8)]), timeout=120)
        assert refused.value.code == 400
        message = json.loads(refused.value.read())["message"]
        assert "row 0: 90x60 = 0.0 MP is above this model's limit" in message
        assert "SEGNEXT_MAX_PIXELS=5000" in message
        with urllib.request.urlopen(_request(url, _images()), timeout=120) as response:
            predictions = json.loads(response.read())["predictions"]
        masks = [decode_mask_png(row["mask"]) for row in predictions]
        assert [mask.shape for mask in masks] == list(SIZES)
        assert [(row["height"], row["width"]) for row in predictions] == list(SIZES)
        assert max(int(mask.max()) for mask in masks) < len(CLASSES)
    finally:
        _stop(server)
        log.close()


def _request(url: str, images: list[np.ndarray]) -> urllib.request.Request:
    """A scoring request for `images`, as PNG bytes in base64 in the "image" column."""
    encoded = [base64.b64encode(_png(image)).decode() for image in images]
    body = {"dataframe_split": {"columns": ["image"], "data": [[text] for text in encoded]}}
    return urllib.request.Request(
        f"{url}/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )


def _descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc: no psutil needed)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_stops_every_server_process_even_mid_request(registry, tmp_path, workers):
    """A request of minutes is running, under a server timeout of minutes too, when SIGTERM
    reaches the `mlflow models serve` process: every process of the server (mlflow, uvicorn
    and, with 2 workers, its workers) is gone within 5 s, and the client gets an answer."""
    import threading

    port = _free_port()
    log = (tmp_path / "serve.log").open("w")
    options = ["-p", str(port), "-t", "300", "-w", str(workers)]
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", *SERVE.split(), *options],
        env=_child_env(registry),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    answers: list[object] = []

    def client() -> None:  # ~800 windows of 64x64: minutes of work on one thread
        try:
            urllib.request.urlopen(_request(url, _images([(1200, 1200)])), timeout=60)
            answers.append(200)
        except urllib.error.HTTPError as error:
            answers.append(error.code)
        except OSError as error:
            answers.append(error)

    try:
        _wait_for_ping(url, server, time.monotonic() + 240)
        request = threading.Thread(target=client, daemon=True)
        request.start()
        time.sleep(2.0)  # decoded and computing
        processes = _descendants(server.pid) | {server.pid}
        assert len(processes) >= 2 + workers // 2 * workers, processes  # mlflow, uvicorn, workers
        server.send_signal(signal.SIGTERM)  # the CLI only, as `kill PID` or a scheduler does
        deadline = time.monotonic() + 5
        while _alive(processes) and time.monotonic() < deadline:
            server.poll()  # reap our own child
            time.sleep(0.2)
        assert not _alive(processes), f"still running 5 s after SIGTERM: {_alive(processes)}"
        request.join(timeout=10)
        assert answers == [503], answers  # stopped: "the server is shutting down"
    finally:
        _stop(server)
        log.close()


def _stop(server: subprocess.Popen) -> None:
    """Stop the server's whole process group (uvicorn runs as its child)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=30)
            return
        except subprocess.TimeoutExpired:
            continue


# A served process as uvicorn leaves it on SIGTERM: uvicorn's own handler only flags the
# shutdown and waits for the running request, whose "forward pass" here never ends.
_SERVED_PROCESS = textwrap.dedent(
    """
    import signal, time
    import uvicorn
    from pipelines.serving.shutdown import SHUTDOWN
    server = uvicorn.Server(uvicorn.Config(app=None))
    signal.signal(signal.SIGTERM, server.handle_exit)
    signal.signal(signal.SIGINT, server.handle_exit)
    SHUTDOWN.install()
    print("ready", flush=True)
    time.sleep(120)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_forward_pass_that_outlasts_the_shutdown_is_cut_short(sig):
    started = time.monotonic()
    served = subprocess.Popen(
        [sys.executable, "-c", _SERVED_PROCESS],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert served.stdout.readline().strip() == "ready"
        signalled = time.monotonic()
        served.send_signal(sig)
        _, stderr = served.communicate(timeout=10)
    finally:
        served.kill()
    assert served.returncode == 128 + signal.SIGTERM, stderr
    assert 2.5 < time.monotonic() - signalled < 6, time.monotonic() - started
    assert "still running 3 s after the server received SIGTERM or SIGINT" in stderr


def test_a_served_process_whose_parent_is_killed_ends_within_seconds():
    supervisor = textwrap.dedent(
        f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", {_SERVED_PROCESS!r}], stdout=subprocess.PIPE)
        child.stdout.readline()  # "ready": its watcher runs
        print(child.pid, flush=True)
        time.sleep(120)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", supervisor], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.kill()  # SIGKILL: as a killed uvicorn supervisor leaves its workers
    parent.wait()
    deadline = time.monotonic() + 6
    while _alive({child}) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive({child}), "the orphaned served process still runs 6 s after its parent died"
