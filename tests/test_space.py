"""The Hugging Face Space: `python -m cxr.space` assembles a folder Spaces accepts, in two routes (the shipped model
bundled; a Hub id served from the cache `preload_from_hub` fills), and each folder starts as Spaces starts it (the
front matter's app_file, no XRAY_MODEL, offline) and answers the three examples through gradio_client.

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
from cxr.models import SHIPPED_MODEL_DIR
from cxr.space import assemble, local_modules, main, pins, third_party_imports

REPO = Path(__file__).resolve().parents[1]
MODEL_ID = "test-org/swiftformer-xray-tiny"
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
    assert not any(name.startswith("models/") for name in files)  # the Hub route carries no weights
    # That these modules are enough is shown by starting the folder below; here, that they are the repository's.
    for path in local_modules():
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
    for not_an_id in ("swiftformer-xray", str(tmp_path / "model"), "../model"):
        with pytest.raises(SystemExit, match="not a Hub id"):
            assemble(not_an_id, tmp_path / "other")
    (tmp_path / "outputs" / "vit-xray").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="not a Hub id"):  # a local folder that looks like owner/name
        assemble("outputs/vit-xray", tmp_path / "other")


def ask_the_examples(space: Path, hub_cache: Path, log: Path, expected_model: str) -> list:
    """Start the Space folder as Spaces does and ask it each of its examples; returns the answers."""
    from gradio_client import Client, handle_file

    (log.parent / "gradio").mkdir(exist_ok=True)
    env = space_environment(hub_cache, free_port(), log.parent / "gradio")
    assert "XRAY_MODEL" not in env
    server, _ = start_space(sys.executable, space, env, log)
    try:
        client = Client(f"http://127.0.0.1:{env['GRADIO_SERVER_PORT']}/", verbose=False, ssl_verify=False)
        examples = sorted((space / "examples").glob("*.jpeg"))
        assert len(examples) == 3
        answers = [client.predict(handle_file(str(example)), api_name="/predict") for example in examples]
        for warning, label, _, check in answers:
            assert [item["label"] for item in label["confidences"]][0] == max(
                label["confidences"], key=lambda item: item["confidence"]
            )["label"]
            assert {item["label"] for item in label["confidences"]} == LABELS
            assert sum(item["confidence"] for item in label["confidences"]) == pytest.approx(1, abs=1e-4)
            assert check["score"] == "mahalanobis" and set(check["prediction_sets"]) == {"90%", "95%"}
            assert bool(warning) == (not check["looks_like_chest_xray"])
        # The page's description names the model it serves, in its "Model:" line.
        texts = [str(component.get("props", {}).get("value", "")) for component in client.config["components"]]
        assert any(f"**Model:** `{expected_model}`" in text for text in texts), texts
    finally:
        stop(server)
    assert "Traceback" not in log.read_text()
    return answers


@pytest.mark.slow
def test_the_hub_route_starts_from_its_front_matter_and_answers_from_the_cache(space, tiny_model_dir, tmp_path):
    """No XRAY_MODEL: app.py finds the model id in the Space's front matter and loads it offline from the cache that
    preload_from_hub fills."""
    fill_hub_cache(tmp_path / "hub", MODEL_ID, tiny_model_dir)
    ask_the_examples(space, tmp_path / "hub", tmp_path / "app.log", MODEL_ID)


@pytest.mark.slow
def test_the_bundled_route_needs_no_hub_and_answers_the_examples_with_the_shipped_model(tmp_path):
    """`python -m cxr.space` without --model_id copies the shipped model in: pushing that folder alone is a working
    Space. An empty cache and HF_HUB_OFFLINE=1: nothing can come from the Hub."""
    if not (SHIPPED_MODEL_DIR / "config.json").is_file():
        pytest.skip("no shipped model in this checkout")
    space = tmp_path / "space"
    main(["--output_dir", str(space)])
    bundled = space / SHIPPED_MODEL_DIR.relative_to(REPO)
    assert sorted(path.name for path in bundled.iterdir()) == sorted(path.name for path in SHIPPED_MODEL_DIR.iterdir())
    assert "models" not in SpaceCard.load(space / "README.md").data.to_dict()
    assert "*.safetensors filter=lfs" in (space / ".gitattributes").read_text()
    (tmp_path / "hub").mkdir()
    answers = ask_the_examples(space, tmp_path / "hub", tmp_path / "app.log", str(bundled))
    assert all(check["looks_like_chest_xray"] for _, _, _, check in answers)  # a real model on real X-rays
