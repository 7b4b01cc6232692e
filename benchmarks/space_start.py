"""Start the assembled Space as Hugging Face Spaces starts it, in a fresh virtual environment, and time it.

    python -m benchmarks.space_start                                  # the shipped model, bundled in the Space
    python -m benchmarks.space_start --model_id test-org/swiftformer-xray # the same folder served as a Hub model

Steps: assemble the Space (`python -m cxr.space`: the shipped model bundled, or with --model_id a Hub id whose model
folder is laid into a Hugging Face cache as `preload_from_hub` leaves it), create a virtual environment with only the
Space's requirements.txt, run the front matter's app_file from the Space folder with the environment a Space gets
(HF_HUB_OFFLINE=1, HF_HUB_CACHE, GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, no XRAY_MODEL), then ask it for each
example with gradio_client. Prints the install time, the start time (process start to the page answering) and the
answers.
Where the requirements name a package index this machine cannot reach (PyTorch's CPU index), the same pins are
installed from the indexes pip is configured with, and the output says so. tests/test_space.py runs the same
start with the test environment's Python in CI; this script adds the fresh environment.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

from benchmarks.common import free_port
from cxr.models import SHIPPED_MODEL_DIR

REPO = Path(__file__).resolve().parents[1]


def reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the URL's host opens (pip would otherwise wait out its timeouts on it)."""
    parts = urllib.parse.urlparse(url)
    try:
        with socket.create_connection((parts.hostname, parts.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def space_environment(hub_cache: Path, port: int, temp_dir: Path, host: str = "127.0.0.1") -> dict[str, str]:
    """The environment a Space's app gets (the cache preload_from_hub filled, no XRAY_MODEL: the model comes from the
    front matter or the bundled folder), offline."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("GRADIO_", "XRAY_", "HF_"))}
    return env | {
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(hub_cache),
        "GRADIO_SERVER_NAME": host,
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_TEMP_DIR": str(temp_dir),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "PYTHONUNBUFFERED": "1",
    }


def start_space(
    python: str, space_dir: Path, env: dict[str, str], log: Path, timeout: float = 300
) -> tuple[subprocess.Popen, float]:
    """`python APP_FILE` in `space_dir`, the app_file its README's front matter names (no arguments: a Space passes
    none); returns the process once its page answers, and the seconds that took. Raises RuntimeError with the log's
    tail if it exits or does not answer in time."""
    import httpx
    from huggingface_hub import metadata_load

    url = f"http://127.0.0.1:{env['GRADIO_SERVER_PORT']}/"
    began = time.monotonic()
    server = subprocess.Popen(
        [python, metadata_load(space_dir / "README.md")["app_file"]],
        cwd=space_dir,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    while time.monotonic() - began < timeout:
        if server.poll() is not None:
            raise RuntimeError(f"app.py exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return server, time.monotonic() - began
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    server.kill()
    raise RuntimeError(f"app.py did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()


def install(venv: Path, requirements: Path) -> tuple[float, str]:
    """A fresh virtual environment at `venv` with `requirements` installed; returns (seconds, a note on the index)."""
    lines = requirements.read_text().splitlines()
    indexes = [line.split()[-1] for line in lines if line.startswith(("--extra-index-url", "--index-url"))]
    unreachable = [url for url in indexes if not reachable(url)]
    note = "installed from the indexes the requirements name"
    if unreachable:
        note = (
            f"{', '.join(unreachable)} is not reachable from this machine: installed the same pins from the indexes "
            "pip is configured with here (pip config list), without that line"
        )
    filtered = venv.parent / "requirements-reachable.txt"
    filtered.write_text("\n".join(line for line in lines if not any(url in line for url in unreachable)) + "\n")
    began = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "-r", str(filtered)], check=True)
    return time.monotonic() - began, note


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model_dir", type=Path, default=SHIPPED_MODEL_DIR, help="With --model_id: the folder served under that id."
    )
    parser.add_argument(
        "--model_id",
        default=None,
        help="Serve --model_dir as this Hub id (only in the local cache). Default: the shipped model, bundled.",
    )
    parser.add_argument(
        "--work_dir",
        type=Path,
        default=None,
        help="Where the Space, cache and environment go. Default: a new temporary folder.",
    )
    parser.add_argument(
        "--python", default=None, help="Start with this Python instead of a fresh environment (what the CI test does)."
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if not (args.model_dir / "config.json").is_file():
        raise SystemExit(f"--model_dir: no model folder at {args.model_dir} (train one: see the README).")

    from gradio_client import Client, handle_file

    from benchmarks.common import fill_hub_cache
    from cxr.space import assemble

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="space-start-"))
    work.mkdir(parents=True, exist_ok=True)
    space = work / "space"
    files = assemble(args.model_id, space, overwrite=True)
    served = args.model_id or "the bundled model"
    print(f"Space folder {space}: {len(files)} files; requirements:")
    print(
        "  "
        + "\n  ".join(
            line for line in (space / "requirements.txt").read_text().splitlines() if line and not line.startswith("#")
        )
    )
    if args.model_id:
        fill_hub_cache(work / "hub", args.model_id, args.model_dir)

    python = args.python
    if python is None:
        venv = work / "venv"
        seconds, note = install(venv, space / "requirements.txt")
        print(f"Fresh environment {venv}: {seconds:.0f} s to create and install ({note}).")
        python = str(venv / "bin" / "python")
    temp_dir = work / "gradio-tmp"
    temp_dir.mkdir(exist_ok=True)
    env = space_environment(work / "hub", free_port(), temp_dir)
    server, seconds = start_space(python, space, env, work / "app.log")
    try:
        print(
            f"Start: {seconds:.1f} s from `python app.py` to the page answering ({served}, HF_HUB_OFFLINE=1, "
            "no XRAY_MODEL)."
        )
        client = Client(f"http://127.0.0.1:{env['GRADIO_SERVER_PORT']}/", verbose=False, ssl_verify=False)
        for example in sorted((space / "examples").glob("*.jpeg")):
            began = time.monotonic()
            warning, label, _, check = client.predict(handle_file(str(example)), api_name="/predict")
            answer = ", ".join(f"{item['label']} {item['confidence']:.3f}" for item in label["confidences"])
            sets = (check.get("prediction_sets") or {}).get("95%")
            print(
                f"{example.name} ({time.monotonic() - began:.2f} s): {answer}; looks like a chest X-ray: "
                f"{check['looks_like_chest_xray']}; 95% set: {sets}"
            )
            if warning:
                print("  with the warning: " + warning.splitlines()[0])
    finally:
        stop(server)


if __name__ == "__main__":
    main()
