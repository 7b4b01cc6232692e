"""Publish a finished model folder to the Hugging Face Hub: exactly the files inference needs, nothing mid-training.

`train_vit.py --push_to_hub` calls `publish_model_folder` once, after the folder is complete (calibrated weights,
`ood.safetensors`, `run.json`, `metrics.json`, plots, our card). Trainer's own push is kept off: it would save the model
again (writing the pickle `training_args.bin`), replace our card with its generic one, and with its default strategy
push every checkpoint, uncalibrated and without the out-of-distribution statistics, to the repo users load.

It can also publish a folder trained earlier: `python -m cxr.hub outputs/vit-xray your-name/vit-xray`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# Never published: pickles (Trainer's training_args.bin, optimizer and random state), ONNX exports that predict.py
# writes into the folder on first use (derived from the weights, exported again where needed), and hidden files.
EXCLUDED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".onnx", ".onnx.data")
REQUIRED = ("config.json", "preprocessor_config.json", "README.md")


def model_folder_files(folder: str | Path) -> list[str]:
    """The files of a model folder that make up the published model, sorted: its top-level regular files except
    pickles, ONNX exports and hidden files. Subfolders (`checkpoint-*`, a search's trials, logs) are never included.
    Raises ValueError when the folder lacks what inference needs (config, image processor, safetensors weights,
    card)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"No model folder at '{folder}'.")
    files = sorted(
        path.name
        for path in folder.iterdir()
        if path.is_file()
        and not path.is_symlink()
        and not path.name.startswith(".")
        and not path.name.endswith(EXCLUDED_SUFFIXES)
    )
    missing = [name for name in REQUIRED if name not in files]
    if not any(name.endswith(".safetensors") and name != "ood.safetensors" for name in files):
        missing.append("model.safetensors")
    if missing:
        raise ValueError(
            f"'{folder}' is not a finished model folder (missing {', '.join(missing)}): "
            "train it with train_vit.py first."
        )
    return files


def publish_model_folder(
    folder: str | Path,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload model folder (train_vit.py)",
) -> tuple[str, list[str]]:
    """Create the model repo if needed and upload the model folder's files (`model_folder_files`) in one commit; files
    already in the repo that the folder no longer has are deleted in the same commit, so the repo holds exactly the
    folder (`.gitattributes` is kept). Returns (the repo's URL, the uploaded file names)."""
    from huggingface_hub import HfApi

    files = model_folder_files(folder)
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(
        repo_id=repo.repo_id,
        folder_path=str(folder),
        revision=revision,
        allow_patterns=files,
        delete_patterns="*",
        commit_message=commit_message,
    )
    return str(repo), files


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Publish a model folder written by train_vit.py to the Hugging Face Hub."
    )
    parser.add_argument("folder", help="The model folder, e.g. outputs/vit-xray.")
    parser.add_argument("repo_id", help="The model repo, e.g. your-name/vit-xray (created if it does not exist).")
    parser.add_argument("--private", action="store_true", help="Create the repo private.")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    url, files = publish_model_folder(args.folder, args.repo_id, private=args.private or None)
    print(f"Published {len(files)} files to {url}: {', '.join(files)}")


if __name__ == "__main__":
    main()
