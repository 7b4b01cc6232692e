"""Every command line explains itself: `--help` exits cleanly and names what a user needs to run it."""

import pytest

import app
import calibrate
import predict
import pretrain_mae
import site_check
import train_vit
from cxr.ood import OOD_FILE

HELP = {
    "app.py": (
        app.main,
        ["--model", "XRAY_MODEL", "Hub id", "--examples", "XRAY_EXAMPLES", "--host", "GRADIO_SERVER_NAME"]
        + ["127.0.0.1", "--port", "GRADIO_SERVER_PORT", "--share"],
    ),
    "calibrate.py": (
        calibrate.main,
        ["model_dir", "--data_dir", "in place", "without retraining", "temperature", OOD_FILE, "metrics.json"]
        + ["--score", "synthetic", "--split_seed", "--site_dir", "--output_dir", "new model folder"],
    ),
    "site_check.py": (
        site_check.main,
        ["site_dir", "--model", "--output_dir", "site_check.png", "site_check.json", "Kaggle", "confidence intervals"]
        + ["calibrate.py --site_dir"],
    ),
    "train_vit.py": (
        train_vit.main,
        ["--data_dir", "--model", "--resume", "--early_stopping_patience", "scratch-small", "Kaggle", "--recipe"],
    ),
    "predict.py": (
        predict.main,
        ["inputs", "--model", "Hub id", "--output", ".csv or .json", "--int8", "--onnx", "--ray", "@LIST"],
    ),
    "pretrain_mae.py": (
        pretrain_mae.main,
        ["--data_dir", "--mask_ratio", "--output_dir", "masked autoencoding", "ImageNet"],
    ),
}


@pytest.mark.parametrize("command", sorted(HELP))
def test_help_exits_cleanly_and_explains_the_command(command, capsys):
    main, expected = HELP[command]
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    missing = [words for words in expected if words not in text]
    assert missing == [], f"{command} --help does not mention {missing}"
