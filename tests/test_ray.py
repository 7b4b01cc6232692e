"""Ray: scoring an archive (`predict.py --ray`) gives predict.py's rows and resumes where a run stopped; the model on
Ray Serve (serve.py) answers concurrent requests, batched, as it answers them one at a time; the app with `--backend`
answers as in process, and says so plainly when the server is down or slow.

One local Ray cluster of 2 CPUs serves the whole module (Ray has no local mode any more). Without Ray installed
(requirements-cluster.txt) the cluster tests skip; the client tests need no Ray."""

import csv
import http.server
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

import app
import predict
from benchmarks.common import free_port
from cxr.predictor import classify, load_classifier
from cxr.serving import ServeBackend, encode_pixels, load_backend_classifier
from inputs import chest_like, dicom_bytes, encode

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs (and Serve on a free loopback port) for the module; shut down after it."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -r requirements-cluster.txt)")
    from ray import serve

    # workers import the project from the checkout, wherever pytest was started
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """A folder as an export holds it: JPEG, PNG (8 and 16-bit), DICOM, in subfolders, and broken files."""
    folder = tmp_path_factory.mktemp("archive")
    (folder / "2024" / "dicom").mkdir(parents=True)
    for index in range(4):
        pixels = np.roll(chest_like(300 + 20 * index, 240), 9 * index, axis=1)
        (folder / f"xray-{index}.jpeg").write_bytes(encode(Image.fromarray(pixels, "L"), "JPEG"))
        (folder / "2024" / f"xray-{index}.png").write_bytes(encode(Image.fromarray(pixels, "L").convert("RGB"), "PNG"))
    (folder / "2024" / "sixteen-bit.png").write_bytes(
        encode(Image.fromarray(chest_like().astype(np.uint16) * 16), "PNG")
    )
    (folder / "2024" / "dicom" / "scan.dcm").write_bytes(dicom_bytes(chest_like(200, 160).astype(np.uint16) * 16))
    (folder / "cut.jpeg").write_bytes(encode(Image.fromarray(chest_like(), "L"), "JPEG")[:600])
    (folder / "notes.png").write_text("not an image")
    return folder


def csv_rows(path: Path) -> dict[str, dict]:
    return {row["file"]: row for row in csv.DictReader(path.open())}


def parquet_rows(folder: Path) -> list[dict]:
    from cxr.cluster import read_rows

    return read_rows(folder).to_pylist()


def assert_same_row(ray_row: dict, csv_row: dict) -> None:
    assert (ray_row["error"] or "") == csv_row["error"]
    for rank in (1, 2, 3):
        assert (ray_row[f"label_{rank}"] or "") == csv_row[f"label_{rank}"]
        if csv_row[f"score_{rank}"]:
            assert ray_row[f"score_{rank}"] == pytest.approx(float(csv_row[f"score_{rank}"]), abs=1e-5)
    assert [ray_row[column] or "" for column in ("set_90", "set_95")] == [csv_row["set_90"], csv_row["set_95"]]
    flag = ray_row["looks_like_chest_xray"]
    assert ("" if flag is None else str(flag).lower()) == csv_row["looks_like_chest_xray"]
    if csv_row["ood_score"]:
        assert ray_row["ood_score"] == pytest.approx(float(csv_row["ood_score"]), rel=1e-4)


# ---- scoring an archive ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cluster_scoring_gives_predict_pys_rows_bad_files_included(ray_cluster, tiny_model_dir, archive, tmp_path):
    missing = str(archive / "gone.png")  # named but absent: read_binary_files would fail the job on it
    options = ["--model", str(tiny_model_dir), "--batch_size", "4"]
    assert predict.main([str(archive), missing, *options, "--output", str(tmp_path / "predictions.csv")]) == 0
    listed = tmp_path / "inputs.txt"  # the same inputs from a list file, one a line
    listed.write_text(f"{archive}\n{missing}\n")
    assert predict.main([f"@{listed}", *options, "--ray", "--output", str(tmp_path / "scores")]) == 0

    expected = csv_rows(tmp_path / "predictions.csv")
    rows = parquet_rows(tmp_path / "scores")
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "scores").num_rows == len(rows)  # the folder reads as one table (pandas too)
    assert sorted(row["file"] for row in rows) == sorted(expected)  # every file once, the broken ones too
    for row in rows:
        assert_same_row(row, expected[row["file"]])
    errors = {Path(row["file"]).name: row["error"] for row in rows if row["error"]}
    assert set(errors) == {"cut.jpeg", "notes.png", "gone.png"}
    assert "truncated" in errors["cut.jpeg"] and "No such file" in errors["gone.png"]


@pytest.mark.slow
def test_a_rerun_scores_only_what_the_output_lacks_and_refuses_another_model(
    ray_cluster, tiny_model_dir, archive, tmp_path, capsys
):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cxr.cluster import parquet_schema

    output = tmp_path / "scores"
    model = ["--model", str(tiny_model_dir), "--ray", "--output", str(output)]
    first = sorted(str(path) for path in archive.glob("*.jpeg"))  # a run killed after these
    assert predict.main([*first, *model]) == 0
    written = {part: part.read_bytes() for part in output.glob("*.parquet")}
    # a file a killed run was writing: no footer, so its rows count for nothing and it goes
    cut_short = output / "cut-short.parquet"
    rows = [dict.fromkeys(parquet_schema().names) | {"file": str(archive / "notes.png"), "error": "stale"}]
    pq.write_table(pa.Table.from_pylist(rows, schema=parquet_schema()), cut_short)
    cut_short.write_bytes(cut_short.read_bytes()[:-20])
    capsys.readouterr()

    assert predict.main([str(archive), *model]) == 0
    out = capsys.readouterr().out
    everything = [str(path) for path in sorted(archive.rglob("*")) if path.is_file()]
    assert f"{len(everything)} files: {len(first)} already scored" in out
    assert not cut_short.exists()
    assert sorted(row["file"] for row in parquet_rows(output)) == sorted(everything)  # each file exactly once
    assert {part: part.read_bytes() for part in written} == written  # the first run's rows are kept as they were

    with pytest.raises(SystemExit, match="another model or runtime"):
        predict.main([str(archive), *model, "--int8"])


# ---- serving ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served_model(ray_cluster, tiny_model_dir) -> str:
    """serve.py's deployment of the tiny model, batching up to 8 requests that arrive within 0.2 s."""
    from ray import serve

    import serve as serve_py

    serve.run(
        serve_py.build_app(str(tiny_model_dir), max_batch_size=8, batch_wait_timeout_s=0.2),
        name="xray",
        route_prefix="/xray",
    )
    return f"{ray_cluster}/xray"


def xrays(folder: Path, count: int) -> list[Path]:
    paths = []
    for index in range(count):
        path = folder / f"xray-{index}.png"
        path.write_bytes(encode(Image.fromarray(np.roll(chest_like(), 5 * index, axis=0), "L"), "PNG"))
        paths.append(path)
    return paths


@pytest.mark.slow
def test_served_batches_answer_as_one_request_at_a_time(served_model, tiny_model_dir, tmp_path):
    classifier = load_classifier(tiny_model_dir)
    pixels = [
        classifier.image_processor(Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"][0]
        for path in xrays(tmp_path, 12)
    ]
    backend = ServeBackend(served_model, fingerprint="")

    def answer(tensor: torch.Tensor) -> dict:
        response = backend.client.post(served_model, content=encode_pixels(tensor))
        assert response.status_code == 200, response.text
        return response.json()

    alone = [answer(tensor) for tensor in pixels]
    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(answer, pixels))
    assert {item["batch"] for item in alone} == {1}
    assert max(item["batch"] for item in together) > 1  # the concurrent requests did share forward passes
    for one, many in zip(alone, together, strict=True):
        assert list(one["scores"]) == list(many["scores"]) and one["prediction_sets"] == many["prediction_sets"]
        assert list(one["scores"].values()) == pytest.approx(list(many["scores"].values()), abs=1e-6)
        assert many["ood_score"] == pytest.approx(one["ood_score"], rel=1e-5)
        assert np.allclose(many["saliency"], one["saliency"], atol=1e-5)

    refused = backend.client.post(served_model, content=b"not an array")
    assert refused.status_code == 400 and "not a .npy array" in refused.text


@pytest.mark.slow
def test_the_app_with_a_serve_backend_answers_as_in_process(served_model, tiny_model_dir, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    args = app.parse_args(["--model", str(tiny_model_dir), "--port", str(free_port()), "--backend", served_model])
    demo = app.build_demo(args.model, args.examples, args.backend)
    demo.launch(**app.launch_options(args), prevent_thread_lock=True, quiet=True)
    try:
        client = Client(demo.local_url, verbose=False)
        classifier = load_classifier(tiny_model_dir)
        scan = tmp_path / "scan.dcm"
        scan.write_bytes(dicom_bytes(chest_like(200, 160).astype(np.uint16) * 16))
        for path in [*xrays(tmp_path, 2), scan]:
            warning, label, overlay, check = client.predict(handle_file(str(path)), api_name="/predict")
            in_warning, in_scores, in_overlay, in_check = app.answer_upload(classifier, str(path))
            assert {item["label"]: item["confidence"] for item in label["confidences"]} == pytest.approx(
                in_scores, abs=1e-5
            )
            assert check.pop("prediction_sets") == in_check.pop("prediction_sets")
            assert check == pytest.approx(in_check, rel=1e-5) and warning == in_warning
            assert Image.open(overlay).size == in_overlay.size
        broken = tmp_path / "notes.png"
        broken.write_text("not an image")
        with pytest.raises(AppError, match="not an image"):  # the loader's words, from the page's own decode
            client.predict(handle_file(str(broken)), api_name="/predict")
    finally:
        demo.close()


# ---- a server that is down or slow (no Ray needed) ------------------------------------------------------------------


class SilentHandler(http.server.BaseHTTPRequestHandler):
    """Takes the request and never answers: a stuck model server."""

    def do_POST(self):  # noqa: N802 (http.server's name)
        time.sleep(30)

    def log_message(self, *args):
        pass


def answer_within(seconds: float, classifier, path: Path) -> str:
    """The message answer_upload raises, asserting that it came within `seconds` (run in a thread: a hang fails the
    test instead of stalling the suite)."""
    raised = []

    def run():
        try:
            app.answer_upload(classifier, str(path))
        except gr.Error as error:
            raised.append(error.message)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"no answer within {seconds} s"
    assert raised, "an answer, though the server cannot give one"
    return raised[0]


def test_a_backend_down_or_slow_is_a_clear_message_not_a_hang(tiny_model_dir, tmp_path):
    [path] = xrays(tmp_path, 1)
    down = load_backend_classifier(str(tiny_model_dir), f"http://127.0.0.1:{free_port()}/")
    assert "cannot be reached" in answer_within(20, down, path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SilentHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        slow = load_backend_classifier(str(tiny_model_dir), f"http://127.0.0.1:{server.server_port}/", timeout=1)
        assert "did not answer within 1 s" in answer_within(20, slow, path)
    finally:
        server.shutdown()


def test_an_answer_from_another_model_is_refused(tiny_model_dir, tmp_path, monkeypatch):
    classifier = load_backend_classifier(str(tiny_model_dir), "http://127.0.0.1:1/")
    answer = {"scores": {"Normal": 0.5}, "ood_score": None, "looks_like_chest_xray": None, "prediction_sets": None}
    answer |= {"saliency": None, "fingerprint": "another model", "batch": 1}

    class Response:
        status_code, text = 200, ""

        def json(self):
            return answer

    monkeypatch.setattr(classifier.backend.client, "post", lambda *args, **kwargs: Response())
    [prediction] = classify(classifier, xrays(tmp_path, 1))
    assert "serves another model" in prediction.error
    answer["fingerprint"] = classifier.backend.fingerprint
    [prediction] = classify(classifier, xrays(tmp_path, 1))
    assert prediction.error is None and prediction.scores == {"Normal": 0.5}


def test_serve_py_explains_itself_even_without_ray(capsys):
    import serve as serve_py

    with pytest.raises(SystemExit) as exited:
        serve_py.main(["--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for words in ["--model", "--address", "--host", "--port", "--max_batch_size", "--max_replicas", "--backend", "503"]:
        assert words in text
