"""The training benchmark (`python -m benchmarks.train_speed`) runs end to end on a tiny family and synthetic data,
printing every row it promises: the data paths, the step, the Trainer with its data, the operations and the ceiling;
its operation count agrees with the inference benchmark's forward pass."""

import re

import pytest

from benchmarks import train_speed
from benchmarks.speed import count_operations
from cxr.labels import ID2LABEL
from cxr.models import build_model, input_size


def test_a_tiny_run_prints_every_row(capsys):
    train_speed.main(
        ["--families", "scratch-tiny-resnet", "--teacher", "none", "--steps", "2", "--warmup", "1"]
        + ["--data", "synthetic", "--precision", "fp32"]
    )
    out = capsys.readouterr().out
    assert re.search(r"matmul: float32 \d+ GFLOP/s", out)
    for row in (
        "data path: PIL, every file (before)",
        "data path: every file, tensor augment",
        "data path: cache, tensor augment",
        "step alone, NCHW (fp32)",
        "step alone, channels-last (fp32)",
        "Trainer with data, before: PIL data, NCHW, 0 workers (fp32)",
        "Trainer with data, 0 workers (fp32)",
    ):
        assert re.search(re.escape(row) + r"\s+\d+\.\d images/s", out), row
    assert re.search(r"convs and matmuls only \(fp32\)\s+\d+\.\d images/s  \d+% of the step's time", out)
    # what the rest of the step is: the three other operations that take most of it
    assert re.search(r"the rest led by \S.* \d+%, \S.* \d+%, \S.* \d+%", out)
    assert re.search(r"GFLOP per training image \(forward [\d.]+ \+ backward [\d.]+\)", out)
    assert re.search(r"= \d+% of the matmul rate; an epoch of \d+ images", out)


@pytest.mark.parametrize("preset", ["scratch-tiny", "scratch-tiny-resnet"])
def test_a_training_step_counts_its_forward_pass_once_and_a_backward_pass_of_about_twice_that(preset):
    model, processor, _ = build_model(preset, ID2LABEL)
    forward = count_operations(model, input_size(processor)).total
    training = train_speed.training_operations(model, input_size(processor))
    assert 2 * forward <= training <= 3.2 * forward


@pytest.mark.parametrize("faithful", [True, False])
def test_a_compiled_step_that_computes_another_loss_is_flagged_not_timed_as_if_right(capsys, monkeypatch, faithful):
    def compile_stand_in(model, **kwargs):  # torch.compile as it behaves, or as it did for SwiftFormer: NaN logits
        def forward(**inputs):
            outputs = model(**inputs)
            if not faithful:
                outputs.logits = outputs.logits * float("nan")
            return outputs

        return forward

    monkeypatch.setattr(train_speed.torch, "compile", compile_stand_in)
    train_speed.main(
        ["--families", "scratch-tiny-resnet", "--teacher", "none", "--steps", "2", "--warmup", "1", "--compile"]
        + ["--data", "synthetic", "--precision", "fp32"]
    )
    row = next(line for line in capsys.readouterr().out.splitlines() if "step alone, torch.compile" in line)
    assert ("WRONG: its first loss nan against" in row) != faithful, row
