"""benchmarks.fit: each folder's figures on its training images and on validation, and with --average the
ensemble's."""

import pytest

from benchmarks import fit
from helpers import prepared_data


def table_rows(output: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in output.splitlines()[2:]]


def test_average_scores_the_ensemble_of_the_folders(tiny_model_dir, cnn_model_dir, capsys):
    data = prepared_data(tiny_model_dir)
    fit.main([str(tiny_model_dir), str(cnn_model_dir), "--data_dir", str(data), "--average"])
    rows = table_rows(capsys.readouterr().out)
    assert [(row[0], row[1].split()[0]) for row in rows] == [
        (f"`{tiny_model_dir.name}`", "train"),
        (f"`{tiny_model_dir.name}`", "validation"),
        (f"`{cnn_model_dir.name}`", "train"),
        (f"`{cnn_model_dir.name}`", "validation"),
        ("average of the 2", "train"),
        ("average of the 2", "validation"),
    ]
    assert all(0.0 <= float(value) <= 1.0 for row in rows for value in row[2:])


def test_average_needs_two_folders(tiny_model_dir):
    with pytest.raises(SystemExit):
        fit.main([str(tiny_model_dir), "--data_dir", "synthetic", "--average"])
