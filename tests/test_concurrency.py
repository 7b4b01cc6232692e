"""The served app under concurrent users: the real `python app.py`, 20 gradio_client callers at once, every answer
checked, and the page still served afterwards (the lock-up users met came only under load)."""

import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from benchmarks.common import free_port
from benchmarks.load import loopback_client, start_server
from cxr.labels import DISPLAY_NAMES
from inputs import chest_like

CLIENTS, REQUESTS_EACH, DEADLINE = 20, 3, 150


@pytest.mark.slow
def test_twenty_concurrent_callers_all_get_answers_and_the_page_still_answers(cnn_model_dir, tmp_path):
    from gradio_client import handle_file

    uploads = []
    for index, (fmt, suffix) in enumerate([("PNG", ".png"), ("JPEG", ".jpeg"), ("PNG", ".png")]):
        path = tmp_path / f"xray{index}{suffix}"
        Image.fromarray(np.roll(chest_like(400 + 40 * index, 360), 7 * index, axis=1), "L").save(path, fmt)
        uploads.append(path)
    port = free_port()
    cache = tmp_path / "gradio"
    cache.mkdir()
    server = start_server(str(cnn_model_dir), port, cache, tmp_path / "app.log")
    url = f"http://127.0.0.1:{port}/"
    answers, failures, lock = [], [], threading.Lock()
    started = time.monotonic()

    def caller(number: int) -> None:
        try:
            client = loopback_client(url, download_files=str(tmp_path / f"downloads{number}"))
            for request in range(REQUESTS_EACH):
                path = uploads[(number + request) % len(uploads)]
                job = client.submit(handle_file(str(path)), api_name="/predict")
                answer = job.result(timeout=DEADLINE - (time.monotonic() - started))
                with lock:
                    answers.append((path, answer))
        except Exception as error:  # noqa: BLE001 - every failure is reported below
            with lock:
                failures.append(f"caller {number}: {type(error).__name__}: {error}")

    try:
        threads = [threading.Thread(target=caller, args=(number,), daemon=True) for number in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(1.0, DEADLINE - (time.monotonic() - started)))
        elapsed = time.monotonic() - started
        assert not failures, failures[:5]
        assert len(answers) == CLIENTS * REQUESTS_EACH, f"{len(answers)} answers in {elapsed:.0f} s"
        for path, (warning, bars, overlay, check) in answers:
            assert {item["label"] for item in bars["confidences"]} == set(DISPLAY_NAMES.values())
            assert sum(item["confidence"] for item in bars["confidences"]) == pytest.approx(1, abs=1e-4)
            width, height = Image.open(overlay).size  # the overlay of this caller's own upload, not another's
            assert width / height == pytest.approx(Image.open(path).width / Image.open(path).height, rel=0.02)
            assert isinstance(check["looks_like_chest_xray"], bool) and check["threshold"] > 0
            assert isinstance(warning, str)
        assert httpx.get(url, timeout=10).status_code == 200  # still serving, after the load
        print(f"{len(answers)} answers from {CLIENTS} concurrent callers in {elapsed:.1f} s")
    finally:
        server.kill()
        server.wait()
