"""Canaries for cxr/workarounds.py: each runs the library's STOCK behaviour and asserts it is still broken. When one
fails, upstream has fixed it: delete the workaround (and its canary). Then the pins: the private `Trainer` methods
that weight averaging overrides or calls, whose signatures a transformers upgrade may change."""

import inspect
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Trainer, TrainingArguments, ViTMAEConfig, ViTMAEForPreTraining

from cxr import workarounds
from cxr.models import PRESETS, build_model

REPO = Path(__file__).resolve().parents[1]
ID2LABEL = {0: "Bacterial pneumonia", 1: "Normal", 2: "Viral pneumonia"}


@pytest.fixture
def saved_vit(tmp_path):
    """A scratch-tiny ViT saved by `save_pretrained` (as in a Trainer checkpoint) and a fresh one to load it into."""
    torch.manual_seed(0)
    saved, _, _ = build_model("scratch-tiny", ID2LABEL)
    saved.save_pretrained(tmp_path / "checkpoint-1")
    torch.manual_seed(1)
    fresh, _, _ = build_model("scratch-tiny", ID2LABEL)
    return tmp_path / "checkpoint-1", saved.state_dict(), fresh


def differing(model, expected: dict) -> list[str]:
    return [name for name, value in expected.items() if not torch.equal(model.state_dict()[name], value)]


@pytest.mark.parametrize("reload", ["_load_from_checkpoint", "_load_best_model"])
def test_canary_stock_trainer_reload_still_skips_the_vit_encoder_weights(saved_vit, tmp_path, reload):
    """huggingface/transformers#43701, #48805 (fix proposed in #48822), transformers 5.23: CheckpointReloadFix."""
    checkpoint, expected, fresh = saved_vit
    trainer = Trainer(model=fresh, args=TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none"))
    trainer.state.best_model_checkpoint = str(checkpoint)
    getattr(trainer, reload)(*([str(checkpoint)] if reload == "_load_from_checkpoint" else []))
    skipped = differing(fresh, expected)
    assert any(".layer" in name or "layers." in name for name in skipped), (
        f"Trainer.{reload} now restores every weight: delete CheckpointReloadFix from cxr/workarounds.py"
    )


@pytest.mark.parametrize("reload", ["_load_from_checkpoint", "_load_best_model"])
def test_the_reload_fix_restores_every_weight(saved_vit, tmp_path, reload):
    checkpoint, expected, fresh = saved_vit

    class FixedTrainer(workarounds.CheckpointReloadFix, Trainer):
        pass

    trainer = FixedTrainer(model=fresh, args=TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none"))
    trainer.state.best_model_checkpoint = str(checkpoint)
    getattr(trainer, reload)(*([str(checkpoint)] if reload == "_load_from_checkpoint" else []))
    assert differing(fresh, expected) == []


def torn_reads(save, folder: Path, seconds: float = 20.0) -> set[int]:
    """Sizes read from one cached overlay while `save` writes the identical image again and again, other than its size;
    stops at the first torn read (or after `seconds`)."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 500, 3), dtype=np.uint8))
    path = Path(save(image, str(folder), format="jpeg"))
    size, stop, torn = path.stat().st_size, threading.Event(), set()

    def answer_again_and_again():
        while not stop.is_set():
            save(image, str(folder), format="jpeg")

    writer = threading.Thread(target=answer_again_and_again)
    writer.start()
    try:
        deadline = time.monotonic() + seconds
        while not torn and time.monotonic() < deadline:
            torn |= {len(path.read_bytes()) for _ in range(200)} - {size}
    finally:
        stop.set()
        writer.join()
    return torn


def test_canary_stock_gradio_save_pil_to_cache_still_rewrites_a_shared_file_in_place(tmp_path):
    """Gradio 6.31 (no upstream issue found): install_gradio_cache_patch."""
    assert torn_reads(workarounds.stock_save_pil_to_cache(), tmp_path), (
        "Gradio's own save_pil_to_cache no longer tears a file being read: delete its patch from cxr/workarounds.py"
    )


def test_the_gradio_patch_is_installed_by_the_demo_not_by_importing_the_app(tiny_model_dir, monkeypatch):
    check = (
        "import gradio.processing_utils as p, app, cxr.workarounds as w; "
        "assert p.save_pil_to_cache is not w.save_pil_to_cache"
    )
    imported = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True)
    assert imported.returncode == 0, imported.stderr[-2000:]

    import gradio.processing_utils

    import app

    stock = workarounds.stock_save_pil_to_cache()
    monkeypatch.setattr(gradio.processing_utils, "save_pil_to_cache", stock)
    app.build_demo(str(tiny_model_dir), examples=None)
    app.build_demo(str(tiny_model_dir), examples=None)  # idempotent: the stock function is still the one recorded
    assert gradio.processing_utils.save_pil_to_cache is workarounds.save_pil_to_cache
    assert workarounds.stock_save_pil_to_cache() is stock


def test_canary_stock_vitmae_still_leaves_its_position_tables_at_zero():
    """transformers 5.23 (no upstream issue found): add_mae_position_tables."""
    model = ViTMAEForPreTraining(ViTMAEConfig(**PRESETS["scratch-tiny"][1]))
    tables = (model.vit.embeddings.position_embeddings, model.decoder.decoder_pos_embed)
    assert not any(table.any() for table in tables), (
        "ViTMAEForPreTraining now fills its position tables: delete add_mae_position_tables from cxr/workarounds.py"
    )


# The private Trainer methods cxr/averaging.py overrides or calls, with the parameters it relies on.
PINNED = {
    "_maybe_log_save_evaluate": [
        "self",
        "tr_loss",
        "grad_norm",
        "model",
        "trial",
        "epoch",
        "ignore_keys_for_eval",
        "start_time",
        "learning_rate",
    ],
    "_save_checkpoint": ["self", "model", "trial"],
    "_get_output_dir": ["self", "trial"],
    "_load_from_checkpoint": ["self", "resume_from_checkpoint", "model"],
    "_load_best_model": ["self"],
    "compute_loss": ["self", "model", "inputs", "return_outputs", "num_items_in_batch"],  # public; cxr/distillation.py
}


@pytest.mark.parametrize("method", PINNED)
def test_pin_the_trainer_methods_the_mixins_override(method):
    assert list(inspect.signature(getattr(Trainer, method)).parameters) == PINNED[method], (
        f"Trainer.{method} changed: check cxr/averaging.py, cxr/distillation.py and cxr/workarounds.py against it"
    )
