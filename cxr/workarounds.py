"""Every place the project replaces a private function of a library, each with the upstream issue and the version
it was seen on. tests/test_workarounds.py runs the stock behaviour of each and fails once upstream behaves: then
delete the workaround here (and its canary).

- `CheckpointReloadFix`: Trainer's checkpoint reloads, transformers 5.23.
- `install_gradio_cache_patch`: Gradio's `processing_utils.save_pil_to_cache`, Gradio 6.31.
- `add_mae_position_tables`: ViTMAE's fixed position tables in a model built from a config, transformers 5.23.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class CheckpointReloadFix:
    """A `Trainer` mixin: checkpoint reloads (`resume_from_checkpoint`, `load_best_model_at_end`) go through
    `from_pretrained`, then the weights are copied in strictly.

    transformers 5.23's Trainer reloads with a raw `load_state_dict(strict=False)`, while `save_pretrained` writes
    ViT weights under their legacy names (`vit.encoder.layer.*`, the model calls them `vit.layers.*`): every encoder
    weight is silently skipped, so resume restarts from random weights and "best model" is really the last one.
    Upstream: huggingface/transformers#43701 (resume_from_checkpoint key mismatch, open), #48805 and its fix
    #48822 (apply weight conversions when resuming, open). `from_pretrained` applies the renaming."""

    def _load_weights(self, checkpoint: str) -> None:
        model = self.accelerator.unwrap_model(self.model)
        reloaded = type(model).from_pretrained(checkpoint, dtype=next(model.parameters()).dtype)
        model.load_state_dict(reloaded.state_dict(), strict=True)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        self._load_weights(resume_from_checkpoint)

    def _load_best_model(self):
        self._load_weights(self.state.best_model_checkpoint)


def save_pil_to_cache(image, cache_dir: str, name: str = "image", format: str = "webp") -> str:
    """Gradio's `processing_utils.save_pil_to_cache`, made safe for identical answers at the same time.

    Gradio 6.31 names a cached image after the hash of its bytes and rewrites that file in place on every answer, so a
    download of one user's overlay can read it truncated by another's identical answer (no upstream issue found;
    docs/deployment.md has the load test that showed it). An existing copy is reused; a new one is written under a
    temporary name and renamed into place, as Gradio's own `save_file_to_cache` does."""
    from gradio import processing_utils

    data = processing_utils.encode_pil_to_bytes(image, format)
    folder = Path(cache_dir) / processing_utils.hash_bytes(data)
    folder.mkdir(exist_ok=True, parents=True)
    path = (folder / f"{name}.{format}").resolve()
    if path.exists():
        os.utime(path)  # the cache clean-up ages files by their time: this answer needs the copy for a while yet
        return str(path)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{name}.", delete=False) as staging:
        staging.write(data)
    os.replace(staging.name, path)
    return str(path)


_STOCK: dict[str, object] = {}  # library functions as they were before a patch replaced them (for the canaries)


def install_gradio_cache_patch() -> None:
    """Make Gradio save output images with `save_pil_to_cache` above; idempotent. Called by the app's demo builder,
    not at import, so importing the app (tests, benchmarks) leaves Gradio as it is."""
    from gradio import processing_utils

    if processing_utils.save_pil_to_cache is not save_pil_to_cache:
        _STOCK["save_pil_to_cache"] = processing_utils.save_pil_to_cache
        processing_utils.save_pil_to_cache = save_pil_to_cache  # gr.Image outputs call it through this module attribute


def stock_save_pil_to_cache():
    """Gradio's own `save_pil_to_cache`, whether or not the patch is installed."""
    from gradio import processing_utils

    return _STOCK.get("save_pil_to_cache", processing_utils.save_pil_to_cache)


def add_mae_position_tables(model) -> None:
    """Fill a `ViTMAEForPreTraining`'s fixed sin-cos position tables, which transformers 5.23 leaves at zero in a model
    built from a config (its weight init skips the encoder's table and zeroes the decoder's; no upstream issue found).
    Without them no patch knows where it is and the decoder paints every hidden patch the same grey."""
    embeddings = model.vit.embeddings
    embeddings.patch_embeddings.projection._is_hf_initialized = False  # else initialize_weights returns at once
    embeddings.initialize_weights()  # encoder: sin-cos table, patch projection and class token as in the MAE paper
    model.decoder.initialize_weights(embeddings.patch_embeddings.num_patches)  # decoder: sin-cos table and mask token
