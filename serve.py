"""Serve the model on Ray Serve: model replicas behind one URL, concurrent requests batched into one forward pass.

    pip install -r requirements-cluster.txt
    python serve.py --model models/swiftformer-xray --port 8000       # starts Ray here; serves until Ctrl-C
    python app.py --model models/swiftformer-xray --backend http://127.0.0.1:8000/   # the page, predicting there
    python serve.py --address auto --host 0.0.0.0 --max_replicas 8     # on a running Ray cluster (docs/scaling.md)

Each replica loads the model folder once and answers up to --max_batch_size waiting requests with one call of
`cxr.predictor.classify_pixels` (probabilities, the chest X-ray check, the prediction sets and Grad-CAM: what app.py
computes in process). Serve adds replicas, up to --max_replicas, while each has more than a batch of requests waiting,
and answers 503 (the page: "busy") beyond --max_queued_requests. The request and the answer are cxr/serving.py's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle torch threads sleep instead of spinning: see app.py

import numpy as np  # noqa: E402 (after the environment setting above)
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, PlainTextResponse, Response  # noqa: E402

from cxr.models import SHIPPED_MODEL_DIR  # noqa: E402
from cxr.predictor import ModelNotFoundError, classify_pixels, load_classifier, model_fingerprint  # noqa: E402
from cxr.serving import answer_of, decode_pixels  # noqa: E402


def build_app(
    model: str,
    max_batch_size: int = 8,
    batch_wait_timeout_s: float = 0.01,
    min_replicas: int = 1,
    max_replicas: int = 1,
    cpus_per_replica: float = 1,
    max_queued_requests: int = 64,
    max_ongoing_requests: int | None = None,
):
    """The deployment, bound to `model`, with its batching, autoscaling and queue limits (a `serve.Application` for
    `serve.run`). `max_ongoing_requests` (requests a replica holds at once) is twice the batch unless given: a replica
    runs a batch and gathers the next meanwhile; Serve's default of 5 would cap the batches at 5."""
    from ray import serve  # here, so that the rest of the project, and --help, run without Ray

    @serve.deployment(
        max_ongoing_requests=max_ongoing_requests or 2 * max_batch_size,
        max_queued_requests=max_queued_requests,
        autoscaling_config={
            "min_replicas": min_replicas,
            "max_replicas": max_replicas,
            "target_ongoing_requests": max_batch_size,
        },
        ray_actor_options={"num_cpus": cpus_per_replica},  # Ray gives each replica that many torch threads
    )
    class XrayModel:
        """One replica: the model folder loaded once; requests gathered into batches (`predict_batch`)."""

        def __init__(self, model: str):
            self.classifier = load_classifier(model)
            self.fingerprint = model_fingerprint(model)
            self.labels = len(self.classifier.model.config.id2label)
            # one image's pixels as this folder's processor makes them: what a request must hold
            probe = self.classifier.image_processor(Image.new("RGB", (64, 64)), return_tensors="pt")["pixel_values"]
            self.shape = tuple(probe.shape[1:])

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s)
        async def predict_batch(self, images: list[np.ndarray]) -> list[dict]:
            pixel_values = torch.from_numpy(np.stack(images))
            # in a thread, so the replica's event loop keeps gathering the next batch while this one runs
            predictions = await asyncio.to_thread(
                classify_pixels, self.classifier, pixel_values, [""] * len(images), top_k=self.labels, saliency=True
            )
            return [answer_of(prediction, self.fingerprint) | {"batch": len(images)} for prediction in predictions]

        async def __call__(self, request: Request) -> Response:
            try:
                pixels = decode_pixels(await request.body(), self.shape)
            except ValueError as error:
                return PlainTextResponse(str(error), status_code=400)
            return JSONResponse(await self.predict_batch(pixels))

    return XrayModel.bind(model)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--model",
        default=str(SHIPPED_MODEL_DIR),
        help="Model folder written by train_vit.py, or a Hub id; on a cluster, a path every node can read. "
        "Default: the model that ships with the code. The app's --model must be the same folder.",
    )
    parser.add_argument(
        "--address",
        default=None,
        help="A running Ray cluster to serve on (auto: the one on this machine). Default: start Ray here.",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="Address to listen on; 0.0.0.0 for an app on another machine."
    )
    parser.add_argument(
        "--port", type=int, default=8000, help="Port: app.py --backend http://HOST:PORT/ sends its predictions there."
    )
    parser.add_argument("--max_batch_size", type=int, default=8, help="Requests one forward pass answers at most.")
    parser.add_argument(
        "--batch_wait_timeout_s",
        type=float,
        default=0.01,
        help="Seconds a replica waits for a batch to fill before it runs what it has.",
    )
    parser.add_argument("--min_replicas", type=int, default=1, help="Model replicas kept running.")
    parser.add_argument("--max_replicas", type=int, default=1, help="Model replicas Serve may add while requests wait.")
    parser.add_argument("--cpus_per_replica", type=float, default=1, help="CPUs (torch threads) each replica takes.")
    parser.add_argument(
        "--max_queued_requests",
        type=int,
        default=64,
        help="Requests waiting beyond this are answered 503 at once (the page says the server is busy).",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import ray
        from ray import serve
    except ImportError as error:
        print(f"serve.py needs Ray ({error}): pip install -r requirements-cluster.txt", file=sys.stderr)
        return 1
    try:
        load_classifier(args.model)  # a missing or broken folder is a message here, before Ray starts
    except ModelNotFoundError as error:
        print(error, file=sys.stderr)
        return 1
    ray.init(address=args.address)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(
        build_app(
            args.model,
            args.max_batch_size,
            args.batch_wait_timeout_s,
            args.min_replicas,
            args.max_replicas,
            args.cpus_per_replica,
            args.max_queued_requests,
        ),
        name="xray",
        route_prefix="/",
    )
    print(f"Serving {args.model} at http://{args.host}:{args.port}/ (python app.py --backend URL); Ctrl-C stops it.")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
