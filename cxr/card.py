"""Render the model card (`README.md` of the model folder) from the top-level `model_card.md` template.

Uses `huggingface_hub.ModelCard`, so the card carries Hub metadata (tags, base model, model-index
with the measured figures) and renders on the Hub like any other model card.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData

TEMPLATE = Path(__file__).resolve().parent.parent / "model_card.md"

HEADLINE = [
    ("accuracy", "Accuracy (3 classes)"),
    ("macro_f1", "Macro-F1 (3 classes)"),
    ("roc_auc_ovr", "ROC-AUC (one-vs-rest, macro)"),
    ("pneumonia_accuracy", "Pneumonia vs normal accuracy"),
    ("pneumonia_sensitivity", "Pneumonia sensitivity"),
    ("pneumonia_specificity", "Pneumonia specificity"),
    ("expected_calibration_error", "Expected calibration error"),
]


def render_model_card(
    *,
    model,
    origin,
    metrics: dict,
    eval_split: str,
    class_keys: list[str],
    data_description: str,
    synthetic_data: bool,
    recipe: str,
    train_runtime_s: float,
    command: str,
    model_id: str,
) -> ModelCard:
    """Build the card from the figures of one finished run. `metrics` are un-prefixed (`accuracy`, ...)."""
    dataset_name = "Synthetic chest X-ray stand-ins (generated)" if synthetic_data else "Pediatric chest X-ray (Kermany et al. 2018)"
    eval_results = [
        EvalResult(
            task_type="image-classification",
            dataset_type="synthetic" if synthetic_data else "chest-xray-pneumonia",
            dataset_name=dataset_name,
            dataset_split=eval_split,
            metric_type=key,
            metric_name=label,
            metric_value=round(metrics[key], 4),
        )
        for key, label in HEADLINE
        if key in metrics
    ]
    card_data = ModelCardData(
        language="en",
        license="apache-2.0",
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=["vision", "image-classification", "vit", "medical-imaging", "chest-x-ray", "pneumonia"],
        base_model=origin.name if origin.pretrained else None,
        model_name=model_id,
        eval_results=eval_results,
    )
    per_class = [
        dict(
            name=model.config.id2label[index],
            precision=f"{metrics[f'precision_{key}']:.3f}",
            recall=f"{metrics[f'recall_{key}']:.3f}",
            f1=f"{metrics[f'f1_{key}']:.3f}",
            support=metrics[f"support_{key}"],
        )
        for index, key in enumerate(class_keys)
    ]
    hardware = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        model_name=model_id,
        model_id=model_id,
        origin=origin.describe(),
        pretrained=origin.pretrained,
        architecture=type(model).__name__,
        parameters=f"{model.num_parameters() / 1e6:.1f} M",
        image_size=model.config.image_size,
        data_description=data_description,
        recipe=recipe,
        train_runtime=f"{train_runtime_s / 60:.1f} minutes",
        hardware=hardware,
        command=command,
        eval_split=eval_split,
        eval_size=sum(metrics[f"support_{key}"] for key in class_keys),
        headline_metrics=[(label, f"{metrics[key]:.3f}") for key, label in HEADLINE if key in metrics],
        per_class=per_class,
    )
