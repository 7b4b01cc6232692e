"""The data layer: from the user's folder of chest X-rays to a `datasets.DatasetDict`.

- `prepare_dataset(source, output)` finds the images (Kaggle download or class folders), reads each
  one's class and patient id, test-decodes it, makes a patient-grouped validation split, and writes
  an imagefolder tree of symlinks (or copies) with a manifest. It returns a `PrepareReport`.
- `load_prepared(output)` loads that tree with the label ids fixed to `CLASS_NAMES`.
- `make_synthetic_dataset(output)` draws a small synthetic (not X-ray) set so everything runs without
  a download.

Command line: `python -m hf_data prepare SOURCE OUTPUT` and `python -m hf_data synthetic OUTPUT`.
"""

from cxr.labels import CLASS_NAMES, DISPLAY_NAMES
from hf_data.prepare import PrepareReport, load_prepared, prepare_dataset
from hf_data.synthetic import make_synthetic_dataset

__all__ = [
    "CLASS_NAMES",
    "DISPLAY_NAMES",
    "PrepareReport",
    "load_prepared",
    "make_synthetic_dataset",
    "prepare_dataset",
]
