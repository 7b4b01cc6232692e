"""load_image(..., isolate=True): strangers' files are decoded in worker processes started once (fresh interpreters,
never a fork of the server), capped in time and memory, whose answers are checked and can never run code here."""

import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr.images import DecodeWorkers, ImageLoadError, load_image
from inputs import chest_like, compressed_dicom, dicom_bytes, encode

REPO = Path(__file__).resolve().parents[1]
PNG = encode(Image.fromarray(chest_like(), "L"), "PNG")


def worker(body: str) -> list[str]:
    """A worker command whose decode is replaced: `body` runs after `import cxr.images as images`, before the loop."""
    code = "import os, sys, time, pickle\nimport cxr.images as images\n" + textwrap.dedent(body)
    return [sys.executable, "-c", code + "\nimages.serve_decodes(images.DECODE_MEMORY)"]


def raw_worker(body: str) -> list[str]:
    """A worker that skips the real loop: after the ready mark and the request, it writes whatever `body` writes to
    `out` (what a decoder that took over its process could send)."""
    code = textwrap.dedent(
        """
        import os, sys, pickle, struct
        import cxr.images as images
        out = sys.stdout.buffer
        out.write(images.WORKER_READY); out.flush()
        header = sys.stdin.buffer.read(images.REQUEST.size)
        _, _, _, name_length, data_length = images.REQUEST.unpack(header)
        sys.stdin.buffer.read(name_length + data_length)
        """
    )
    return [sys.executable, "-c", code + textwrap.dedent(body) + "\nout.flush()\nsys.stdin.buffer.read()"]


@pytest.fixture
def pool_of():
    pools = []

    def make(command=None, **options):
        pools.append(DecodeWorkers(1, command=command, **options))
        return pools[-1]

    yield make
    for pool in pools:
        pool.close()


def test_isolated_decode_gives_the_same_pixels():
    jpeg = encode(Image.fromarray(chest_like(), "L"), "JPEG")
    dicom = compressed_dicom(dicom_bytes(chest_like().astype(np.uint16) * 16), "1.2.840.10008.1.2.4.80")
    for data in (jpeg, dicom, PNG):
        assert np.array_equal(np.asarray(load_image(data, isolate=True)), np.asarray(load_image(data)))
    with pytest.raises(ImageLoadError, match="not an image this app reads"):  # its errors come back as they are
        load_image(b"%!PS-Adobe-3.0 EPSF-3.0\n", isolate=True)


def test_a_stuck_decode_is_stopped_at_the_time_cap_and_its_worker_replaced(pool_of, monkeypatch):
    import cxr.images

    pool = pool_of(worker("images._decode_file = lambda *args: time.sleep(30) if args[2] == 'stuck' else None"))
    monkeypatch.setattr(cxr.images, "DECODE_SECONDS", 1.0)
    started = time.monotonic()
    with pytest.raises(ImageLoadError, match="stuck took longer than 1 s"):
        pool.decode(PNG, False, "stuck", None)
    assert time.monotonic() - started < 5
    with pytest.raises(ImageLoadError, match="fine cannot be decoded"):  # the replacement answers the next request
        pool.decode(PNG, False, "fine", None)


def test_a_decode_over_the_memory_cap_is_refused(pool_of):
    pool = pool_of(memory=64 * 2**20)
    big = encode(Image.new("RGB", (6000, 6000)), "PNG")  # 36 MP of RGB: 137 MiB as Pillow holds it
    with pytest.raises(ImageLoadError, match="needs more than 64 MiB|stopped its decoder"):
        pool.decode(big, False, "big.png", None)
    assert pool.decode(PNG, False, "small.png", None).size == (300, 240)  # and the worker still serves


def test_a_decoder_crash_is_a_clear_error_and_the_next_upload_is_served(pool_of):
    import signal  # noqa: F401 (used in the worker)

    pool = pool_of(worker("images._decode_file = lambda *args: os.kill(os.getpid(), 9)"))
    for _ in range(2):  # each crash costs a worker, never the pool
        with pytest.raises(ImageLoadError, match="stopped its decoder"):
            pool.decode(PNG, False, "crash.png", None)


def test_a_pickle_from_the_worker_is_refused_and_runs_nothing(pool_of, tmp_path):
    """What the old fork path read (an 8-byte length, then pickle.loads): a payload that runs a command when
    unpickled. The server refuses it as out of protocol, and the command never runs."""
    marker = tmp_path / "ran"
    pool = pool_of(
        raw_worker(
            f"""
            class Payload:
                def __reduce__(self):
                    return (os.system, ("touch {marker}",))
            payload = pickle.dumps(Payload())
            out.write(len(payload).to_bytes(8, "little") + payload + bytes(64))
            """
        )
    )
    with pytest.raises(ImageLoadError, match="answer was refused"):
        pool.decode(PNG, False, "upload", None)
    time.sleep(0.2)
    assert not marker.exists()


def test_a_header_over_the_budget_is_refused_before_allocation(pool_of):
    # 20,000 x 20,000 RGB: 1.2 GB claimed, no body sent; the worker then waits.
    pool = pool_of(raw_worker("out.write(images.REPLY.pack(images.REPLY_MAGIC, 0, 3, 20000, 20000, 1_200_000_000))"))
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(ImageLoadError, match="20000 x 20000 px, outside the limits"):
            pool.decode(PNG, False, "upload", None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20 and time.monotonic() - started < 2  # refused at once, without waiting for a body


@pytest.mark.parametrize(
    ("length", "tail", "message"),
    [
        (300 * 240 * 3, b"", "out of protocol|stopped its decoder"),  # header right, then 100 bytes short
        (300 * 240 * 3 - 100, b"", "bytes of pixels where 300 x 240 x 3 needs"),  # header and body 100 short
        (300 * 240 * 3, b"x" * 100, "out of protocol"),  # 100 bytes more than the header says
    ],
    ids=["body-short", "header-short", "body-long"],
)
def test_a_body_that_differs_from_its_header_is_refused(pool_of, length, tail, message):
    pixels = 300 * 240 * 3
    body = f"bytes({min(length, pixels) - (100 if length == pixels and not tail else 0)})"
    pool = pool_of(
        raw_worker(
            f"""
            out.write(images.REPLY.pack(images.REPLY_MAGIC, 0, 3, 300, 240, {length}))
            out.write({body} + {tail!r} + images.REPLY_END)
            out.flush(); out.close()
            """
        )
    )
    with pytest.raises(ImageLoadError, match=message):
        pool.decode(PNG, False, "upload", None)


def test_workers_import_no_torch_or_gradio():
    code = "import sys, cxr.images, pydicom.pixels; print(sorted({'torch', 'gradio'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


LOCK_UP = """
import threading, time, torch, numpy, io
from PIL import Image
from cxr.images import load_image

def matmuls():  # what the model does for another user meanwhile
    a = torch.randn(256, 256)
    while time.monotonic() < stop:
        torch.mm(a, a).sum().item()

png = io.BytesIO(); Image.fromarray(numpy.full((240, 300), 128, numpy.uint8)).save(png, "PNG")
answers = []
def decodes():
    for _ in range(25):
        answers.append(load_image(png.getvalue(), isolate=True).size)

stop = time.monotonic() + 60
threads = [threading.Thread(target=matmuls) for _ in range(2)] + [threading.Thread(target=decodes) for _ in range(4)]
for thread in threads[2:] + threads[:2]:
    thread.start()
for thread in threads[2:]:
    thread.join()
stop = 0
print(len(answers), set(answers))
"""


def test_isolated_decodes_beside_torch_threads_do_not_lock_up():
    """The lock-up users met: decodes isolated while other threads run torch. A fork of this threaded process could
    wedge for good (issue: the demo locks up under concurrent users); fresh workers never do."""
    result = subprocess.run(
        [sys.executable, "-c", LOCK_UP], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[0] == "100"
