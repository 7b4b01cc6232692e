"""Faults a long run or a public demo meets: a killed training run, a hostile data folder, a full or read-only disk,
uploads left behind, a flood of requests.

Training runs are tiny (scratch-tiny on the synthetic set, seconds each) and happen in tmp_path.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import app
import train_vit
from benchmarks.common import free_port
from cxr.run_record import read_metrics, training_argv, write_checksums
from helpers import TINY_RUN, folder_checksums, prepared_data
from hf_data import prepare_dataset
from inputs import encode, png_claiming_size

REPO = Path(__file__).resolve().parents[1]
# The recipe of the `tiny_model_dir` fixture (conftest.py), which serves as the uninterrupted reference run.
RUN = TINY_RUN


def steps_of(folder: Path) -> int:
    return int(folder.name.split("-")[1])


def complete_checkpoints(output_dir: Path) -> list[Path]:
    found = []
    for state in output_dir.glob("checkpoint-*/trainer_state.json"):
        with contextlib.suppress(ValueError, OSError):
            json.loads(state.read_text())  # written last and at once: parseable means the checkpoint is complete
            found.append(state.parent)
    return sorted(found, key=steps_of)


def weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


# ---- a run killed mid-way resumes ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_complete_checkpoint_to_the_same_result(tiny_model_dir, tmp_path):
    """SIGKILL right after the first checkpoint, then `--resume`: the run ends exactly as the uninterrupted one did.

    On CPU two runs with one seed are bit-identical, so the checkpoint written before the kill equals the reference's.
    The resumed epoch is the same too: augmentation draws from torch's global generator (cxr.augment.random_views),
    whose state Trainer saves in each checkpoint (rng_state.pth) and restores on --resume, so the resumed epoch sees
    the same views in the same order; the final weights and figures are compared exactly.
    """
    made_with = training_argv(tiny_model_dir, leave_out=("--output_dir",))
    assert made_with == RUN, "conftest's tiny_model_dir recipe changed: update RUN to match it"
    output = tmp_path / "model"
    command = [sys.executable, str(REPO / "train_vit.py"), *RUN, "--output_dir", str(output)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    log = (tmp_path / "killed.log").open("w")
    run = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not complete_checkpoints(output):
            assert run.poll() is None, (
                f"the run ended before its first checkpoint:\n{(tmp_path / 'killed.log').read_text()[-3000:]}"
            )
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.05)
        run.send_signal(signal.SIGKILL)
        assert run.wait(timeout=30) == -signal.SIGKILL
    finally:
        if run.poll() is None:
            run.kill()
        log.close()
    [first] = complete_checkpoints(output)
    assert not (output / "metrics.json").exists(), "killed after the run had finished"
    reference_first = min(tiny_model_dir.glob("checkpoint-*"), key=steps_of)
    assert first.name == reference_first.name
    before, reference = weights(first / "model.safetensors"), weights(reference_first / "model.safetensors")
    assert all((before[key] == reference[key]).all() for key in reference), "same seed, same weights up to the kill"

    # As if the kill had come while the next checkpoint was being written: weights cut short, no trainer_state.json.
    torn = output / f"checkpoint-{2 * steps_of(first)}"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes((first / "model.safetensors").read_bytes()[:1000])

    resumed = subprocess.run([*command, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"Removing {torn}: an interrupted save left it incomplete" in resumed.stdout

    final_state = json.loads((complete_checkpoints(output)[-1] / "trainer_state.json").read_text())
    reference_state = json.loads(
        (max(tiny_model_dir.glob("checkpoint-*"), key=steps_of) / "trainer_state.json").read_text()
    )
    assert final_state["global_step"] == reference_state["global_step"]
    evaluations = [entry for entry in final_state["log_history"] if "eval_loss" in entry]
    reference_evaluations = [entry for entry in reference_state["log_history"] if "eval_loss" in entry]
    assert [entry["epoch"] for entry in evaluations] == [1.0, 2.0]  # continued, not restarted

    def figures(entry):  # all but timings
        return {key: value for key, value in entry.items() if not key.endswith(("runtime", "per_second"))}

    assert figures(evaluations[0]) == figures(reference_evaluations[0])  # the epoch before the kill, exactly

    # the resumed epoch too
    assert [figures(entry) for entry in evaluations] == [figures(entry) for entry in reference_evaluations]
    final, reference = weights(output / "model.safetensors"), weights(tiny_model_dir / "model.safetensors")
    assert all(torch.equal(final[key], reference[key]) for key in reference), (
        "resumed: the same final weights, bit for bit"
    )
    summary, reference_summary = (read_metrics(folder) for folder in (output, tiny_model_dir))
    for split in ("validation", "test"):
        assert figures(summary[split]) == figures(reference_summary[split]), split


@pytest.mark.slow
def test_two_runs_started_at_once_on_one_data_folder_both_finish(tmp_path):
    """A sweep or a comparison launched in parallel: both prepare the same data folder; they take turns (a file lock)
    instead of one reading the imagefolder tree while the other rewrites it."""
    command = [
        sys.executable,
        str(REPO / "train_vit.py"),
        *RUN,
        "--num_train_epochs",
        "1",
        "--synthetic_images_per_class",
        "120",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    runs = [
        subprocess.Popen(
            [*command, "--output_dir", f"run{index}"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for index in range(2)
    ]
    for run in runs:
        output, _ = run.communicate(timeout=300)
        assert run.returncode == 0, output[-3000:]
    counts = [read_metrics(tmp_path / f"run{index}")["data"]["counts"] for index in range(2)]
    assert counts[0] == counts[1] and sum(counts[0]["train"].values()) > 0


# ---- model folders appear whole or not at all -----------------------------------------------------------------------


def folder_bytes(folder: Path) -> dict[str, str]:
    """Every file under `folder` (checkpoints included), by its sha256."""
    return folder_checksums(folder, follow_links=True)


def make_distinct(folder: Path) -> Path:
    """Change a model folder's head and chest X-ray thresholds together (a consistent other version of the model), so
    that any file of it can be told apart from the one a run would write."""
    from safetensors.torch import load_file, save_file

    from cxr.ood import OOD_FILE, OodDetector

    tensors = load_file(folder / "model.safetensors")
    tensors["classifier.bias"] = tensors["classifier.bias"] + 1.0
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    detector = OodDetector.load(folder / OOD_FILE)
    detector.thresholds = {name: 2 * value + 1 for name, value in detector.thresholds.items()}
    detector.save(folder)
    metrics = read_metrics(folder)
    metrics["ood"]["threshold"] = detector.threshold
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return folder


def version_of(folder: Path) -> tuple[float, float]:
    """(classifier bias[0], out-of-distribution threshold) of a model folder; each version of the model has its own
    pair."""
    from cxr.ood import OOD_FILE, OodDetector

    threshold = OodDetector.load(folder / OOD_FILE).threshold
    assert read_metrics(folder)["ood"]["threshold"] == threshold, "metrics.json and ood.safetensors disagree"
    return float(weights(folder / "model.safetensors")["classifier.bias"][0]), threshold


class Crash(Exception):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("step", ["plot_confusion_matrix", "save_reliability", "render_model_card", "swap"])
def test_a_run_stopped_between_its_save_steps_leaves_the_old_model_folder_intact(
    tiny_model_dir, tmp_path, monkeypatch, step
):
    """`--resume` on a finished run redoes only the end (calibration, evaluation, saving): a crash at any step of the
    save leaves the old folder byte for byte as it was; without a crash, the new folder is complete and consistent."""
    import cxr.folders

    folder = make_distinct(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    before, old_version = folder_bytes(folder), version_of(folder)
    # The fixture's working folder: its synthetic data and prepared tree, unchanged by a run with the same settings.
    monkeypatch.chdir(tiny_model_dir.parent)

    def crash(*args, **kwargs):
        raise Crash(step)

    if step == "swap":
        monkeypatch.setattr(cxr.folders, "_exchange", crash)
    else:
        monkeypatch.setattr(train_vit, step, crash)
    with pytest.raises(Crash):
        train_vit.main([*RUN, "--output_dir", str(folder), "--resume"])
    assert folder_bytes(folder) == before

    monkeypatch.undo()
    monkeypatch.chdir(tiny_model_dir.parent)
    train_vit.main([*RUN, "--output_dir", str(folder), "--resume"])
    after = folder_bytes(folder)
    assert version_of(folder) != old_version and version_of(folder) == version_of(tiny_model_dir)
    assert set(after) == set(before) and all(
        after[name] == before[name] for name in after if name.startswith("checkpoint-")
    )
    assert not list(tmp_path.glob(".model.*")), "no staging folder left behind"


@pytest.mark.slow
def test_a_refit_stopped_midway_leaves_the_model_folder_intact(tiny_model_dir, tmp_path, monkeypatch):
    """`python calibrate.py` rewrites weights, statistics, metrics and card: all of them or none."""
    import calibrate

    folder = make_distinct(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    before = folder_bytes(folder)
    prepared = prepared_data(tiny_model_dir)
    monkeypatch.setattr(calibrate, "update_card", lambda *args: (_ for _ in ()).throw(Crash("card")))
    with pytest.raises(Crash):
        calibrate.main([str(folder), "--data_dir", str(prepared)])
    assert folder_bytes(folder) == before
    monkeypatch.undo()
    assert calibrate.main([str(folder), "--data_dir", str(prepared)]) == 0
    # Refitted: statistics and metrics agree again.
    assert version_of(folder)[1] == pytest.approx(version_of(tiny_model_dir)[1], rel=1e-4)


@pytest.mark.slow
def test_a_model_loaded_while_a_new_folder_is_swapped_in_is_one_version(tiny_model_dir, tmp_path, monkeypatch):
    """The loader reads weights, processor and statistics one after another: a folder swapped in between (here, right
    before the statistics are read) makes it load again, so it never pairs old weights with new statistics."""
    import cxr.predictor
    from cxr.folders import staging_folder, swap_in

    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    newer = make_distinct(shutil.copytree(tiny_model_dir, tmp_path / "newer"))
    write_checksums(newer)  # a whole other version, as its run would record it
    real_load_ood_detector, swaps = cxr.predictor.load_ood_detector, []

    def swap_then_load(*args, **kwargs):
        if not swaps:
            staging = staging_folder(folder)
            for path in newer.iterdir():
                if path.is_file():
                    shutil.copy2(path, staging / path.name)
            swap_in(staging, folder)
            swaps.append(True)
        return real_load_ood_detector(*args, **kwargs)

    monkeypatch.setattr(cxr.predictor, "load_ood_detector", swap_then_load)
    classifier = cxr.predictor.load_classifier(folder)
    assert swaps
    loaded = (float(classifier.model.classifier.bias[0]), classifier.ood_detector.threshold)
    assert loaded == pytest.approx(version_of(newer))


def test_a_swap_never_leaves_the_model_folder_missing(tmp_path):
    """Another process opening the folder while versions are swapped in finds one, whole, every time (the swap is one
    rename-exchange, not a rename away and another in)."""
    from cxr.folders import staging_folder, swap_in

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    reader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, sys\nmissing = 0\nwhile not os.path.exists(sys.argv[2]):\n"
            "    missing += not os.path.isfile(sys.argv[1])\nprint(missing)",
            str(folder / "config.json"),
            str(tmp_path / "done"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(0.5)  # the reader is running
        for version in range(2000):
            staging = staging_folder(folder)
            (staging / "config.json").write_text(json.dumps({"version": version}))
            swap_in(staging, folder)
    finally:
        (tmp_path / "done").touch()
        missing = int(reader.communicate(timeout=30)[0])
    assert missing == 0 and json.loads((folder / "config.json").read_text()) == {"version": 1999}


def test_a_crash_while_writing_a_json_file_leaves_the_old_one(tmp_path):
    from cxr.folders import replaced_file, write_text_atomic

    path = tmp_path / "metrics.json"
    write_text_atomic(path, '{"old": true}')
    with pytest.raises(Crash), replaced_file(path) as file:
        file.write('{"new": ')
        raise Crash("disk full")
    assert path.read_text() == '{"old": true}' and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


# ---- nothing the user made is deleted unasked ----------------------------------------------------------------------


@pytest.mark.slow
def test_a_rerun_into_a_folder_with_checkpoints_stops_unless_told_to_resume_or_overwrite(
    tiny_model_dir, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    before = folder_bytes(folder)
    with pytest.raises(SystemExit, match=r"holds 2 checkpoint\(s\).*--resume.*--overwrite_output_dir"):
        train_vit.main([*RUN, "--output_dir", str(folder)])
    assert folder_bytes(folder) == before
    assert not (tmp_path / "data").exists()  # stopped before any work

    model_only = tmp_path / "model-only"  # a finished model without its checkpoints is the user's work too
    shutil.copytree(tiny_model_dir, model_only, ignore=shutil.ignore_patterns("checkpoint-*"))
    with pytest.raises(SystemExit, match="holds a trained model.*--overwrite_output_dir"):
        train_vit.main([*RUN, "--output_dir", str(model_only)])

    (folder / "my-notes.txt").write_text("kept")  # anything else the user put there is carried into the new folder
    old_checkpoints = sorted(folder.glob("checkpoint-*"), key=steps_of)
    train_vit.main([*RUN, "--output_dir", str(folder), "--overwrite_output_dir", "--num_train_epochs", "1"])
    assert (folder / "my-notes.txt").read_text() == "kept"
    assert [path.name for path in folder.glob("checkpoint-*")] == [old_checkpoints[0].name]  # the new run's one epoch
    assert read_metrics(folder)["train"]["epoch"] == 1.0


# ---- a hostile data folder -----------------------------------------------------------------------------------------
# tests/test_data_prepare.py already covers zero-byte, truncated and non-image files, unlabelable names, a symlink
# loop (file and folder) and unchanged checksums for one broken file. Added here: what could hang or exhaust memory
# (a named pipe, a link to /dev/zero), links and folders posing as images, damaged data behind a valid header, a
# decompression bomb, all at once, with every source entry checked unchanged afterwards.


@contextlib.contextmanager
def time_limit(seconds: int):
    def hang(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_hostile_data_folder_is_reported_file_by_file_and_left_unchanged(tmp_path):
    source = tmp_path / "mine"
    good = {}
    for folder in ("bacteria", "normal", "viral"):
        for index in range(12):
            pixels = np.random.default_rng(index).integers(0, 256, (64, 64), dtype=np.uint8)
            good[f"{folder}/{folder}_{index}.png"] = encode(Image.fromarray(pixels), "PNG")
    for relative, data in good.items():
        (source / relative).parent.mkdir(parents=True, exist_ok=True)
        (source / relative).write_bytes(data)
    normal = source / "normal"
    png = bytearray(good["normal/normal_0.png"])
    png[len(png) // 2 :: 7] = bytes(len(png[len(png) // 2 :: 7]))  # damaged pixel data behind an intact header
    (normal / "damaged.png").write_bytes(bytes(png))
    (normal / "bomb.png").write_bytes(png_claiming_size(6325, 6325))  # over our limit, under Pillow's own
    os.mkfifo(normal / "pipe.png")  # opening it for reading would wait for a writer forever
    os.symlink("/dev/zero", normal / "zeros.png")  # reading it would never end
    os.symlink(tmp_path / "nowhere.png", normal / "dangling.png")
    (normal / "folder.png").mkdir()  # a folder named like an image
    expected_skips = {"damaged.png", "bomb.png", "pipe.png", "zeros.png", "dangling.png"}
    before = folder_checksums(source)  # opens nothing but regular files: the pipe and /dev/zero link cannot hang it

    with time_limit(60):
        report = prepare_dataset(source, tmp_path / "prepared")

    skipped = {Path(path).name: reason for path, reason in report.skipped}
    assert expected_skips <= set(skipped), f"not reported: {expected_skips - set(skipped)}"
    assert "not a regular file" in skipped["pipe.png"] and "not a regular file" in skipped["zeros.png"]
    assert "6325 x 6325 px; images over 40 megapixels" in skipped["bomb.png"]
    assert sum(sum(per_class.values()) for per_class in report.counts.values()) == len(good)  # every good image kept
    assert folder_checksums(source) == before  # nothing in the source was changed, added or removed


# ---- a read-only or full disk --------------------------------------------------------------------------------------


def test_an_output_folder_that_cannot_be_created_stops_the_run_before_any_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(SystemExit, match="Cannot write the model folder .*a-file/model.*writable --output_dir"):
        train_vit.main([*RUN, "--output_dir", str(tmp_path / "a-file" / "model")])
    assert not (tmp_path / "data").exists()  # stopped before preparing any data


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_stops_the_run_before_any_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(SystemExit, match="Cannot write the model folder"):
            train_vit.main([*RUN, "--output_dir", str(locked)])
    finally:
        locked.chmod(0o755)
    assert not (tmp_path / "data").exists()


def test_a_full_disk_stops_the_run_before_training(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    output = tmp_path / "model"
    real_disk_usage = shutil.disk_usage

    def nearly_full(path):  # only the model folder's disk is full; the data set and its cache are elsewhere
        usage = real_disk_usage(path)
        return usage._replace(free=5 * 2**20) if Path(path).resolve() == output.resolve() else usage

    monkeypatch.setattr(shutil, "disk_usage", nearly_full)
    with pytest.raises(
        SystemExit, match=r"Not enough free disk space for .*model: 5 MiB free, this run needs about \d+ MiB"
    ):
        train_vit.main([*RUN, "--output_dir", str(output)])
    assert not list(output.glob("checkpoint-*"))  # training never started


# ---- the served app: uploads are not kept, and the queue is bounded -------------------------------------------------


@pytest.mark.slow
def test_uploads_are_deleted_and_the_queue_cannot_be_skipped(tiny_model_dir, tmp_path, monkeypatch):
    import httpx
    from gradio_client import Client, handle_file

    cache = tmp_path / "gradio-cache"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(cache))
    monkeypatch.setattr(app, "DELETE_CACHE", (1, 1))  # the app's (60, 120), faster
    demo = app.build_demo(str(tiny_model_dir), examples=None)  # examples stay cached by design; only uploads must go
    assert demo._queue.max_size == app.QUEUE_SIZE and demo._queue.default_concurrency_limit == app.CONCURRENCY_LIMIT
    [predict] = [fn for fn in demo.fns.values() if fn.api_name == "predict"]
    assert predict.queue and predict.concurrency_limit == "default" and demo.api_open is False
    demo.launch(
        **app.launch_options(app.parse_args(["--port", str(free_port())])), prevent_thread_lock=True, quiet=True
    )
    try:
        upload = tmp_path / "private-scan.png"
        upload.write_bytes(
            encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 90), dtype=np.uint8)), "PNG")
        )
        client = Client(demo.local_url, verbose=False, download_files=False)
        client.predict(handle_file(str(upload)), api_name="/predict")
        assert list(cache.rglob("private-scan.png")), "gradio stores the upload in its cache"

        # gradio 6.31's gr.File(type="filepath") also leaves one empty tmpXXXXXXXX file per request, which
        # delete_cache does not track; empty, it holds nothing uploaded, so only files with content must go.
        def kept():
            return [path for path in cache.rglob("*") if path.is_file() and path.stat().st_size > 0]

        deadline = time.monotonic() + 15
        while kept() and time.monotonic() < deadline:
            time.sleep(0.25)
        assert kept() == [], "uploads and overlays must be deleted"

        # The REST route that would run a prediction outside the queue (and its limits) is closed.
        response = httpx.post(f"{demo.local_url}gradio_api/run/predict", json={"data": [None]}, timeout=30)
        assert response.status_code == 404 and "join the queue" in response.text
    finally:
        demo.close()
