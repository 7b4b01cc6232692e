"""prepare_dataset: the user's folder of X-rays -> imagefolder tree, patient-grouped, nothing mislabeled.

Small fake trees are drawn with PIL in tmp_path, named as the Kaggle download names its files.
One test prepares the real Kaggle training split in ../shared/data (the `shared_data` fixture) when it is there.
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr.images import load_image
from cxr.labels import CLASS_NAMES, DISPLAY_NAMES
from helpers import folder_checksums
from hf_data import load_prepared, make_synthetic_dataset, prepare_dataset
from hf_data.__main__ import main


def write_image(path: Path, shade: int = 120, size: int = 48) -> Path:
    """A small grayscale picture in the format its suffix names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((size, size), shade, dtype=np.uint8)
    pixels[::6] = 255 - shade
    Image.fromarray(pixels).save(path)
    return path


def make_kaggle_download(root: Path) -> dict[str, tuple[str, str, str]]:
    """Write root/chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/; return name-in-tree -> (class, patient, source
    split)."""
    expected = {}

    def add(relative: str, class_name: str, patient: str) -> None:
        write_image(root / "chest_xray" / relative, shade=40 + len(expected) % 150)
        expected[relative] = (class_name, patient, relative.split("/")[0])

    for patient in range(101, 113):
        add(f"train/NORMAL/IM-{patient:04d}-0001.jpeg", "normal", f"{patient:04d}")
        if patient % 3 == 0:
            add(f"train/NORMAL/IM-{patient:04d}-0001-0002.jpeg", "normal", f"{patient:04d}")
    for patient in range(201, 205):
        add(f"train/NORMAL/NORMAL2-IM-{patient:04d}-0001.jpeg", "normal", f"NORMAL2-{patient:04d}")
    for person in range(1, 13):
        add(f"train/PNEUMONIA/person{person}_bacteria_{person + 500}.jpeg", "bacterial_pneumonia", str(person))
    add("train/PNEUMONIA/person7_bacteria_600.jpeg", "bacterial_pneumonia", "7")
    for person in range(13, 25):
        add(f"train/PNEUMONIA/person{person}_virus_{person + 700}.jpeg", "viral_pneumonia", str(person))
    for person in (5, 6):  # one child with both kinds of image
        add(f"train/PNEUMONIA/person{person}_virus_{person + 800}.jpeg", "viral_pneumonia", str(person))
    add("val/NORMAL/IM-0301-0001.jpeg", "normal", "0301")
    add("val/PNEUMONIA/person302_virus_2.jpeg", "viral_pneumonia", "302")
    add("val/PNEUMONIA/person1_bacteria_501.jpeg", "bacterial_pneumonia", "1")  # same name as a train file
    add("test/NORMAL/IM-0401-0001.jpeg", "normal", "0401")
    add("test/NORMAL/NORMAL2-IM-0402-0001.jpeg", "normal", "NORMAL2-0402")
    add("test/PNEUMONIA/person401_bacteria_5.jpeg", "bacterial_pneumonia", "401")
    add("test/PNEUMONIA/person402_virus_6.jpeg", "viral_pneumonia", "402")
    return expected


@pytest.fixture
def kaggle(tmp_path: Path) -> tuple[Path, dict[str, tuple[str, str, str]]]:
    expected = make_kaggle_download(tmp_path / "download")
    return tmp_path / "download" / "chest_xray", expected


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def patients_in_more_than_one_split(rows: list[dict[str, str]]) -> set[str]:
    splits_of = defaultdict(set)
    for row in rows:
        splits_of[row["patient_id"]].add(row["split"])
    return {patient for patient, splits in splits_of.items() if len(splits) > 1}


def test_kaggle_download_classes_patients_and_splits(kaggle, tmp_path):
    source, expected = kaggle
    report = prepare_dataset(source, tmp_path / "prepared")

    rows = read_csv(tmp_path / "prepared" / "manifest.csv")
    found = {str(Path(row["source"]).relative_to(source)): row for row in rows}
    assert report.skipped == []
    assert set(found) == set(expected)
    for relative, (class_name, patient, source_split) in expected.items():
        row = found[relative]
        assert (row["class"], row["patient_id"]) == (class_name, patient), relative
        assert row["split"] in (("test",) if source_split == "test" else ("train", "validation")), relative
        assert row["file"].startswith(f"{row['split']}/{class_name}/")
        assert (tmp_path / "prepared" / row["file"]).resolve() == (source / relative).resolve()
    assert len({row["file"] for row in rows}) == len(rows)  # train's and val's person1_bacteria_501.jpeg both kept

    assert list(report.counts) == ["train", "validation", "test"]
    assert report.counts["test"] == {"bacterial_pneumonia": 1, "normal": 2, "viral_pneumonia": 1}
    assert sum(map(sum, (c.values() for c in report.counts.values()))) == len(expected)
    assert patients_in_more_than_one_split([r for r in rows if r["split"] != "test"]) == set()
    assert "validation" in report.summary() and "No files skipped" in report.summary()


def test_user_may_point_at_the_download_folder_or_at_train(kaggle, tmp_path):
    source, expected = kaggle
    from_chest_xray = prepare_dataset(source, tmp_path / "a")
    from_download = prepare_dataset(source.parent, tmp_path / "b")
    assert from_download.counts == from_chest_xray.counts

    from_train = prepare_dataset(source / "train", tmp_path / "c")
    assert "test" not in from_train.counts
    n_train = sum(1 for (_, _, split) in expected.values() if split == "train")
    assert sum(sum(per_class.values()) for per_class in from_train.counts.values()) == n_train


def test_class_folder_layout_with_common_spellings(tmp_path):
    source = tmp_path / "mine"
    for i in range(12):
        write_image(source / "train" / "Bacteria" / f"scan_b{i:02d}.png")
        write_image(source / "train" / "normal" / f"scan_n{i:02d}.jpg")
        write_image(source / "train" / "VIRUS" / f"person{i + 50}_virus_{i}.jpeg")
    write_image(source / "test" / "bacterial_pneumonia" / "t1.png")
    write_image(source / "test" / "Normal" / "t2.png")
    write_image(source / "test" / "viral-pneumonia" / "t3.png")

    report = prepare_dataset(source, tmp_path / "prepared")
    rows = read_csv(tmp_path / "prepared" / "manifest.csv")
    by_name = {Path(row["source"]).name: row for row in rows}
    assert report.skipped == []
    assert by_name["scan_b03.png"]["class"] == "bacterial_pneumonia"
    assert by_name["scan_b03.png"]["patient_id"] == "scan_b03"  # no Kaggle name: each image its own patient
    assert by_name["scan_n03.jpg"]["class"] == "normal"
    assert (by_name["person53_virus_3.jpeg"]["class"], by_name["person53_virus_3.jpeg"]["patient_id"]) == (
        "viral_pneumonia",
        "53",
    )
    assert report.counts["test"] == dict.fromkeys(CLASS_NAMES, 1)
    assert sum(report.counts["train"].values()) + sum(report.counts["validation"].values()) == 36


def test_class_folders_at_the_top_are_all_training_images(tmp_path):
    for i in range(10):
        for folder in ("bacterial", "normal", "viral"):
            write_image(tmp_path / "mine" / folder / f"{folder}_{i}.png")
    report = prepare_dataset(tmp_path / "mine", tmp_path / "prepared")
    assert list(report.counts) == ["train", "validation"]
    assert {
        name: report.counts["train"][name] + report.counts["validation"][name] for name in CLASS_NAMES
    } == dict.fromkeys(CLASS_NAMES, 10)


def test_validation_is_whole_patients_and_about_the_fraction(tmp_path):
    source = make_synthetic_dataset(tmp_path / "synthetic", images_per_class=60, seed=1)
    report = prepare_dataset(source, tmp_path / "prepared", validation_fraction=0.2)
    rows = read_csv(tmp_path / "prepared" / "manifest.csv")

    assert patients_in_more_than_one_split(rows) == set()
    assert max(Counter(row["patient_id"] for row in rows).values()) > 1  # patients with several images exist
    n_train, n_validation = sum(report.counts["train"].values()), sum(report.counts["validation"].values())
    assert 0.12 <= n_validation / (n_train + n_validation) <= 0.28
    assert all(report.counts["validation"][name] > 0 for name in CLASS_NAMES)


def test_split_is_deterministic_for_a_seed(tmp_path):
    source = make_synthetic_dataset(tmp_path / "synthetic", images_per_class=40)
    prepare_dataset(source, tmp_path / "a", seed=7)
    prepare_dataset(source, tmp_path / "b", seed=7)
    prepare_dataset(source, tmp_path / "c", seed=8)
    manifest = {name: (tmp_path / name / "manifest.csv").read_text() for name in "abc"}
    assert manifest["a"] == manifest["b"]
    assert manifest["a"] != manifest["c"]


def test_kaggle_val_folded_into_train_unless_kept(kaggle, tmp_path):
    source, expected = kaggle
    val_files = {relative for relative, (_, _, split) in expected.items() if split == "val"}

    prepare_dataset(source, tmp_path / "folded")
    folded = read_csv(tmp_path / "folded" / "manifest.csv")
    kaggle_val_rows = [row for row in folded if str(Path(row["source"]).relative_to(source)) in val_files]
    assert len(kaggle_val_rows) == 3 and all(row["split"] in ("train", "validation") for row in kaggle_val_rows)

    kept = prepare_dataset(source, tmp_path / "kept", keep_kaggle_val=True)
    rows = read_csv(tmp_path / "kept" / "manifest.csv")
    assert {str(Path(row["source"]).relative_to(source)) for row in rows if row["split"] == "validation"} == val_files
    assert sum(kept.counts["validation"].values()) == 3


def test_bad_files_are_reported_never_mislabeled(kaggle, tmp_path):
    source, expected = kaggle
    normal, pneumonia = source / "train" / "NORMAL", source / "train" / "PNEUMONIA"
    good_jpeg = (normal / "IM-0101-0001.jpeg").read_bytes()
    bad = {
        normal / "IM-0901-0001.jpeg": b"",  # zero bytes
        normal / "IM-0902-0001.jpeg": good_jpeg[: len(good_jpeg) // 2],  # truncated
        pneumonia / "person903_bacteria_1.jpeg": b"this is a text file, not a JPEG\n",
        pneumonia / "person904_unknown_1.jpeg": good_jpeg,  # PNEUMONIA, but bacteria or virus?
        normal / "person905_bacteria_1.jpeg": good_jpeg,  # folder and name disagree
        normal / "notes.txt": b"a note",
    }
    for path, data in bad.items():
        path.write_bytes(data)
    (normal / ".DS_Store").write_bytes(b"\0\0")  # hidden: ignored without a word
    os.symlink("self_loop.jpeg", normal / "self_loop.jpeg")
    os.symlink("..", pneumonia / "loop_folder")  # walking into it would never end
    # a good symlinked file
    os.symlink(source / "train" / "NORMAL" / "IM-0101-0001.jpeg", pneumonia / "person906_virus_1.jpeg")

    report = prepare_dataset(source, tmp_path / "prepared")
    skipped = dict(report.skipped)
    rows = read_csv(tmp_path / "prepared" / "manifest.csv")
    prepared_sources = {row["source"] for row in rows}
    for path in [*bad, normal / "self_loop.jpeg", pneumonia / "loop_folder"]:
        assert skipped.get(str(path)), f"{path.name} not reported"
        assert str(path) not in prepared_sources
    assert "bacteria or virus" in skipped[str(pneumonia / "person904_unknown_1.jpeg")]
    assert "empty" in skipped[str(normal / "IM-0901-0001.jpeg")]
    assert not any(".DS_Store" in path for path in skipped)
    assert {str(Path(row["source"]).relative_to(source)) for row in rows} == set(expected) | {
        "train/PNEUMONIA/person906_virus_1.jpeg"
    }
    assert read_csv(tmp_path / "prepared" / "skipped.csv") == [{"source": p, "reason": r} for p, r in report.skipped]
    assert "Skipped 8 file(s) or folder(s)" in report.summary()


@pytest.mark.parametrize("copy", [False, True])
def test_source_files_are_never_changed(kaggle, tmp_path, copy):
    source, _ = kaggle
    (source / "train" / "NORMAL" / "IM-0999-0001.jpeg").write_bytes(b"broken")
    before = folder_checksums(source.parent)
    prepare_dataset(source, tmp_path / "prepared", copy=copy)
    prepare_dataset(source, tmp_path / "prepared", copy=copy, seed=3)  # and a re-run that replaces the tree
    assert folder_checksums(source.parent) == before


def test_symlinks_point_to_absolute_paths_and_copy_makes_real_files(kaggle, tmp_path):
    source, _ = kaggle
    prepare_dataset(source, tmp_path / "linked")
    prepare_dataset(source, tmp_path / "copied", copy=True)
    for row in read_csv(tmp_path / "linked" / "manifest.csv"):
        link = tmp_path / "linked" / row["file"]
        assert link.is_symlink() and os.path.isabs(os.readlink(link))
        copied = tmp_path / "copied" / row["file"]
        assert not copied.is_symlink() and copied.read_bytes() == Path(row["source"]).read_bytes()


def test_rerun_is_idempotent_and_leaves_nothing_stale(kaggle, tmp_path):
    source, _ = kaggle
    output = tmp_path / "prepared"
    first = prepare_dataset(source, output)
    before = folder_checksums(output)
    links = {path: os.lstat(path).st_ino for path in output.rglob("*") if path.is_symlink()}
    second = prepare_dataset(source, output)
    assert second == first
    assert folder_checksums(output) == before
    # Not even rewritten: a training run reading the tree while another run prepares it finds every file in place.
    assert links and all(os.lstat(path).st_ino == inode for path, inode in links.items())

    prepare_dataset(source / "train", output, seed=5)  # different arguments: the old tree is replaced
    rows = read_csv(output / "manifest.csv")
    on_disk = {str(path.relative_to(output)) for path in output.rglob("*") if path.is_file() or path.is_symlink()}
    assert on_disk == {row["file"] for row in rows} | {"manifest.csv", "skipped.csv", "prepared.json"}
    assert not (output / "test").exists()


def test_refuses_a_folder_it_did_not_write(kaggle, tmp_path):
    source, _ = kaggle
    theirs = tmp_path / "theirs"
    write_image(theirs / "holiday.jpg")
    with pytest.raises(ValueError, match="not written by `prepare`"):
        prepare_dataset(source, theirs)
    assert (theirs / "holiday.jpg").exists()

    ours = tmp_path / "ours"
    prepare_dataset(source, ours)
    write_image(ours / "train" / "normal" / "added_by_hand.png")
    listed_before = sorted(path.name for path in ours.rglob("*"))
    with pytest.raises(ValueError, match="did not write"):
        prepare_dataset(source, ours)
    assert sorted(path.name for path in ours.rglob("*")) == listed_before  # nothing deleted

    with pytest.raises(ValueError, match="outside the source"):
        prepare_dataset(source, source / "prepared")
    with pytest.raises(ValueError, match="outside the source"):
        prepare_dataset(source, source)


def test_empty_or_unusable_folder_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=re.escape(f"No usable images found in {empty}")) as error:
        prepare_dataset(empty, tmp_path / "out")
    assert "chest_xray" in str(error.value)  # says which layouts it expected

    useless = tmp_path / "useless"
    (useless / "train" / "NORMAL").mkdir(parents=True)
    (useless / "train" / "NORMAL" / "IM-0001-0001.jpeg").write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(f"No usable images found in {useless}")):
        prepare_dataset(useless, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    with pytest.raises(ValueError, match="does not exist"):
        prepare_dataset(tmp_path / "missing", tmp_path / "out")


def test_load_prepared_gives_splits_and_class_label(kaggle, tmp_path):
    source, _ = kaggle
    report = prepare_dataset(source, tmp_path / "prepared")
    dataset = load_prepared(tmp_path / "prepared")

    assert list(dataset) == ["train", "validation", "test"]
    label = dataset["train"].features["label"]
    assert label.names == list(CLASS_NAMES) and set(DISPLAY_NAMES) == set(CLASS_NAMES)
    for split, per_class in report.counts.items():
        counted = Counter(label.int2str(i) for i in dataset[split]["label"])
        assert {name: counted[name] for name in CLASS_NAMES} == per_class
    assert load_image(dataset["test"][0]["image"]["path"]).size == (48, 48)

    with pytest.raises(ValueError, match="not a prepared data set"):
        load_prepared(source)


def test_cli_prepare_prints_the_summary(kaggle, tmp_path, capsys):
    source, _ = kaggle
    assert (
        main(["prepare", str(source), str(tmp_path / "prepared"), "--validation_fraction", "0.25", "--split_seed", "1"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "bacterial_pneumonia" in printed and "validation" in printed and "No files skipped" in printed

    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", str(tmp_path / "empty"), str(tmp_path / "elsewhere")])
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_the_real_kaggle_download_is_prepared_whole_with_each_patient_in_one_split(shared_data, tmp_path):
    """The Kaggle training split as users download it (../shared/data/chest_xray; skipped where absent)."""
    report = prepare_dataset(shared_data / "chest_xray", tmp_path / "prepared")
    totals = {name: sum(report.counts[split][name] for split in report.counts) for name in CLASS_NAMES}
    assert totals == {"bacterial_pneumonia": 2530, "normal": 1341, "viral_pneumonia": 1345}
    assert report.skipped == []
    rows = read_csv(tmp_path / "prepared" / "manifest.csv")
    assert patients_in_more_than_one_split(rows) == set()
    assert 0.08 <= sum(report.counts["validation"].values()) / 5216 <= 0.12


# ---- a damaged manifest, and runs with different split settings on one folder ----------------------------------------


def test_a_manifest_cut_short_is_rebuilt_not_refused(kaggle, tmp_path):
    """A manifest cut short (in a row, at a row's end, or empty) by a crash or a full disk does not make every later
    run refuse the folder: the links where prepare puts them are recognised and the tree is rebuilt."""
    source, _ = kaggle
    output = tmp_path / "prepared"
    prepare_dataset(source, output)
    whole = (output / "manifest.csv").read_text(encoding="utf-8")
    before = folder_checksums(output)
    lines = whole.splitlines(keepends=True)
    for damaged in (whole[: len(whole) // 2], "".join(lines[: len(lines) // 2]), ""):
        (output / "manifest.csv").write_text(damaged, encoding="utf-8")
        prepare_dataset(source, output)
        assert folder_checksums(output) == before

    (output / "manifest.csv").write_text(whole[: len(whole) // 2], encoding="utf-8")
    # a real file where links go: prepare cannot tell it is its own
    write_image(output / "train" / "normal" / "by_hand.png")
    with pytest.raises(ValueError, match=r"manifest.csv was cut short.*by_hand.png.*delete it and run again"):
        prepare_dataset(source, output)
    assert (output / "train" / "normal" / "by_hand.png").is_file()


def test_the_manifest_is_replaced_whole_or_not_at_all(kaggle, tmp_path, monkeypatch):
    """A run that dies while writing the manifest (here: the disk fills after the first rows) leaves the old one
    whole."""
    import hf_data.prepare

    source, _ = kaggle
    output = tmp_path / "prepared"
    prepare_dataset(source, output)
    before = (output / "manifest.csv").read_bytes()

    class FullDisk(csv.DictWriter):
        def writerows(self, rows):
            self.writerow(next(iter(rows)))
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf_data.prepare.csv, "DictWriter", FullDisk)
    with pytest.raises(OSError, match="No space left"):
        prepare_dataset(source, output, seed=3)
    assert (output / "manifest.csv").read_bytes() == before


def test_runs_with_different_split_settings_each_get_their_own_tree(kaggle, tmp_path, monkeypatch):
    """The default prepared folder is named after the split settings: runs that split one data folder differently,
    one after another or interleaved, never rewrite each other's tree."""
    from transformers import TrainingArguments

    from hf_data.loading import DataArguments, prepare_and_load

    source, _ = kaggle
    monkeypatch.chdir(tmp_path)
    settings = [{}, {"split_seed": 7}, {"validation_fraction": 0.25}, {"keep_kaggle_val": True}]
    loaded, trees = [], []
    for options in settings:
        dataset, report = prepare_and_load(
            DataArguments(data_dir=str(source), **options), TrainingArguments(output_dir="out", report_to="none")
        )
        loaded.append((dataset, folder_checksums(report.output_dir)))
        trees.append(report.output_dir)
    assert len(set(trees)) == len(settings) and trees[0] == (tmp_path / "data" / "prepared" / "chest_xray").resolve()
    for (dataset, sums), tree in zip(loaded, trees, strict=True):
        assert folder_checksums(tree) == sums  # untouched by the runs after it
        assert all(Path(item["path"]).is_file() for split in dataset.values() for item in split["image"])
    # the first settings again
    prepare_and_load(DataArguments(data_dir=str(source)), TrainingArguments(output_dir="out", report_to="none"))
    assert [folder_checksums(tree) for tree in trees] == [sums for _, sums in loaded]


def test_a_shared_prepared_folder_in_use_is_not_rewritten_with_other_settings(kaggle, tmp_path, monkeypatch):
    """Two runs given one --prepared_dir with different split settings: while the first reads the tree, the second
    stops with a message instead of rewriting it; once the first is done, the second may."""
    import gc

    from transformers import TrainingArguments

    from hf_data.loading import DataArguments, prepare_and_load

    source, _ = kaggle
    monkeypatch.chdir(tmp_path)
    shared = str(tmp_path / "shared-tree")
    first, _ = prepare_and_load(
        DataArguments(data_dir=str(source), prepared_dir=shared), TrainingArguments(output_dir="out", report_to="none")
    )
    before = folder_checksums(Path(shared))
    with pytest.raises(
        SystemExit, match=r"in use by another run that split the data differently \(seed 42\).*own --prepared_dir"
    ):
        prepare_and_load(
            DataArguments(data_dir=str(source), prepared_dir=shared, split_seed=7),
            TrainingArguments(output_dir="out", report_to="none"),
        )
    assert folder_checksums(Path(shared)) == before
    same, _ = prepare_and_load(
        DataArguments(data_dir=str(source), prepared_dir=shared), TrainingArguments(output_dir="out", report_to="none")
    )
    assert folder_checksums(Path(shared)) == before  # the same settings may share it

    del first, same
    gc.collect()
    second, _ = prepare_and_load(
        DataArguments(data_dir=str(source), prepared_dir=shared, split_seed=7),
        TrainingArguments(output_dir="out", report_to="none"),
    )
    assert folder_checksums(Path(shared)) != before
