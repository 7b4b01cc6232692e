"""Pretrain a ViT on the training X-rays themselves by masked autoencoding (MAE): the offline stand-in for ImageNet
weights.

    python pretrain_mae.py --data_dir ~/Downloads/chest_xray                 # writes outputs/mae-encoder
    python train_vit.py --data_dir ~/Downloads/chest_xray --recipe vit-mae   # fine-tunes it
                                                                             # (README, "Train on the real X-rays")

`ViTMAEForPreTraining` hides most of each image's patches and learns to paint them back from the rest; no labels are
used. It predicts raw pixels; the MAE paper's per-patch normalised targets are an option (--norm_pix_loss).

It sees only the training split: the same patient-grouped split (by --split_seed) that `train_vit.py` validates on,
so the validation scores stay honest. The encoder is saved as a plain ViT folder (config, safetensors weights,
image processor) that `train_vit.py --model FOLDER` fine-tunes with a new 3-class head. Its pretraining.json says how
it was made, and the fine-tuned model's card and metrics.json repeat it. Also written: reconstructions.png, a few
validation X-rays with their hidden patches painted back. Run with --help for every option.
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from transformers import (
    HfArgumentParser,
    TrainingArguments,
    ViTConfig,
    ViTMAEConfig,
    ViTMAEForPreTraining,
    ViTModel,
    set_seed,
)

from cxr.folders import write_text_atomic
from cxr.models import DEFAULT_ENCODER_DIR, PRESETS, PRETRAINING_FILE, preset_image_processor
from cxr.training import XrayTrainer, check_writable, checkpoint_to_resume, peak_memory_mib
from cxr.transforms import pixel_transform
from cxr.workarounds import add_mae_position_tables
from hf_data.loading import DataArguments, prepare_and_load

VIT_PRESETS = [name for name, (config_class, _) in PRESETS.items() if config_class is ViTConfig]


@dataclass
class MaeArguments:
    model: str = field(
        default="scratch-small-p8", metadata={"help": f"The ViT preset to pretrain: {', '.join(VIT_PRESETS)}."}
    )
    mask_ratio: float = field(
        default=0.75,
        metadata={"help": "Share of each image's patches hidden from the encoder and painted back by the decoder."},
    )
    decoder_hidden_size: int = field(
        default=128, metadata={"help": "Width of the decoder (thrown away after pretraining; small is enough)."}
    )
    decoder_num_hidden_layers: int = field(default=2, metadata={"help": "Depth of the decoder."})
    decoder_num_attention_heads: int = field(default=4, metadata={"help": "Attention heads of the decoder."})
    norm_pix_loss: bool = field(
        default=False,
        metadata={
            "help": "Predict each patch's pixels normalised to mean 0 and variance 1 "
            "(the MAE paper's choice for photos)."
        },
    )
    resume: bool = field(default=False, metadata={"help": "Continue from the last checkpoint in --output_dir."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start afresh in an --output_dir that holds checkpoints or an encoder (they are deleted)."},
    )


@dataclass
class MaeTrainingArguments(TrainingArguments):
    """`TrainingArguments` with MAE's usual settings (AdamW betas 0.9/0.95, weight decay 0.05, cosine schedule)."""

    output_dir: str = field(
        default=DEFAULT_ENCODER_DIR, metadata={"help": "The encoder folder to write (and its checkpoints)."}
    )
    num_train_epochs: float = field(default=10.0, metadata={"help": "Pretraining epochs over the training split."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Batch size per device."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak AdamW learning rate."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2 (MAE's 0.95 rather than 0.999)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule after warm-up."})
    warmup_steps: float = field(
        default=0.1, metadata={"help": "Linear warm-up: steps, or a fraction of all steps if below 1."}
    )
    save_strategy: str = field(default="epoch", metadata={"help": "When to save a checkpoint (for --resume)."})
    save_total_limit: int | None = field(default=1, metadata={"help": "Checkpoints kept on disk."})
    logging_steps: float = field(default=10, metadata={"help": "Log the reconstruction loss every this many steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay False: the image column is decoded on the fly."}
    )


def build_parser() -> HfArgumentParser:
    return HfArgumentParser(
        (DataArguments, MaeArguments, MaeTrainingArguments), description=__doc__.split("\n\n")[0].replace("\n", " ")
    )


def main(argv: list[str] | None = None) -> Path:
    data_args, mae_args, training_args = build_parser().parse_args_into_dataclasses(
        args=sys.argv[1:] if argv is None else argv
    )
    if mae_args.model not in VIT_PRESETS:
        raise SystemExit(f"--model must be a ViT preset ({', '.join(VIT_PRESETS)}), not '{mae_args.model}'.")
    set_seed(training_args.seed)
    output_dir = Path(training_args.output_dir)
    if training_args.should_save:
        check_writable(output_dir)
    last_checkpoint = checkpoint_to_resume(
        output_dir, mae_args.resume, mae_args.overwrite_output_dir, training_args.should_save
    )

    dataset, _ = prepare_and_load(data_args, training_args)
    processor = preset_image_processor(mae_args.model)
    encoder_arguments = PRESETS[mae_args.model][1]
    model = ViTMAEForPreTraining(
        ViTMAEConfig(
            **encoder_arguments,
            mask_ratio=mae_args.mask_ratio,
            norm_pix_loss=mae_args.norm_pix_loss,
            decoder_hidden_size=mae_args.decoder_hidden_size,
            decoder_num_hidden_layers=mae_args.decoder_num_hidden_layers,
            decoder_num_attention_heads=mae_args.decoder_num_attention_heads,
            decoder_intermediate_size=4 * mae_args.decoder_hidden_size,
        )
    )
    add_mae_position_tables(model)  # transformers leaves the fixed sin-cos tables at zero (cxr.workarounds)
    print(
        f"MAE: a {mae_args.model} encoder ({model.vit.num_parameters() / 1e6:.1f} M parameters) "
        f"on {len(dataset['train'])} training images, "
        f"{mae_args.mask_ratio:.0%} of patches hidden; no labels are used."
    )

    trainer = XrayTrainer(  # XrayTrainer for its correct checkpoint reloads (--resume); it adds nothing else here
        model=model,
        args=training_args,
        train_dataset=dataset["train"].with_transform(pixel_transform(processor, augment=True)),
        data_collator=lambda examples: {"pixel_values": torch.stack([example["pixel_values"] for example in examples])},
    )
    train_result = trainer.train(resume_from_checkpoint=last_checkpoint)
    if not trainer.is_world_process_zero():
        return output_dir

    # The encoder as a plain ViT: ViTMAEModel and ViTModel name their weights alike, so they copy over one to one.
    encoder = ViTModel(ViTConfig(**encoder_arguments), add_pooling_layer=False)
    encoder.load_state_dict(model.vit.state_dict(), strict=True)
    encoder.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    epochs = train_result.metrics.get("epoch", training_args.num_train_epochs)
    source = (
        "generated synthetic stand-in images (not X-rays)"
        if data_args.synthetic
        else f"training X-rays of `{data_args.source}`"
    )
    record = {
        "description": (
            f"a `{mae_args.model}` ViT pretrained by masked autoencoding "
            f"(MAE: {epochs:g} epochs, {mae_args.mask_ratio:.0%} of patches hidden) "
            f"on the {len(dataset['train'])} {source}, without labels or downloaded weights"
        ),
        "method": "masked autoencoding (transformers ViTMAEForPreTraining)",
        "norm_pix_loss": mae_args.norm_pix_loss,
        "preset": mae_args.model,
        "source": str(data_args.source),
        "synthetic": data_args.synthetic,
        "train_images": len(dataset["train"]),
        "split_seed": data_args.split_seed,
        "validation_fraction": data_args.validation_fraction,
        "mask_ratio": mae_args.mask_ratio,
        "epochs": epochs,
        "train": train_result.metrics | {"peak_memory_mib": peak_memory_mib()},
        "loss_history": [
            {"epoch": entry["epoch"], "loss": entry["loss"]} for entry in trainer.state.log_history if "loss" in entry
        ],
        "command": "python " + shlex.join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
    }
    write_text_atomic(output_dir / PRETRAINING_FILE, json.dumps(record, indent=2))
    validation = dataset["validation"].with_transform(pixel_transform(processor, augment=False))
    plot_reconstructions(
        model,
        torch.stack([validation[index]["pixel_values"] for index in range(min(4, len(validation)))]),
        output_dir / "reconstructions.png",
    )
    print(f"\nEncoder folder: {output_dir}  ({record['description']})")
    print(f"Fine-tune it:  python train_vit.py --data_dir {data_args.data_dir} --recipe vit-mae --model {output_dir}")
    return output_dir


@torch.no_grad()
def plot_reconstructions(model: ViTMAEForPreTraining, pixel_values: torch.Tensor, path: Path) -> None:
    """A row per image: the X-ray, what the encoder saw (hidden patches grey), and the hidden patches painted back."""
    model.eval()
    outputs = model(pixel_values)
    target = model.patchify(pixel_values)
    mean, std = target.mean(-1, keepdim=True), (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    # undo the per-patch normalisation
    predicted = outputs.logits * std + mean if model.config.norm_pix_loss else outputs.logits
    hidden = outputs.mask.unsqueeze(-1).bool()  # 1 where a patch was hidden
    seen = model.unpatchify(torch.where(hidden, torch.zeros_like(target), target))
    painted = model.unpatchify(torch.where(hidden, predicted, target))
    figure, axes = plt.subplots(len(pixel_values), 3, figsize=(7.5, 2.6 * len(pixel_values)), dpi=100, squeeze=False)
    for row, images in enumerate(zip(pixel_values, seen, painted, strict=True)):
        for column, (image, title) in enumerate(
            zip(images, ("X-ray", f"seen ({1 - model.config.mask_ratio:.0%})", "painted back"), strict=True)
        ):
            # [-1, 1] -> [0, 1], one channel
            axes[row, column].imshow(((image[0] + 1) / 2).clamp(0, 1), cmap="gray", vmin=0, vmax=1)
            axes[row, column].set_title(title if row == 0 else "")
            axes[row, column].axis("off")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


if __name__ == "__main__":
    main()
