"""Render the model card (`README.md` of the model folder) from the top-level `model_card.md` template.

Uses `huggingface_hub.ModelCard`, so the card carries Hub metadata (tags, base model, model-index
with the measured figures) and renders on the Hub like any other model card.
"""

from __future__ import annotations

import platform
import re
from pathlib import Path

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from cxr.precision import describe as describe_precision

TEMPLATE = Path(__file__).resolve().parent.parent / "model_card.md"

# What the card calls the network, by `config.model_type`: (opening words, short name); others by their class name.
NETWORKS = {
    "vit": ("A Vision Transformer", "ViT"),
    "deit": ("A Vision Transformer (DeiT)", "ViT"),
    "resnet": ("A convolutional network (ResNet)", "ResNet"),
    "convnext": ("A convolutional network (ConvNeXt)", "ConvNeXt"),
    "swin": ("A Swin Transformer (windowed attention)", "Swin"),
    "pvt_v2": ("A Pyramid Vision Transformer v2 (PVTv2)", "PVTv2"),
    "mobilevitv2": ("A MobileViT V2 (convolution-transformer hybrid)", "MobileViT"),
    "cvt": ("A Convolutional vision Transformer (CvT)", "CvT"),
    "levit": ("A LeViT (convolutional stem, attention on shrinking grids)", "LeViT"),
    "swiftformer": ("A SwiftFormer (convolution-transformer hybrid, additive attention)", "SwiftFormer"),
}

HEADLINE = [
    ("accuracy", "Accuracy (3 classes)"),
    ("macro_f1", "Macro-F1 (3 classes)"),
    ("roc_auc_ovr", "ROC-AUC (one-vs-rest, macro)"),
    ("pneumonia_accuracy", "Pneumonia vs normal accuracy"),
    ("pneumonia_sensitivity", "Pneumonia sensitivity"),
    ("pneumonia_specificity", "Pneumonia specificity"),
    ("expected_calibration_error", "Expected calibration error"),
]

# The model-index entry of each headline figure, in the Hub's terms: (metric type, config, args). Types are Hub metric
# ids (those of `evaluate`) where one exists; sensitivity, specificity and calibration error are named custom metrics.
# "pneumonia_vs_normal": bacterial and viral pneumonia together are the positive class.
HUB_METRICS = {
    "accuracy": ("accuracy", None, None),
    "macro_f1": ("f1", None, {"average": "macro"}),
    "roc_auc_ovr": ("roc_auc", None, {"average": "macro", "multi_class": "ovr"}),
    "pneumonia_accuracy": ("accuracy", "pneumonia_vs_normal", None),
    "pneumonia_sensitivity": ("sensitivity", "pneumonia_vs_normal", None),
    "pneumonia_specificity": ("specificity", "pneumonia_vs_normal", None),
    "expected_calibration_error": ("expected_calibration_error", None, {"bins": 15}),
}
HUB_METRIC_IDS = ["accuracy", "f1", "roc_auc", "precision", "recall"]  # the card's `metrics:` list
HUB_DATASET = "hf-vision/chest-xray-pneumonia"  # the Kermany images (CC BY 4.0) on the Hub, as in Kaggle's download


def hub_eval_results(
    metrics: dict, class_keys: list[str], display_names: list[str], eval_split: str, synthetic_data: bool
) -> list[EvalResult]:
    """The card's model-index: the headline figures, then precision and recall of each class (one-vs-rest)."""
    dataset = dict(
        task_type="image-classification",
        task_name="Image Classification",
        dataset_type="synthetic" if synthetic_data else HUB_DATASET,
        dataset_name="Synthetic chest X-ray stand-ins (generated)"
        if synthetic_data
        else "Pediatric chest X-ray (Kermany et al. 2018)",
        dataset_split=eval_split,
    )
    results = [
        EvalResult(
            **dataset,
            metric_type=HUB_METRICS[key][0],
            metric_config=HUB_METRICS[key][1],
            metric_args=HUB_METRICS[key][2],
            metric_name=label,
            metric_value=round(metrics[key], 4),
        )
        for key, label in HEADLINE
        if key in metrics
    ]
    for key, name in zip(class_keys, display_names, strict=True):
        for metric_type in ("precision", "recall"):
            results.append(
                EvalResult(
                    **dataset,
                    metric_type=metric_type,
                    metric_args={"average": "binary", "pos_label": key},
                    metric_name=f"{metric_type.capitalize()} ({name})",
                    metric_value=round(metrics[f"{metric_type}_{key}"], 4),
                )
            )
    return results


def render_model_card(record: dict, summary: dict) -> ModelCard:
    """Build the card of a finished run from its two records: `record` is the folder's run.json (the command and the
    resolved options, `cxr.run_record`), `summary` its metrics.json (every figure, the model's make-up, calibration,
    the X-ray check and prediction sets). The headline split is the test split where the run had one."""
    eval_split = "test" if "test" in summary else "validation"
    metrics, network_facts, origin = summary[eval_split], summary["model"], summary["model_origin"]
    class_keys, display_names = network_facts["class_keys"], network_facts["labels"]
    data, training = record["data"], record["training"]
    synthetic_data = data["synthetic"]
    model_id = training.get("hub_model_id") or Path(training["output_dir"]).name
    card_data = ModelCardData(
        language="en",
        license="apache-2.0",  # the code's license (LICENSE); the training images stay CC BY 4.0, credited in the card
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=[
            "vision",
            "image-classification",
            network_facts["model_type"],
            "medical-imaging",
            "chest-x-ray",
            "pneumonia",
        ],
        base_model=origin.get("base_model"),  # only a Hub id: never a local folder or a preset
        datasets=None if synthetic_data else [HUB_DATASET],
        metrics=HUB_METRIC_IDS,
        model_name=model_id,
        eval_results=hub_eval_results(metrics, class_keys, display_names, eval_split, synthetic_data),
    )
    per_class = [
        dict(
            name=name,
            precision=f"{metrics[f'precision_{key}']:.3f}",
            recall=f"{metrics[f'recall_{key}']:.3f}",
            f1=f"{metrics[f'f1_{key}']:.3f}",
            support=metrics[f"support_{key}"],
        )
        for key, name in zip(class_keys, display_names, strict=True)
    ]
    network, network_short = NETWORKS.get(
        network_facts["model_type"], (f"A `{network_facts['architecture']}`", "network")
    )
    data_description = (
        (
            "SYNTHETIC generated stand-in images (not X-rays), for pipeline checks only; "
            "these figures say nothing about X-rays."
        )
        if synthetic_data
        else (
            f"{sum(summary['data']['counts']['train'].values())} training images from `{data['source']}` "
            "(Kermany et al. 2018 pediatric chest X-rays, CC BY 4.0)."
        )
    )
    recipe = (
        f"AdamW, learning rate {training['learning_rate']:g}, weight decay {training['weight_decay']:g}, "
        f"batch {training['per_device_train_batch_size']}, "
        f"up to {training['num_train_epochs']:g} epochs with early stopping, class-weighted cross-entropy, "
        "crop/rotation/exposure augmentation"
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        model_name=model_id,
        model_id=model_id,
        origin=origin["description"],
        pretrained=origin["pretrained"],
        in_domain_pretraining=bool(origin.get("pretraining")),
        network=network,
        network_short=network_short,
        architecture=network_facts["architecture"],
        parameters=f"{network_facts['parameters'] / 1e6:.1f} M",
        image_size=network_facts["image_size"],
        data_description=data_description,
        recipe=recipe,
        train_runtime=run_time(summary["train"]),
        precision=describe_precision(record["precision"]) if record.get("precision") else "float32",
        split_description=(
            f"{data.get('validation_fraction', 0):.0%} of the children held out for validation, grouped by patient "
            f"(--split_seed {data.get('split_seed')}); training seed {training.get('seed')}."
        ),
        given_command=record.get("command", record["expanded_command"]),
        teacher_command=origin.get("teacher_command"),
        teacher_figures=origin.get("teacher_figures"),
        site_check=site_check_lines(summary.get("site_check")),
        hardware=summary["train"]["hardware"],
        command=record["expanded_command"],
        eval_split=eval_split,
        eval_size=sum(metrics[f"support_{key}"] for key in class_keys),
        headline_metrics=[(label, f"{metrics[key]:.3f}") for key, label in HEADLINE if key in metrics],
        per_class=per_class,
        reliability=reliability_section(summary if "calibration" in summary else None),
    )


def site_check_lines(record: dict | None) -> str:
    """The card's paragraph on a site check (`site_check.py --record`): the model's figures on another site's X-rays."""
    if not record:
        return ""
    per_class = ", ".join(f"{name} {count}" for name, count in record["images_per_class"].items())
    coverage = record["coverage_95"]
    others = ", ".join(f"{part} {value:.3f}" for part, value in coverage.items() if part != "all classes")
    held = " ".join(record["not_held"]) if record["not_held"] else "every promise held there."
    return (
        f"**At another site.** On {record['images']} X-rays from `{Path(record['site']).name}` ({per_class}; checked "
        f"{record['date']} with `site_check.py`), it scored macro-F1 {record['macro_f1']:.3f}, pneumonia sensitivity "
        f"{record['pneumonia_sensitivity']:.3f} and specificity {record['pneumonia_specificity']:.3f}; its 95 % sets "
        f"covered {coverage['all classes']:.3f} ({others}); the X-ray check flagged {record['flagged']:.1%}. Where "
        f"its promises did not hold: {held} `calibrate.py --site_dir` refits them at a site, into a new folder."
    )


def run_time(train: dict) -> str:
    """ "31.5 minutes of training (38.2 for the whole command)": Trainer's own time, then the run's wall time."""
    text = f"{train.get('train_runtime', 0.0) / 60:.1f} minutes of training"
    return text + (f" ({train['wall_seconds'] / 60:.1f} for the whole command)" if train.get("wall_seconds") else "")


def hardware() -> str:
    """What trained the model, for the card: the GPU's name, or the CPU's model, vector unit and torch's threads."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        models = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        name = models[0] if models else name
    return f"CPU ({name}, {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"


SECTION_START, SECTION_END = "<!-- reliability -->", "<!-- /reliability -->"


def reliability_section(summary: dict | None) -> str:
    """Markdown for the card: the calibration temperature with ECE and NLL before/after, and the out-of-distribution
    check."""
    if not summary:
        return (
            f"{SECTION_START}\n## Calibration and out-of-distribution check\n\n"
            f"Not fitted: run `python calibrate.py` on this folder.\n{SECTION_END}"
        )
    calibration, ood = summary["calibration"], summary["ood"]
    rows = [
        f"| {split} | {f['ece_before']:.4f} | {f['ece_after']:.4f} | {f['nll_before']:.4f} | {f['nll_after']:.4f} |"
        for split, f in calibration["by_split"].items()
    ]
    accepted = ", ".join(f"{share:.1%} of {split}" for split, share in ood["accepted"].items())
    return "\n".join(
        [
            SECTION_START,
            "## Calibration and out-of-distribution check",
            "",
            *site_paragraph(summary.get("site_recalibration")),
            f"**Calibrated probabilities.** Temperature scaling: T = {calibration['temperature']:.3f}, "
            f"fitted on the {calibration['fitted_on']} "
            "by minimising the negative log-likelihood, and folded into the classifier head (weight and bias divided "
            "by T), so the saved weights, and plain `pipeline()`, give the calibrated probabilities. "
            "T is recorded in `config.json` (`calibration_temperature`).",
            "",
            "| split | ECE before | ECE after | NLL before | NLL after |",
            "|---|---|---|---|---|",
            *rows,
            "",
            "ECE: expected calibration error, 15 equal-width confidence bins. "
            f"On the {calibration['fitted_on'].split(' (')[0]}, where T was fitted, the figure after is optimistic.",
            "",
            f"**Is it a chest X-ray at all?** `ood.safetensors` holds the training split's feature statistics; "
            f"an image whose `{ood['score']}` score (distance of its penultimate features to the nearest class, "
            f"shared Ledoit-Wolf covariance) exceeds {ood['threshold']:.4g} is flagged as not looking like a pediatric "
            f"chest X-ray. The threshold accepts {ood.get('accept_rate', 0.95):.0%} of the "
            f"{ood.get('threshold_fitted_on', 'validation X-rays')} "
            f"(accepted: {accepted}). The project's app and batch predictor (`cxr.predictor`) report the flag; "
            "plain `pipeline()` does not. "
            "`python -m benchmarks.ood` measures it on real X-rays, photos, documents, noise and altered X-rays.",
            *prediction_sets_paragraph(summary.get("prediction_sets")),
            SECTION_END,
        ]
    )


def site_paragraph(record: dict | None) -> list[str]:
    """Card lines for a folder recalibrated at a site (`calibrate.py --site_dir`): on what, when, and the coverage on
    the site's X-rays held out of the fit."""
    if not record:
        return []
    fit, check = record["fitting_part"], record["checking_part"]
    coverage = record["checking_part_coverage"]["prediction_sets"]
    covered = "; ".join(
        f"{level} sets {rows['all classes']['before']:.3f} before, {rows['all classes']['after']:.3f} after"
        for level, rows in coverage.items()
    )
    per_class = ", ".join(f"{count} {name.lower()}" for name, count in fit["images_per_class"].items())
    return [
        f"**Recalibrated at a site, without retraining.** On {record['date']}, the temperature, the prediction-set "
        f"thresholds and the X-ray check's threshold were refitted on {fit['images']} X-rays ({per_class}) of "
        f"{fit['patients']} patients from `{record['data']}` ({record['split']}); the weights are those of "
        f"`{record['source_model']}`, and the figures above are that model's (their calibration error at its own "
        f"temperature). On {check['images']} X-rays of {check['patients']} other patients of that folder, held out "
        f"of the fit, the sets covered: {covered}. What follows holds for X-rays like this site's.",
        "",
    ]


def prediction_sets_paragraph(sets: dict | None) -> list[str]:
    """Card lines for the conformal prediction sets: what they promise and the coverage measured on data the fit did
    not see."""
    if not sets:
        return []
    checks = {
        f"{sets.get('fit_split', 'validation')} children held out of the fit": sets["validation_held_out_children"],
        **sets.get("by_split", {}),
    }
    rows = [
        f"| {where} | {level} | {report['coverage']:.3f} | {report['mean_set_size']:.2f} | "
        + " / ".join(f"{c['coverage']:.2f}, {c['mean_set_size']:.2f}" for c in report["by_class"].values())
        + " |"
        for where, by_level in checks.items()
        for level, report in by_level.items()
        if isinstance(report, dict)
    ]
    return [
        "",
        "**Prediction sets.** `conformal.json` holds class-conditional split-conformal thresholds "
        f"fitted on the {sets['fitted_on']}: "
        "the 90% (95%) set holds every label whose calibrated probability reaches that label's threshold, and contains "
        "the true label for at least 90% (95%) of X-rays of each class, for X-rays like the ones they were fitted on; "
        "at another hospital, or with other equipment, check that with `site_check.py` and refit them there with "
        "`calibrate.py --site_dir`. "
        "A set of two or three labels says the model cannot tell those apart at that confidence. "
        "Coverage and mean set size measured on data the fit did not see:",
        "",
        f"| held out | level | coverage | mean set size | per class ({' / '.join(sets['labels'])}): coverage, size |",
        "|---|---|---|---|---|",
        *rows,
    ]


def replace_reliability_section(card_text: str, summary: dict) -> str:
    """The card with its reliability section replaced by a fresh one (added before the Use section where it has
    none)."""
    section = reliability_section(summary)
    pattern = re.compile(re.escape(SECTION_START) + ".*?" + re.escape(SECTION_END), re.DOTALL)
    if pattern.search(card_text):
        return pattern.sub(lambda _: section, card_text)
    anchor = card_text.find("\n## Use")
    if anchor == -1:
        return card_text.rstrip() + "\n\n" + section + "\n"
    return card_text[:anchor] + "\n" + section + "\n" + card_text[anchor:]
