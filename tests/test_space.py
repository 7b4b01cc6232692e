"""The Hugging Face Space: `python -m cxr.space` assembles a folder Spaces accepts, and that folder starts as Spaces
starts it (a Hub id served from the cache `preload_from_hub` fills, offline) and answers a gradio_client call.

The same start in a fresh virtual environment with only the Space's requirements is `python -m benchmarks.space_start`
(minutes of installing, so not part of every run; docs/deployment.md)."""

import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
import yaml
from huggingface_hub import SpaceCard

from benchmarks.common import fill_hub_cache, free_port
from benchmarks.space_start import space_environment, start_space, stop
from cxr.labels import DISPLAY_NAMES
from cxr.space import assemble, local_modules, main, pins, third_party_imports

REPO = Path(__file__).resolve().parents[1]
MODEL_ID = "test-org/vit-xray-tiny"
LABELS = set(DISPLAY_NAMES.values())


@pytest.fixture(scope="module")
def space(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("space")
    main(["--model_id", MODEL_ID, "--output_dir", str(folder)])
    return folder


def requirement_lines(folder: Path) -> list[str]:
    return [
        line.strip()
        for line in (folder / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]


def test_the_space_folder_holds_the_app_its_modules_the_examples_and_the_templates(space):
    files = {str(path.relative_to(space)) for path in space.rglob("*") if path.is_file()}
    for name in (
        "app.py",
        "README.md",
        "requirements.txt",
        "cxr/__init__.py",
        "cxr/images.py",
        "cxr/predictor.py",
        "cxr/models.py",
        "cxr/saliency.py",
        "examples/README.md",
    ):
        assert name in files
    assert len([name for name in files if name.startswith("examples/") and name.endswith(".jpeg")]) == 3
    assert not any(
        name.startswith(("tests/", "benchmarks/", "hf_data/", "recipes/"))
        or name in ("train_vit.py", "cxr/training.py")
        for name in files
    )
    assert ("LICENSE" in files) == (REPO / "LICENSE").is_file()
    for path in local_modules():  # every local module app.py imports is there, byte for byte
        assert (space / path).read_bytes() == (REPO / path).read_bytes()


def test_the_front_matter_is_what_spaces_reads_and_agrees_with_the_gradio_pin(space):
    card = SpaceCard.load(space / "README.md")
    data = card.data.to_dict()
    assert data["sdk"] == "gradio" and data["sdk_version"] == pins()["gradio"] == "6.31.0"
    assert data["app_file"] == "app.py" and (space / data["app_file"]).is_file()
    assert re.fullmatch(r"3\.\d+", str(data["python_version"]))
    assert data["models"] == [MODEL_ID] and data["preload_from_hub"] == [MODEL_ID]
    assert data["license"] == "apache-2.0" and data["suggested_hardware"] == "cpu-basic"
    assert 0 < len(data["short_description"]) <= 60  # the Hub's limit
    for key in ("title", "emoji", "colorFrom", "colorTo"):
        assert data[key]
    front = (space / "README.md").read_text().split("---")[1]
    assert yaml.safe_load(front) == data  # plain YAML reads the same
    assert "not a medical device" in card.text and "CC BY 4.0" in card.text


def test_requirements_are_slim_pinned_as_the_repository_and_take_pytorchs_cpu_wheel(space):
    lines = requirement_lines(space)
    assert lines[0] == "--extra-index-url https://download.pytorch.org/whl/cpu"
    pinned = dict(line.split("==") for line in lines[1:])
    assert pinned["torch"] == pins()["torch"] and pinned["gradio"] == pins()["gradio"]
    assert all(pins()[name.lower().replace("_", "-")] == version for name, version in pinned.items())
    assert not {
        "pytest",
        "selenium",
        "hypothesis",
        "optuna",
        "onnx",
        "onnxruntime",
        "scikit-image",
        "datasets",
        "accelerate",
    } & set(pinned)
    # pydicom finds its decoders at run time, not by import: compressed DICOM uploads need them listed
    assert {"pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pyjpegls"} <= set(pinned)


def test_requirements_cover_every_package_the_app_imports_at_start(space):
    """Each third-party module the Space's files import when app.py loads comes from a listed package or one of its
    dependencies."""
    listed = {line.split("==")[0].lower().replace("_", "-") for line in requirement_lines(space)[1:]}
    brought = set(listed)
    for name in listed:
        brought |= {
            re.split(r"[ ;<>=!\[~]", requirement)[0].lower().replace("_", "-")
            for requirement in importlib.metadata.requires(name) or []
            if "extra ==" not in requirement
        }
    distributions = importlib.metadata.packages_distributions()
    for module in third_party_imports(local_modules()):
        assert {dist.lower().replace("_", "-") for dist in distributions[module]} & brought, module


def test_assembling_refuses_a_folder_with_other_files_and_an_id_that_is_no_hub_id(tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="already holds files"):
        assemble(MODEL_ID, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    (tmp_path / ".git").mkdir()
    assemble(MODEL_ID, tmp_path, overwrite=True)
    assert not (tmp_path / "notes.txt").exists() and (tmp_path / ".git").is_dir() and (tmp_path / "app.py").is_file()
    for not_an_id in ("vit-xray", str(tmp_path / "model"), "../model"):
        with pytest.raises(SystemExit, match="not a Hub id"):
            assemble(not_an_id, tmp_path / "other")
    (tmp_path / "outputs" / "vit-xray").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="not a Hub id"):  # a local folder that looks like owner/name
        assemble("outputs/vit-xray", tmp_path / "other")


@pytest.mark.slow
def test_the_space_starts_as_spaces_starts_it_and_answers_from_the_hub_cache(space, tiny_model_dir, tmp_path):
    """`python app.py` in the Space folder, no arguments, the model named only by its Hub id, served offline from
    the cache preload_from_hub fills; a gradio_client call gets the three labels and the chest X-ray check."""
    from gradio_client import Client, handle_file

    fill_hub_cache(tmp_path / "hub", MODEL_ID, tiny_model_dir)
    (tmp_path / "gradio").mkdir()
    env = space_environment(MODEL_ID, tmp_path / "hub", free_port(), tmp_path / "gradio")
    server, _ = start_space(sys.executable, space, env, tmp_path / "app.log")
    try:
        client = Client(f"http://127.0.0.1:{env['GRADIO_SERVER_PORT']}/", verbose=False, ssl_verify=False)
        example = sorted((space / "examples").glob("*.jpeg"))[0]
        warning, label, _, check = client.predict(handle_file(str(example)), api_name="/predict")
        assert {item["label"] for item in label["confidences"]} == LABELS
        assert (
            set(check) == {"looks_like_chest_xray", "ood_score", "threshold", "score", "prediction_sets"}
            and check["score"] == "mahalanobis"
        )
        assert bool(warning) == (not check["looks_like_chest_xray"])
        page = client.config
        assert MODEL_ID in str(page)  # the description names the model it serves
    finally:
        stop(server)
    assert "Traceback" not in (tmp_path / "app.log").read_text()
