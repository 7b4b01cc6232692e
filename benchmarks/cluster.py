"""Ray on this machine: cluster scoring against predict.py, and the model on Ray Serve against the in-process app.

    pip install -r requirements-cluster.txt
    python -m benchmarks.cluster --model outputs/resnet-xray-30ep      # default: the shipped model

1. Scoring: the same files (the full-resolution originals in --data's xray_originals/ and a fixed sample of the 224 px
   Kaggle training X-rays, as benchmarks.load picks them), scored by
     predict.py        its loop (predict_files -> CSV) in this process, every core; --runtime as predict.py's
     Ray, N actors     `score_on_ray` (predict.py --ray) into a fresh folder, a fixed pool of N actors of one CPU
                       each, on a local Ray cluster of this machine's CPUs started once (its start is printed apart)
   A Ray run pays a fixed cost (actors started, each importing torch and loading the model; the plan; the writes),
   measured by a run over --actors x 2 files; "steady" is the rate beyond it, what an archive of millions sees.
   Where the time goes: the decode (the loader and the image processor) and the model (one forward pass, the check
   and the sets) timed alone in this process, one thread, per image; a Ray run's time beyond (decode + model) / N is
   Ray's (reading the files, moving batches between processes, Parquet).
2. Serving, --clients concurrent gradio_client clients (benchmarks.load's driver; --requests a phase):
     app in process        python app.py --model M (app.CONCURRENCY_LIMIT predictions at a time)
     app + Serve batched   python app.py --backend URL, serve.py's deployment batching up to --max_batch_size
     app + Serve, batch 1  the same with max_batch_size=1 (and as many requests held by the replica at once)
     app, no model         the same app answering at once (benchmarks.load --no_work): what any backend leaves here
     Serve alone           the deployment driven directly by --clients threads posting processed pixels
   "CPU ms" is the CPU each request (or image) cost everything this benchmark runs, whatever else shares the
   machine, then split: this process (the clients), the app with its decode workers, Ray's processes (the Serve
   proxy and replica among them); "CPU cap" the requests/s this machine's cores allow at that cost.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle torch threads sleep instead of spinning: see app.py

import psutil  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import free_port, sample_benchmark_images  # noqa: E402
from benchmarks.load import SHARED_DATA, drive, row, start_server  # noqa: E402
from cxr.images import load_image  # noqa: E402
from cxr.models import SHIPPED_MODEL_DIR, input_size  # noqa: E402
from cxr.predictor import (  # noqa: E402
    RUNTIMES,
    classify,
    classify_pixels,
    load_classifier,
    predict_files,
    write_predictions,
)
from predict import DEFAULT_RUNTIME  # noqa: E402


def load_line() -> str:
    return "load average " + " ".join(f"{value:.2f}" for value in os.getloadavg())


def start_ray() -> None:
    """A local Ray cluster of this machine's CPUs, quiet: the tables are the output."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=psutil.cpu_count(), include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray").setLevel(logging.WARNING)


def tree_cpu() -> dict[int, float]:
    """CPU seconds so far of this process and every process under it: the clients, the app and its decode workers,
    and Ray (ray.init started it from here), whatever else runs on the machine."""
    times = {}
    for process in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            cpu = process.cpu_times()
            times[process.pid] = cpu.user + cpu.system
        except psutil.Error:  # gone meanwhile
            pass
    return times


def cpu_split(before: dict[int, float], app_pid: int | None = None) -> dict[str, float]:
    """CPU seconds since `before`, by who spent them: this process (the clients, or predict.py's loop), the app
    server `app_pid` with its decode workers, and the rest under this process: Ray's."""
    app = set()
    if app_pid:
        try:
            app = {app_pid, *(child.pid for child in psutil.Process(app_pid).children(recursive=True))}
        except psutil.Error:
            pass
    split = {"here": 0.0, "app": 0.0, "ray": 0.0}
    for pid, seconds in tree_cpu().items():
        split["here" if pid == os.getpid() else "app" if pid in app else "ray"] += seconds - before.get(pid, 0.0)
    return split


def cpu_since(before: dict[int, float]) -> float:
    return sum(cpu_split(before).values())


def time_predict_py(
    model: str, runtime: dict, paths: list[Path], batch_size: int, scratch: Path
) -> tuple[float, float]:
    """(seconds, CPU seconds) of predict.py's loop over `paths` (model loaded and warmed up first, as in a long run)."""
    classifier = load_classifier(model, **runtime)
    classify(classifier, paths[:batch_size], batch_size=batch_size)
    before, start = tree_cpu(), time.perf_counter()
    write_predictions(predict_files(classifier, paths, batch_size=batch_size, progress=False), scratch / "p.csv")
    return time.perf_counter() - start, cpu_since(before)


def time_parts(model: str, runtime: dict, paths: list[Path], batch_size: int) -> tuple[float, float]:
    """(decode, model) seconds per image on one thread, as one actor runs them."""
    classifier = load_classifier(model, **runtime)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        size = input_size(classifier.image_processor)
        start = time.perf_counter()
        rows = [
            classifier.image_processor(load_image(path, draft_size=size), return_tensors="pt")["pixel_values"][0]
            for path in paths
        ]
        decode = time.perf_counter() - start
        classify_pixels(classifier, torch.stack(rows[:batch_size]), [""] * min(batch_size, len(rows)))  # warm-up
        start = time.perf_counter()
        for first in range(0, len(rows), batch_size):
            batch = torch.stack(rows[first : first + batch_size])
            classify_pixels(classifier, batch, [""] * len(batch))
        forward = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    return decode / len(paths), forward / len(paths)


def time_ray(
    model: str, runtime: dict, paths: list[Path], batch_size: int, actors: int, scratch: Path
) -> tuple[float, float]:
    """(seconds, CPU seconds) of `score_on_ray` over `paths` into a fresh folder."""
    from cxr.cluster import score_on_ray

    output = Path(tempfile.mkdtemp(dir=scratch, prefix=f"ray-{actors}-"))
    before, start = tree_cpu(), time.perf_counter()
    score_on_ray(paths, model, runtime, output, batch_size=batch_size, actors=actors, cpus_per_actor=1)
    return time.perf_counter() - start, cpu_since(before)


def scoring(args: argparse.Namespace, paths: list[Path], scratch: Path) -> None:
    originals = sum(path.parent.name == "xray_originals" for path in paths)
    print(
        f"== Scoring {len(paths)} files ({originals} full-resolution originals + {len(paths) - originals} Kaggle "
        f"training X-rays{f', {args.copies} copies of each' if args.copies > 1 else ''}), batch {args.batch_size}, "
        f"{args.model}, runtime {args.runtime}"
    )
    runtime = RUNTIMES[args.runtime]
    reference, reference_cpu = time_predict_py(args.model, runtime, paths, args.batch_size, scratch)
    decode, forward = time_parts(args.model, runtime, paths, args.batch_size)
    start = time.perf_counter()
    start_ray()
    print(f"Ray cluster start: {time.perf_counter() - start:.1f} s ({psutil.cpu_count()} CPUs); {load_line()}")
    lines = [
        f"{'path':<16} {'images/s':>9} {'vs predict.py':>14} {'steady img/s':>13} {'vs predict.py':>14} "
        f"{'CPU ms/img':>11}"
    ]
    lines.append(
        f"{'predict.py':<16} {len(paths) / reference:>9.1f} {'100 %':>14} {'':>13} {'':>14} "
        f"{1000 * reference_cpu / len(paths):>11.1f}"
    )
    for actors in args.actors:
        fixed, _ = time_ray(args.model, runtime, paths[: 2 * actors], args.batch_size, actors, scratch)
        wall, cpu = time_ray(args.model, runtime, paths, args.batch_size, actors, scratch)
        steady = (len(paths) - 2 * actors) / max(wall - fixed, 1e-9)
        ideal = len(paths) * (decode + forward) / actors
        lines.append(
            f"{f'Ray, {actors} actor' + ('s' if actors > 1 else ''):<16} {len(paths) / wall:>9.1f} "
            f"{100 * reference / wall:>12.0f} % {steady:>13.1f} {100 * steady * reference / len(paths):>12.0f} % "
            f"{1000 * cpu / len(paths):>11.1f}"
        )
        lines.append(
            f"    {wall:.1f} s = fixed {fixed:.1f} s (a run over {2 * actors} files) + {wall - fixed:.1f} s; "
            f"(decode + model) / {actors} = {ideal:.1f} s, so Ray's own share is {wall - fixed - ideal:+.1f} s"
        )
    print("\n".join(lines))
    print(
        f"per image, one thread: decode + image processor {1000 * decode:.1f} ms, model {1000 * forward:.1f} ms; "
        f"predict.py ({torch.get_num_threads()} torch threads) {1000 * reference / len(paths):.1f} ms; {load_line()}\n"
    )


def drive_serve(url: str, model: str, images: list[Path], total: int, clients: int) -> tuple[list, float, list[int]]:
    """`total` requests of processed pixels straight to the deployment from `clients` threads: (results, seconds,
    the batch sizes the answers report, CPU seconds used)."""
    from cxr.serving import ServeBackend, encode_pixels

    classifier = load_classifier(model)
    size = input_size(classifier.image_processor)
    bodies = [
        encode_pixels(
            classifier.image_processor(load_image(path, draft_size=size), return_tensors="pt")["pixel_values"][0]
        )
        for path in images
    ]
    client = ServeBackend(url, fingerprint="").client
    results, batches, lock, numbers = [], [], threading.Lock(), iter(range(total))

    def one_client() -> None:
        while True:
            with lock:
                number = next(numbers, None)
            if number is None:
                return
            start = time.perf_counter()
            try:
                response = client.post(url, content=bodies[number % len(bodies)])
                response.raise_for_status()
                batch, error = response.json()["batch"], None
            except Exception as failure:  # noqa: BLE001 - counted, like any failed request
                batch, error = None, f"{type(failure).__name__}: {str(failure)[:80]}"
            with lock:
                results.append((time.perf_counter() - start, error))
                if batch:
                    batches.append(batch)

    before, start = tree_cpu(), time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for _ in range(clients):
            pool.submit(one_client)
    return results, time.perf_counter() - start, batches, cpu_split(before)


def app_phase(name: str, args, images: list[Path], scratch: Path, backend: str | None = None, no_work: bool = False):
    """One load phase through `python app.py` (with --backend, or answering at once): its table row, requests/s and
    CPU milliseconds a request."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    os.environ.pop("XRAY_BACKEND", None)
    if backend:
        os.environ["XRAY_BACKEND"] = backend  # app.py's --backend default; start_server passes our environment
    folder = Path(tempfile.mkdtemp(dir=scratch, prefix="app-"))
    server = start_server(
        args.model, port, folder / "cache", folder / "log", no_work_image=images[0] if no_work else None
    )
    try:
        drive(url, images[:3], 3, 1, 120, args.timeout, folder / "downloads")  # warm-up
        before, start = tree_cpu(), time.perf_counter()
        results = drive(url, images, args.requests, args.clients, 600, args.timeout, folder / "downloads")
        seconds, cpu = time.perf_counter() - start, cpu_split(before, server.pid)
    finally:
        server.terminate()
        server.wait(30)
        os.environ.pop("XRAY_BACKEND", None)
    ok = sum(error is None for _, error in results)
    line = with_cpu(row(name, results, args.clients, seconds)[0], cpu, len(results))
    return line, ok / seconds, 1000 * sum(cpu.values()) / max(ok, 1)


def with_cpu(line: str, cpu: dict[str, float], requests: int) -> str:
    """A load row with the CPU milliseconds each request cost everything this benchmark runs (and who spent them:
    the clients, the app with its decode workers, Ray), and the requests/s this machine's cores allow at that cost."""
    per_request = {key: 1000 * seconds / max(requests, 1) for key, seconds in cpu.items()}
    total = sum(per_request.values())
    spent = " ".join(f"{per_request[key]:>6.0f}" for key in ("here", "app", "ray"))
    return f"{line} {total:>8.0f} {1000 * psutil.cpu_count() / total:>9.1f} {spent}"


def model_cpu(model: str, images: list[Path], batch_size: int, threads: int) -> float:
    """CPU milliseconds per image of the model's part of an answer (forward pass, check, sets, Grad-CAM) in batches
    of `batch_size` on `threads` torch threads: the app in process runs batches of 1 on every core, a Serve replica
    batches on its own CPUs."""
    classifier = load_classifier(model)
    size = input_size(classifier.image_processor)
    pixels = torch.stack(
        [
            classifier.image_processor(load_image(path, draft_size=size), return_tensors="pt")["pixel_values"][0]
            for path in images[: 8 * batch_size]
        ]
    )
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        classify_pixels(classifier, pixels[:batch_size], [""] * batch_size, saliency=True)  # warm-up
        start = time.process_time()
        for first in range(0, len(pixels), batch_size):
            batch = pixels[first : first + batch_size]
            classify_pixels(classifier, batch, [""] * len(batch), saliency=True)
        return 1000 * (time.process_time() - start) / len(pixels)
    finally:
        torch.set_num_threads(before)


def serving(args: argparse.Namespace, images: list[Path], scratch: Path) -> None:
    from ray import serve

    import serve as serve_py

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/xray"
    print(
        f"== Serving {args.model}: {args.clients} clients, {args.requests} requests a phase; Serve replica: "
        f"{args.cpus_per_replica:g} CPU, batches up to {args.max_batch_size} within {args.batch_wait_timeout_s:g} s; "
        f"{load_line()}"
    )
    before = tree_cpu()
    time.sleep(10)
    idle = cpu_since(before) / 10
    header = (
        f"{'phase':<8} {'requests':>9} {'clients':>8} {'errors':>7} {'req/s':>7} {'p50 ms':>7} {'p95 ms':>7} "
        f"{'p99 ms':>7} {'max ms':>7} {'CPU ms':>8} {'CPU cap':>9} {'client':>6} {'app':>6} {'Ray':>6}"
    )
    lines, rates, cpu_costs = [], {}, {}
    line, rates["in process"], cpu_costs["in process"] = app_phase("app", args, images, scratch)
    lines.append(("app in process (python app.py)", line))
    for batch in (args.max_batch_size, 1):
        serve.run(
            # the same requests held by the replica at once in both phases: only the batching differs
            serve_py.build_app(
                args.model,
                batch,
                args.batch_wait_timeout_s,
                cpus_per_replica=args.cpus_per_replica,
                max_ongoing_requests=2 * args.max_batch_size,
            ),
            name="xray",
            route_prefix="/xray",
        )
        results, seconds, batches, cpu = drive_serve(url, args.model, images, args.requests, args.clients)
        mean = statistics.mean(batches) if batches else float("nan")
        lines.append(
            (
                f"Serve alone, max_batch_size={batch} (mean batch {mean:.1f})",
                with_cpu(row("serve", results, args.clients, seconds)[0], cpu, len(results)),
            )
        )
        line, rates[batch], cpu_costs[batch] = app_phase("app+serve", args, images, scratch, backend=url)
        lines.append((f"app --backend, max_batch_size={batch}", line))
    serve.delete("xray")
    line, rates["no work"], cpu_costs["no work"] = app_phase("no work", args, images, scratch, no_work=True)
    lines.append(("app answering at once (no model)", line))
    print(f"idle, Ray and Serve (controller, proxy) with no requests take {100 * idle:.0f} % of a CPU; counted below")
    print(header + "\n" + "-" * len(header))
    for name, line in lines:
        print(f"{line}   {name}")
    alone = model_cpu(args.model, images, 1, psutil.cpu_count())
    batched = model_cpu(args.model, images, args.max_batch_size, max(1, int(args.cpus_per_replica)))
    in_process = cpu_costs["in process"]
    print(
        f"\nthe model's part of an answer (forward, check, sets, Grad-CAM), CPU ms: {alone:.1f} alone (the app in "
        f"process: batch 1, {psutil.cpu_count()} threads), {batched:.1f} each in a batch of {args.max_batch_size} (the "
        f"replica). A request costs {in_process:.0f} ms of CPU in process, {cpu_costs[args.max_batch_size]:.0f} "
        f"through Serve; batching saves {alone - batched:.1f} of them, so even a hop to Serve that cost nothing "
        f"would give at most {in_process / (in_process - (alone - batched)):.2f}x the requests/s on these cores."
    )
    print(
        f"app --backend (batched) / app in process: {rates[args.max_batch_size] / rates['in process']:.2f}x "
        f"(target 1.5x); max_batch_size=1: {rates[1] / rates['in process']:.2f}x; the app answering at once (no "
        f"decode, no model): {rates['no work'] / rates['in process']:.2f}x; {load_line()}"
    )


def replicate(paths: list[Path], copies: int, folder: Path) -> list[Path]:
    """`paths` `copies` times over, each copy a link (a copy across file systems) named apart in `folder`."""
    if copies == 1:
        return paths
    replicas = []
    for copy in range(copies):
        for path in paths:  # under its own folder's name, as the table counts the originals by it
            replica = folder / f"copy-{copy}" / path.parent.name / path.name
            replica.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, replica)
            except OSError:
                shutil.copyfile(path, replica)
            replicas.append(replica)
    return replicas


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--model", default=str(SHIPPED_MODEL_DIR), help="Model folder (or Hub id) to score and serve.")
    parser.add_argument("--data", type=Path, default=SHARED_DATA, help="The shared data folder.")
    parser.add_argument("--sample", type=int, default=2976, help="Kaggle training images added to the originals.")
    parser.add_argument(
        "--copies",
        type=int,
        default=1,
        help="Score the files this many times over, each copy under its own name (links in a scratch folder): an "
        "archive large enough for a run's fixed cost to be as small a share as over the millions of files cluster "
        "scoring is for.",
    )
    parser.add_argument("--batch_size", type=int, default=16, help="Images per forward pass when scoring.")
    parser.add_argument(
        "--runtime", choices=RUNTIMES, default=DEFAULT_RUNTIME, help="What runs the model when scoring, both ways."
    )
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2], help="Ray actor pools to time.")
    parser.add_argument("--clients", type=int, default=20, help="Concurrent clients when serving.")
    parser.add_argument("--requests", type=int, default=300, help="Requests in each serving phase.")
    parser.add_argument("--timeout", type=float, default=120, help="Seconds one request may take before it errs.")
    parser.add_argument("--max_batch_size", type=int, default=8, help="serve.py's batch for the batched phase.")
    parser.add_argument("--batch_wait_timeout_s", type=float, default=0.01, help="serve.py's wait for a batch.")
    parser.add_argument("--cpus_per_replica", type=float, default=1, help="CPUs (torch threads) of the replica.")
    parser.add_argument("--skip", choices=["scoring", "serving"], help="Leave one part out.")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    paths = sample_benchmark_images(args.data / "xray_originals", args.data / "chest_xray" / "train", args.sample)
    if not paths:
        raise SystemExit(f"No images under {args.data}")
    print(
        f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{psutil.cpu_count()} CPUs; {load_line()}\n"
    )
    with tempfile.TemporaryDirectory(prefix="xray-cluster-") as scratch:
        if args.skip != "scoring":
            scoring(args, replicate(paths, args.copies, Path(scratch) / "archive"), Path(scratch))
        if args.skip != "serving":
            start_ray()
            serving(args, paths, Path(scratch))


if __name__ == "__main__":
    sys.exit(main())
