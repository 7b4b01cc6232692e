"""The docs cannot drift from the code: every command in README.md, docs/*.md and recipes/*.args names only options
that its script's parser takes (and recipes and presets that exist), and every repository file, link, anchor and
module the docs name is there."""

import argparse
import contextlib
import importlib
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RECIPES = sorted((ROOT / "recipes").glob("*.args"))
SCRIPTS = {path.name: path.stem for path in ROOT.glob("*.py")}  # train_vit.py, app.py, predict.py, ...
PACKAGES = ("cxr", "hf_data", "benchmarks")  # `python -m` names outside these (pytest, pip) are not ours to check
SOURCE_ROOTS = ("cxr", "hf_data", "benchmarks", "tests", "docs", "recipes", "space", "examples", "metrics", "models")
SOURCE_ROOTS += (".ci",)
SHELL_BLOCKS = ("", "bash", "sh", "shell", "console")
# A repository path: a source folder, then anything a path holds; not inside a URL or another path.
PATH = re.compile(r"(?<![\w./~-])((?:" + "|".join(re.escape(root) for root in SOURCE_ROOTS) + r")/[\w./-]*)")
MODULE_NAME = re.compile(r"(?<![\w./-])((?:" + "|".join(PACKAGES) + r")(?:\.\w+)+)")
FILE_SUFFIXES = {"md", "py", "txt", "json", "yaml", "args", "csv", "png", "toml"}
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def shell_words(text: str) -> list[str]:
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    try:
        return list(lexer)
    except ValueError:  # an unbalanced quote in prose: plain words are enough to find options
        return text.split()


def code_of(path: Path) -> tuple[list[str], list[str]]:
    """(shell command lines, inline code spans) of a Markdown page; a recipe's comment lines count as commands."""
    text = path.read_text()
    if path.suffix == ".args":
        return [line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")], []
    commands, prose, fence = [], [], None
    for line in text.replace("\\\n", " ").splitlines():
        if line.lstrip().startswith("```"):
            fence = line.strip().strip("`").strip() if fence is None else None
        elif fence is not None:
            if fence in SHELL_BLOCKS:
                commands.append(line)
        else:
            prose.append(line)
    return commands, re.findall(r"`([^`]+)`", "\n".join(prose))  # a span may wrap onto the next line


def invocations(text: str) -> list[tuple[str, list[str]]]:
    """Each (script or module, its words) in a command line: `python x.py ...`, `python -m pkg.mod ...`, and a root
    script after any launcher (`torchrun ... train_vit.py ...`, `accelerate launch ... train_vit.py ...`)."""
    words, found = shell_words(text), []
    for index, word in enumerate(words):
        if word in SCRIPTS:
            name = word
        elif word == "-m" and index and words[index - 1].startswith("python") and index + 1 < len(words):
            name = words[index + 1]
            index += 1
            if name.split(".")[0] not in PACKAGES:
                continue
        else:
            continue
        arguments = []
        for later in words[index + 1 :]:
            if later in SCRIPTS or later.startswith("python") or set(later) <= set("();<>|&"):
                break
            arguments.append(later)
        found.append((name, arguments))
    return found


def build_parser(name: str) -> argparse.ArgumentParser:
    """The parser of a root script (`train_vit.py`) or a module run with -m (`benchmarks.fit`, `hf_data`)."""
    module = importlib.import_module(SCRIPTS.get(name, name))
    if not hasattr(module, "build_parser") and hasattr(module, "__path__"):  # a package: python -m hf_data
        module = importlib.import_module(f"{name}.__main__")
    if not hasattr(module, "build_parser"):
        raise LookupError(f"{name} has no build_parser(): no command line to check against")
    return module.build_parser()


def option_errors(name: str, arguments: list[str]) -> list[str]:
    """What in `arguments` the parser of `name` would refuse: unknown options, and train_vit.py's --recipe and
    preset names that do not exist."""
    try:
        parser = build_parser(name)
    except (LookupError, ImportError) as error:
        return [str(error)]
    options = dict(parser._option_string_actions)
    for action in parser._actions:  # a subcommand's own options (python -m hf_data prepare ...)
        if isinstance(action, argparse._SubParsersAction):
            command = next((word for word in arguments if word in action.choices), None)
            if command:
                options.update(action.choices[command]._option_string_actions)
    errors = []
    for index, word in enumerate(arguments):
        option = word.split("=", 1)[0]
        if re.fullmatch(r"--[A-Za-z][\w-]*", option) and option not in options:
            errors.append(f"{name}: no option {option}")
        value = arguments[index + 1] if index + 1 < len(arguments) else ""
        if name == "train_vit.py" and value[:1].isalnum() and "$" not in value and not value.isupper():  # not $D, NAME
            if option == "--recipe" and not (ROOT / "recipes" / f"{value}.args").is_file():
                errors.append(f"train_vit.py: no recipe {value} (recipes/{value}.args)")
            if option == "--model" and value.startswith("scratch-") and value not in preset_names():
                errors.append(f"train_vit.py: no preset {value} (cxr/models.py)")
    return errors


def preset_names() -> set[str]:
    from cxr.models import PRESETS

    return set(PRESETS)


def parse_errors(name: str, arguments: list[str]) -> list[str]:
    """What the parser of `name` says of the whole command line: positionals too many or missing, bad values."""
    try:
        parser = build_parser(name)
    except (LookupError, ImportError):
        return []  # option_errors says so
    message = io.StringIO()
    with contextlib.redirect_stderr(message), contextlib.redirect_stdout(io.StringIO()):
        try:
            parser.parse_args(arguments)
        except SystemExit as stop:
            if stop.code:
                return [f"{name}: {message.getvalue().strip().splitlines()[-1].split(': error: ')[-1]}"]
    return []


def command_errors(path: Path) -> list[str]:
    commands, spans = code_of(path)
    errors = []
    for text in commands + spans:
        for name, arguments in invocations(text):
            errors += [f"{error}  (in: {text.strip()[:100]})" for error in option_errors(name, arguments)]
            # a whole command a reader would paste (not a layout line, a shell variable or an @LIST file)
            if text in commands and text.lstrip().startswith("python") and not set("$@") & set(text):
                errors += [f"{error}  (in: {text.strip()[:100]})" for error in parse_errors(name, arguments)]
    if path.suffix == ".args":  # the recipe's own option lines are train_vit.py's options
        errors += option_errors("train_vit.py", shell_words(path.read_text()))
    return errors


def github_anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to hyphens, -1 on repeats."""
    anchors, text = set(), re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for heading in re.findall(r"^#+\s+(.+)$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchor, count = slug, 1
        while anchor in anchors:
            anchor, count = f"{slug}-{count}", count + 1
        anchors.add(anchor)
    return anchors


def path_errors(path: Path) -> list[str]:
    """Repository paths named anywhere in the page, and its relative links (with their anchors), that do not exist."""
    text, errors = path.read_text(), []
    for match in PATH.finditer(text):
        if re.search(r"--output(_dir)?[ =]$", text[: match.start()]):  # a folder the command writes
            continue
        name = re.split(r"::|:\d", match[1])[0].rstrip(".")  # tests/x.py::test_name, cxr/x.py:42, end of a sentence
        placeholder = re.search(r"[*<{$]|(?<![A-Za-z])(NAME|X|N)(?![A-Za-z])", name)  # recipes/NAME.args, test_X.py
        if not placeholder and not (ROOT / name).exists():
            errors.append(f"no file {name}")
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            errors.append(f"link to {target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in github_anchors(linked):
            errors.append(f"link to {target}: no such heading")
    return errors


def module_errors(path: Path) -> list[str]:
    """Dotted project names (`cxr.features.forward_features`, `python -m benchmarks.fit`) that do not resolve."""
    errors = []
    for name in sorted(set(MODULE_NAME.findall(path.read_text()))):
        parts, found = name.split("."), None
        if parts[-1] in FILE_SUFFIXES:  # benchmarks.md is a page, not a module
            continue
        for end in range(len(parts), 0, -1):
            try:
                found = importlib.import_module(".".join(parts[:end]))
                break
            except ModuleNotFoundError:
                continue
        for attribute in parts[end:]:
            found = getattr(found, attribute, None)
        if found is None:
            errors.append(f"no {name}")
    return errors


def relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("path", DOCS + RECIPES, ids=relative)
def test_every_command_uses_options_its_script_takes(path):
    assert command_errors(path) == []


@pytest.mark.parametrize("path", DOCS + RECIPES, ids=relative)
def test_every_repository_path_and_link_exists(path):
    assert path_errors(path) == []


@pytest.mark.parametrize("path", DOCS + RECIPES, ids=relative)
def test_every_module_named_exists(path):
    assert module_errors(path) == []


def test_one_recipe_calls_itself_the_default_and_the_readme_trains_with_it():
    first_lines = {path.stem: path.read_text().splitlines()[0] for path in RECIPES}
    defaults = [name for name, line in first_lines.items() if "default" in line.lower()]
    assert len(defaults) == 1, f"recipes whose first line says 'default': {defaults}"
    assert f"--recipe {defaults[0]}" in (ROOT / "README.md").read_text()


def test_the_checks_catch_a_misspelt_option_a_moved_file_and_a_missing_recipe(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "```bash\npython train_vit.py --data_dir x --recipe vit-offlin --num_train_epoch 3 \\\n  --output_dir y\n"
        "python site_check.py path/to/model path/to/site\n```\n"
        "Run `python -m benchmarks.fit a b --data_dir x --averge`; the loader is in cxr/image.py, not "
        "[here](../docs/nowhere.md), and `cxr.images.load_imag` is misspelt.\n"
    )
    assert [error.split("  (in")[0] for error in command_errors(page)] == [
        "train_vit.py: no recipe vit-offlin (recipes/vit-offlin.args)",
        "train_vit.py: no option --num_train_epoch",
        "site_check.py: unrecognized arguments: path/to/site",
        "benchmarks.fit: no option --averge",
    ]
    assert sorted(path_errors(page)) == ["link to ../docs/nowhere.md: no such file", "no file cxr/image.py"]
    assert module_errors(page) == ["no cxr.images.load_imag"]
