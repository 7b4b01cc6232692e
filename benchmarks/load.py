"""Load test: the served app under many concurrent clients, on loopback only, bounded in requests and time.

    python -m benchmarks.load --requests 500 --clients 20          # the shipped model; --model for another

Starts `python app.py --model M --host 127.0.0.1 --port P` as a subprocess (with its own gradio cache folder) and
drives it through gradio_client, as a script or a notebook would (over loopback HTTP, without gradio_client's
per-request TLS set-up: see `loopback_client`; --verify_tls keeps it):
  1. warm-up, then --single requests one at a time: the latency of one upload with nobody else waiting;
  2. --clients threads, each with its own Client, each sending its next image as soon as its last answer came,
     until --requests answers (or --max_seconds) are reached.
Images: the full-resolution originals in --data's xray_originals/ and a fixed sample of the 224 px Kaggle training
images in its chest_xray/train/, cycled. The overlay each answer links to is downloaded too, as
the page does.

Prints requests/s, latency percentiles and errors of both phases; the server's resident memory (psutil) after
warm-up, half-way through the load and at the end; and how the latency under load compares with one request
alone. app.py runs CONCURRENCY_LIMIT predictions at a time with a bounded queue (QUEUE_SIZE), so with C clients
always waiting, each request waits for those ahead of it: mean latency under load = C / requests per second
(Little's law), whatever the server does. The figures to watch are requests/s and an error count of 0.
--no_work serves the same app answering at once (NO_WORK_APP): the floor under every figure, whatever the model.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

from benchmarks.common import add_old_spelling, free_port, sample_benchmark_images
from cxr.models import SHIPPED_MODEL_DIR

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


# app.py with its work replaced by a ready answer (the overlay an upload of the image in argv[1] gets): the same
# Interface, queue and transport, so its latency is the floor that Gradio and gradio_client set, whatever the model.
NO_WORK_APP = """
import sys, numpy, app
from cxr.images import load_image
from cxr.labels import ID2LABEL
from cxr.saliency import saliency_overlay
overlay = saliency_overlay(load_image(sys.argv[1], draft_size=224), numpy.zeros((14, 14)))
app.answer_upload = lambda classifier, path: ("", dict(zip(ID2LABEL.values(), (0.3, 0.5, 0.2))), overlay, {})
app.main(sys.argv[2:])
"""


def start_server(
    model: str, port: int, cache: Path, log: Path, timeout: float = 180, no_work_image: Path | None = None
) -> subprocess.Popen:
    """`python app.py --model M` on loopback port `port`, once its page answers; with `no_work_image`, NO_WORK_APP."""
    env = dict(os.environ, GRADIO_TEMP_DIR=str(cache), GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    program = ["-c", NO_WORK_APP, str(no_work_image)] if no_work_image else [str(REPO / "app.py")]
    server = subprocess.Popen(
        [sys.executable, *program, "--model", model, "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"app.py exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.kill()
    raise SystemExit(f"app.py did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def rss_mib(process: psutil.Process) -> float:
    return process.memory_info().rss / 2**20


def busy_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def loopback_client(url: str, verify_tls: bool = False, **kwargs):
    """A gradio_client `Client` for an app served over plain HTTP on this machine.

    gradio_client opens a new httpx client for each of the 4 HTTP requests of a prediction (upload, join, events,
    overlay download), and each one loads the certifi CA bundle into a fresh TLS context, unless told not to
    verify certificates: a CPU cost per request that can exceed a small model's whole prediction (docs/benchmarks.md),
    and one no browser pays. Over http:// there is no TLS to verify, so `ssl_verify=False` changes nothing else.
    `verify_tls=True` keeps gradio_client's default, to see what it costs (--verify_tls).
    """
    from gradio_client import Client

    if not url.startswith(("http://127.0.0.1", "http://localhost")):
        raise ValueError(f"benchmarks drive loopback HTTP only, not {url}")
    return Client(url, verbose=False, ssl_verify=verify_tls, **kwargs)


def drive(
    url: str,
    images: list[Path],
    total: int,
    clients: int,
    max_seconds: float,
    timeout: float,
    downloads: Path,
    verify_tls: bool = False,
) -> list[tuple[float, str | None]]:
    """`total` requests from `clients` threads, each waiting for its answer before sending the next: (seconds,
    error)."""
    from gradio_client import handle_file

    numbers, lock, results = itertools.count(), threading.Lock(), []
    deadline = time.monotonic() + max_seconds

    def one_client() -> None:
        try:
            client = loopback_client(url, verify_tls, download_files=str(downloads))
        except Exception as error:  # noqa: BLE001 - counted, like any failed request
            with lock:
                results.append((0.0, f"connect: {type(error).__name__}: {str(error)[:80]}"))
            return
        while True:
            with lock:
                number = next(numbers)
            if number >= total or time.monotonic() > deadline:
                return
            start = time.perf_counter()
            try:
                client.submit(handle_file(str(images[number % len(images)])), api_name="/predict").result(
                    timeout=timeout
                )
                error = None
            except Exception as failure:  # noqa: BLE001 - the benchmark counts every kind of failure
                error = f"{type(failure).__name__}: {str(failure)[:80]}"
            with lock:
                results.append((time.perf_counter() - start, error))

    threads = [threading.Thread(target=one_client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max_seconds + timeout + 60)
    return results


def percentile(sorted_values: list[float], fraction: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, round(fraction * (len(sorted_values) - 1)))]


def row(name: str, results: list[tuple[float, str | None]], clients: int, seconds: float) -> tuple[str, list[float]]:
    ok = sorted(1000 * latency for latency, error in results if error is None)
    errors = sum(error is not None for _, error in results)
    if not ok:
        return f"{name:<8} {len(results):>9} {clients:>8} {errors:>7}   (no successful request)", ok
    return (
        f"{name:<8} {len(results):>9} {clients:>8} {errors:>7} {len(ok) / seconds:>7.2f} "
        f"{percentile(ok, 0.5):>7.0f} {percentile(ok, 0.95):>7.0f} {percentile(ok, 0.99):>7.0f} {ok[-1]:>7.0f}"
    ), ok


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--model",
        default=str(SHIPPED_MODEL_DIR),
        help="Model folder (or Hub id) app.py serves (default: the shipped one).",
    )
    parser.add_argument("--requests", type=int, default=500, help="Requests in the load phase.")
    parser.add_argument("--clients", type=int, default=20, help="Concurrent clients in the load phase.")
    parser.add_argument("--single", type=int, default=20, help="Requests sent one at a time before the load.")
    parser.add_argument("--sample", type=int, default=76, help="Kaggle training images added to the originals.")
    parser.add_argument(
        "--max_seconds", type=float, default=600, help="Stop sending new load requests after this long."
    )
    add_old_spelling(parser, "--max-seconds", "max_seconds", type=float)
    parser.add_argument(
        "--timeout", type=float, default=120, help="Seconds one request may take before it counts as an error."
    )
    parser.add_argument("--port", type=int, default=0, help="Loopback port for the app (0: a free one).")
    parser.add_argument(
        "--data", type=Path, default=SHARED_DATA, help="The shared data folder (xray_originals/, chest_xray/train/)."
    )
    parser.add_argument(
        "--no_work",
        action="store_true",
        help=(
            "Serve the same app with answer_upload() replaced by a ready answer: what Gradio, gradio_client and this "
            "machine allow whatever the model (the floor under every figure)."
        ),
    )
    parser.add_argument(
        "--verify_tls",
        action="store_true",
        help=(
            "gradio_client's default: load the CA bundle for every HTTP request, though loopback HTTP has no TLS (see "
            "loopback_client)."
        ),
    )
    return parser


def main() -> None:
    args = build_parser().parse_args()

    images = sample_benchmark_images(args.data / "xray_originals", args.data / "chest_xray" / "train", args.sample)
    if not images:
        raise SystemExit(f"No images under {args.data}")
    args.port = args.port or free_port()
    url = f"http://127.0.0.1:{args.port}/"

    with tempfile.TemporaryDirectory(prefix="xray-load-") as scratch:
        scratch = Path(scratch)
        server = start_server(
            args.model,
            args.port,
            scratch / "server-cache",
            scratch / "server.log",
            no_work_image=images[0] if args.no_work else None,
        )
        process = psutil.Process(server.pid)
        samples: list[tuple[float, float]] = []  # (seconds since the load began, RSS MiB)
        try:
            import app

            served = (
                "app.py answering at once (--no_work: a ready answer, no model run)"
                if args.no_work
                else f"{args.model}"
            )
            print(
                f"Load test of {served} at {url} (app.py: {app.CONCURRENCY_LIMIT} predictions at a time, queue of "
                f"{app.QUEUE_SIZE})"
            )
            originals = sum(path.parent.name == "xray_originals" for path in images)
            print(
                f"{len(images)} images, cycled: {originals} full-resolution originals + {len(images) - originals} "
                "Kaggle training images (224 px)"
            )
            print(
                f"machine: {psutil.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} before the run; clients "
                "run in this process\n"
            )

            # warm-up: first calls allocate and pick kernels
            drive(url, images[:3], 3, 1, 120, args.timeout, scratch / "downloads", args.verify_tls)
            start = time.perf_counter()
            single = drive(
                url, images, args.single, 1, args.max_seconds, args.timeout, scratch / "downloads", args.verify_tls
            )
            single_seconds = time.perf_counter() - start
            rss_warm = rss_mib(process)

            stop = threading.Event()
            cpu_before = busy_seconds(process), busy_seconds(psutil.Process())
            load_start = time.perf_counter()

            def watch() -> None:
                while not stop.wait(0.25):
                    samples.append((time.perf_counter() - load_start, rss_mib(process)))

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            load = drive(
                url,
                images,
                args.requests,
                args.clients,
                args.max_seconds,
                args.timeout,
                scratch / "downloads",
                args.verify_tls,
            )
            load_seconds = time.perf_counter() - load_start
            cpu_server, cpu_clients = (
                busy_seconds(process) - cpu_before[0],
                busy_seconds(psutil.Process()) - cpu_before[1],
            )
            stop.set()
            watcher.join()
            rss_end = rss_mib(process)
            cache_sizes = [path.stat().st_size for path in (scratch / "server-cache").rglob("*") if path.is_file()]
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()

    header = (
        f"{'phase':<8} {'requests':>9} {'clients':>8} {'errors':>7} {'req/s':>7} {'p50 ms':>7} {'p95 ms':>7} "
        f"{'p99 ms':>7} {'max ms':>7}"
    )
    print(header + "\n" + "-" * len(header))
    single_line, single_ok = row("single", single, 1, single_seconds)
    load_line, load_ok = row("load", load, args.clients, load_seconds)
    print(single_line + "\n" + load_line + "\n")

    quarters = [samples[len(samples) * quarter // 4][1] if samples else float("nan") for quarter in (1, 2, 3)]
    peak = max((rss for _, rss in samples), default=float("nan"))
    print(
        f"server RSS (MiB): {rss_warm:.0f} after warm-up; {', '.join(f'{rss:.0f}' for rss in quarters)} a quarter, "
        f"half and three quarters through the load; {rss_end:.0f} at the end (peak {peak:.0f})"
    )
    print(f"                  growth over the second half of the load: {rss_end - quarters[1]:+.0f} MiB")
    print(
        f"server cache at the end: {len(cache_sizes)} files, {cache_sizes.count(0)} of them empty "
        f"(app.DELETE_CACHE = {app.DELETE_CACHE}: uploads go once older than {app.DELETE_CACHE[1]} s)"
    )
    answered = max(len(load), 1)
    print(
        f"CPU time per load request: server {1000 * cpu_server / answered:.0f} ms, the {args.clients} clients (this "
        f"process) {1000 * cpu_clients / answered:.0f} ms; {psutil.cpu_count()} CPUs x {load_seconds:.0f} s = "
        f"{psutil.cpu_count() * load_seconds:.0f} CPU-s available, {cpu_server + cpu_clients:.0f} CPU-s used by server "
        "and clients"
    )
    errors = {}
    for _, error in single + load:
        if error:
            errors[error] = errors.get(error, 0) + 1
    print("errors: " + ("none" if not errors else "; ".join(f"{count} x {kind}" for kind, count in errors.items())))
    if single_ok and load_ok:
        single_p50, load_p95 = statistics.median(single_ok), percentile(load_ok, 0.95)
        service = 1000 * load_seconds / max(len(load_ok), 1)
        print(
            f"\nload p95 / single p50 = {load_p95 / single_p50:.1f}x (target under 5x). With {args.clients} clients "
            f"always waiting and {app.CONCURRENCY_LIMIT} predictions at a time, each request waits for the others: "
            f"Little's law gives a mean latency of {args.clients} x {service:.0f} ms (the measured time per answer "
            f"under load) = {args.clients * service:.0f} ms; measured mean {statistics.mean(load_ok):.0f} ms. "
            f"Throughput under load is {1000 / service:.2f} req/s against {1000 / single_p50:.2f} req/s for one client "
            "alone."
        )


if __name__ == "__main__":
    main()
