"""One spelling for options: every command line takes `--name_with_underscores`, as train_vit.py does; the help
lists that spelling, and the earlier dashed one still works (unlisted) so commands written before still run."""

import pytest

from benchmarks.fuzz_images import build_parser as fuzz_parser
from benchmarks.load import build_parser as load_parser
from hf_data.__main__ import build_parser as hf_data_parser

# (parser, the command's fixed words, {option as spelled now: (its earlier spelling, a value, the parsed value)})
COMMANDS = {
    "hf_data prepare": (
        hf_data_parser,
        ["prepare", "SOURCE", "OUTPUT"],
        {
            "--validation_fraction": ("--validation-fraction", "0.25", 0.25),
            "--split_seed": ("--seed", "7", 7),
            "--keep_kaggle_val": ("--keep-kaggle-val", None, True),
        },
    ),
    "hf_data synthetic": (
        hf_data_parser,
        ["synthetic", "OUTPUT"],
        {"--images_per_class": ("--images-per-class", "6", 6)},
    ),
    "benchmarks.fuzz_images": (
        fuzz_parser,
        [],
        {"--time_limit": ("--time-limit", "60", 60.0), "--memory_limit": ("--memory-limit", "512", 512.0)},
    ),
    "benchmarks.load": (load_parser, [], {"--max_seconds": ("--max-seconds", "30", 30.0)}),
}


def parse(parser, words, option, value):
    return vars(parser().parse_args([*words, option] + ([value] if value is not None else [])))


@pytest.mark.parametrize("command", COMMANDS)
def test_each_option_is_spelled_with_underscores_and_the_dashed_spelling_still_works(command):
    parser, words, options = COMMANDS[command]
    defaults = vars(parser().parse_args(words))
    for option, (old, value, parsed) in options.items():
        dest = option.removeprefix("--")
        assert defaults[dest] != parsed, "pick a test value other than the default"
        assert parse(parser, words, option, value)[dest] == parsed
        # the same namespace, nothing more
        assert parse(parser, words, old, value) == parse(parser, words, option, value)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_lists_the_underscore_spelling_only(command, capsys):
    parser, words, options = COMMANDS[command]
    with pytest.raises(SystemExit) as exit_info:
        parser().parse_args([*words[:1], "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option, (old, _, _) in options.items():
        assert option in text
        assert old + " " not in text and old + "\n" not in text and old + "]" not in text and old + "," not in text
