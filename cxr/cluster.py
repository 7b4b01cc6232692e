"""Scoring an archive on a Ray cluster (`predict.py --ray`): predict.py's rows, written as Parquet files that a rerun
over the same output folder resumes from.

    python predict.py /pacs/export --ray auto --output scores/   # on a running cluster (`ray start --head` ...)
    python predict.py xrays/ --ray --output scores/               # on a Ray instance started on this machine

Ray Data reads the files as bytes (`read_binary_files`), a pool of actors each loads the model folder once and
classifies batches with the project's loader and predictor (`cxr.predictor.classify`: the same probabilities, checks,
sets and errors as predict.py), and each finished block of rows becomes a Parquet file in the output folder. A killed
run leaves the files it finished; the next run over the same folder skips the images they hold. Ray itself is in
requirements-cluster.txt; docs/scaling.md sets up a cluster and has the figures.
"""

from __future__ import annotations

import json
import os
import stat
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from cxr.folders import replaced_file
from cxr.images import MAX_FILE_BYTES, ImageLoadError, load_image
from cxr.predictor import (
    Prediction,
    classify,
    load_classifier,
    model_fingerprint,
    prediction_columns,
    prediction_record,
)

# In the output folder: the model and runtime its rows come from ("_" first: Parquet readers of the folder skip it).
SCORING_FILE = "_scoring.json"
TOP_K = 3  # predict.py's three labels


def parquet_schema(top_k: int = TOP_K) -> pa.Schema:
    """predict.py's columns (`prediction_columns`), typed: the scores and ood_score float64, the flag a bool, the rest
    strings; null where predict.py's CSV cell is empty."""
    types = {"ood_score": pa.float64(), "looks_like_chest_xray": pa.bool_()}
    return pa.schema(
        [
            (column, pa.float64() if column.startswith("score_") else types.get(column, pa.string()))
            for column in prediction_columns(top_k)
        ]
    )


SCHEMA = parquet_schema()


class Scorer:
    """A Ray Data actor: the model folder loaded once, then batches of files (their bytes and paths) classified."""

    def __init__(self, model: str, runtime: dict, batch_size: int):
        self.classifier = load_classifier(model, **runtime)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        predictions = classify(
            self.classifier, list(batch["bytes"]), batch_size=self.batch_size, names=list(batch["path"])
        )
        return pa.Table.from_pylist([prediction_record(p, TOP_K) for p in predictions], schema=SCHEMA)


def split_readable(files: list[str]) -> tuple[list[str], list[Prediction]]:
    """The files Ray can read, and a Prediction with the loader's refusal for each file it refuses before reading a
    byte (missing, not a regular file, over the size limit, not readable): read_binary_files would fail on those."""
    readable, refused = [], []
    for file in files:
        try:
            info = os.stat(file)
            if stat.S_ISREG(info.st_mode) and info.st_size <= MAX_FILE_BYTES and os.access(file, os.R_OK):
                readable.append(file)
                continue
        except OSError:
            pass
        try:
            load_image(file)
            readable.append(file)  # it changed since: Ray reads it after all
        except ImageLoadError as error:
            refused.append(Prediction(source=file, error=str(error)))
    return readable, refused


def scored_files(output: Path) -> set[str]:
    """The files whose rows the Parquet files in `output` already hold. A Parquet file a killed run left half-written
    (no footer) holds none for sure: it is deleted, and its images are scored again."""
    done = set()
    for part in sorted(output.glob("*.parquet")):
        try:
            done.update(pq.read_table(part, columns=["file"]).column("file").to_pylist())
        except (pa.ArrowInvalid, OSError):
            print(f"Removing {part.name}: a Parquet file cut short by an interrupted run; its images are scored again.")
            part.unlink()
    return done


def read_rows(output: Path, columns: list[str] | None = None) -> pa.Table:
    """The rows of every Parquet file in `output` (the folder `score_on_ray` writes), in no particular order."""
    return pq.ParquetDataset(sorted(str(part) for part in output.glob("*.parquet"))).read(columns=columns)


def check_output_folder(output: Path, model: str, runtime: dict) -> None:
    """Record in `output` which model and runtime write its rows, or refuse (SystemExit) to add rows from another
    model or runtime to the ones already there: a resumed table must be one model's."""
    record = {"model": str(model), "fingerprint": model_fingerprint(model), "runtime": runtime}
    path = output / SCORING_FILE
    if path.is_file():
        before = json.loads(path.read_text())
        if (before.get("fingerprint"), before.get("runtime")) != (record["fingerprint"], record["runtime"]):
            raise SystemExit(
                f"{output} holds rows from another model or runtime ({before.get('model')}, {before.get('runtime')}), "
                f"not {model} with {runtime}: choose another --output, or delete the folder to start again."
            )
        return
    output.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


def score_on_ray(
    paths: list[Path],
    model: str,
    runtime: dict,
    output: Path,
    address: str | None = None,
    batch_size: int = 16,
    actors: int | None = None,
    cpus_per_actor: float = 1,
) -> tuple[int, int, int]:
    """Score `paths` into Parquet files under the folder `output` on the Ray cluster at `address` (None: the one this
    process is connected to, else what `ray.init()` finds or starts), skipping the files `output` already holds.
    `actors`: a fixed pool of that many (default: from one up to what the cluster holds), each with `cpus_per_actor`
    CPUs (its torch threads).

    Returns predict.py's figures for the whole folder: (rows, rows that carry an error, rows that do not look like a
    chest X-ray)."""
    check_output_folder(output, model, runtime)
    done = scored_files(output)
    files = [str(path) for path in paths]
    todo = [file for file in files if file not in done]
    print(f"{len(files)} files: {len(files) - len(todo)} already scored in {output}, {len(todo)} to score.")
    readable, refused = split_readable(todo)
    if refused:  # Ray would fail the whole job on these: their rows are written here
        with replaced_file(output / f"refused-{uuid.uuid4().hex}.parquet", "wb") as file:
            pq.write_table(pa.Table.from_pylist([prediction_record(p, TOP_K) for p in refused], schema=SCHEMA), file)
    if readable:
        if not ray.is_initialized():
            ray.init(address=address)
        pool = ray.data.ActorPoolStrategy(size=actors) if actors else ray.data.ActorPoolStrategy(min_size=1)
        # Reading files and writing Parquet are I/O: they take no CPU slot, so a pool of actors as large as the
        # cluster's CPUs cannot starve them (ray-project/ray#44687: the job would hang), and as many run at once as
        # there can be actors.
        io = dict(num_cpus=0, concurrency=actors or max(1, int(ray.cluster_resources().get("CPU", 1))))
        (
            ray.data.read_binary_files(readable, include_paths=True, **io)
            .map_batches(
                Scorer,
                fn_constructor_kwargs=dict(model=model, runtime=runtime, batch_size=batch_size),
                batch_size=batch_size,
                batch_format="numpy",
                compute=pool,
                num_cpus=cpus_per_actor,
            )
            .write_parquet(str(output), ray_remote_args={"num_cpus": 0}, concurrency=io["concurrency"])
        )
    table = read_rows(output, columns=["error", "looks_like_chest_xray"])
    return (
        table.num_rows,
        table.num_rows - table.column("error").null_count,
        table.column("looks_like_chest_xray").to_pylist().count(False),
    )
