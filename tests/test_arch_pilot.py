"""benchmarks.arch_pilot's candidate specs: preset, resolution, precision and config overrides."""

import argparse

import pytest

from benchmarks.arch_pilot import Candidate


def test_candidate_spec_reads_size_precision_and_overrides():
    candidate = Candidate.parse("scratch-pvt@160+bf16:depths=[1,1,1,1]")
    assert (candidate.preset, candidate.bf16) == ("scratch-pvt", True)
    assert candidate.overrides == {"image_size": 160, "depths": [1, 1, 1, 1]}
    plain = Candidate.parse("scratch-pvt")
    assert (plain.overrides, plain.bf16) == ({}, False)


@pytest.mark.parametrize(
    "spec, reason",
    [
        ("scratch-pvt+fp16", "only precision suffix"),
        ("no-such-preset+bf16", "No preset"),
        ("scratch-pvt:depths", "key=value"),
    ],
)
def test_candidate_spec_refuses_what_it_cannot_run(spec, reason):
    with pytest.raises(argparse.ArgumentTypeError, match=reason):
        Candidate.parse(spec)
