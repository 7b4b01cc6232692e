"""The training precision is the hardware's choice: bfloat16 autocast where it is native, float32 elsewhere; an
explicit --bf16 where it would be emulated stops before any work; run.json records the choice and its reason."""

import pytest

import cxr.precision
import train_vit
from cxr.precision import resolve_precision
from cxr.run_record import read_run
from helpers import tiny_run

NATIVE = (True, "CPU (AVX512) has AVX-512 BF16 or AMX")
EMULATED = (False, "CPU (AVX2) has no AVX-512 BF16 or AMX: bfloat16 would be emulated, many times slower")


@pytest.fixture
def hardware(monkeypatch):
    def set_to(answer):
        monkeypatch.setattr(cxr.precision, "native_bf16", lambda: answer)
        monkeypatch.setattr(cxr.precision.torch.cuda, "is_available", lambda: False)

    return set_to


def test_native_bfloat16_is_chosen_with_the_cpu_flag_it_needs(hardware):
    hardware(NATIVE)
    argv, choice = resolve_precision(["--model", "scratch-tiny"])
    assert argv == ["--model", "scratch-tiny", "--bf16", "--use_cpu"]
    assert choice["precision"] == "bf16" and "chosen by the hardware" in choice["reason"]


def test_float32_where_bfloat16_would_be_emulated(hardware):
    hardware(EMULATED)
    argv, choice = resolve_precision(["--model", "scratch-tiny"])
    assert argv == ["--model", "scratch-tiny"] and choice["precision"] == "fp32"
    assert "AVX2" in choice["reason"]


def test_an_explicit_bf16_without_native_support_stops_and_says_how_to_insist(hardware):
    hardware(EMULATED)
    for flag in (["--bf16"], ["--bf16", "true"], ["--bf16=True", "--use_cpu"]):
        with pytest.raises(SystemExit, match="Leave --bf16 out .* --precision bf16 to insist"):
            resolve_precision(["--model", "x", *flag])
    argv, choice = resolve_precision(["--precision", "bf16"])  # insisting works, emulated or not
    assert choice["precision"] == "bf16" and argv[-2:] == ["--bf16", "--use_cpu"]
    assert resolve_precision(["--bf16", "false"])[1]["precision"] == "fp32"  # a flag set to false asks for nothing


def test_fp32_can_be_insisted_on_and_contradictions_stop(hardware):
    hardware(NATIVE)
    assert resolve_precision(["--precision", "fp32"]) == (
        ["--precision", "fp32"],
        {"precision": "fp32", "reason": f"--precision fp32 given; {NATIVE[1]}", "hardware": NATIVE[1]},
    )
    with pytest.raises(SystemExit, match="contradict"):
        resolve_precision(["--precision", "fp32", "--bf16"])


@pytest.mark.parametrize(("answer", "expected"), [(EMULATED, "fp32"), (NATIVE, "bf16")], ids=["emulated", "native"])
def test_run_json_records_the_choice(hardware, tmp_path, monkeypatch, answer, expected, capsys):
    hardware(answer)
    monkeypatch.chdir(tmp_path)
    model_dir = tmp_path / "model"
    train_vit.main([*tiny_run(drop=("precision",)), "--output_dir", str(model_dir)])
    record = read_run(model_dir)
    assert record["precision"]["precision"] == expected and record["precision"]["hardware"] == answer[1]
    assert record["training"]["bf16"] is (expected == "bf16")
    assert "Precision: " in capsys.readouterr().out
