"""Assemble a folder ready to `git push` to a Hugging Face Space.

    python -m cxr.space --output_dir build/space                                 # the shipped model, bundled
    python -m cxr.space --model_id your-name/swiftformer-xray --output_dir build/space   # a model on the Hub

It copies app.py, the local modules app.py imports (found by reading their import statements), the example
X-rays and LICENSE, and writes README.md (the Space's front matter) and requirements.txt from the templates in
`space/`, each package pinned as in the repository's requirements.txt. Without --model_id it also copies the model
that ships with the code into the Space (models/..., its weights tracked by Git LFS through .gitattributes), so
pushing that folder alone makes a working Space; with --model_id the Space loads that Hub model instead, fetched when
the Space is built (`preload_from_hub`). The output folder must be empty or a fresh clone of the Space (only `.git*`
entries); `--overwrite` first removes everything else in it. See docs/deployment.md for the whole route.
"""

from __future__ import annotations

import argparse
import ast
import re
import shutil
import sys
from pathlib import Path
from string import Template

from cxr.models import SHIPPED_MODEL_DIR

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "space"
APP = "app.py"
EXTRAS = ("examples", "LICENSE")  # copied where they exist
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s#;]+)")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def pins(requirements: Path = REPO / "requirements.txt") -> dict[str, str]:
    """{normalized package name: version} for every `name==version` line."""
    found = {}
    for line in requirements.read_text().splitlines():
        match = REQUIREMENT.match(line)
        if match:
            found[normalize(match[1])] = match[2]
    return found


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def module_level_imports(path: Path) -> set[str]:
    """Dotted names imported by the statements that run when `path` is imported (not those inside functions)."""
    names: set[str] = set()

    def visit(statements):
        for node in statements:
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                for block in ("body", "orelse", "finalbody", "handlers"):
                    for child in getattr(node, block, []):
                        visit(child.body if isinstance(child, ast.ExceptHandler) else [child])

    visit(ast.parse(path.read_text(), str(path)).body)
    return names


def local_modules(entry: str = APP, root: Path = REPO) -> list[Path]:
    """The repository files that importing `entry` loads (itself, local modules, their packages' __init__.py),
    sorted."""
    found: set[Path] = set()
    pending = [root / entry]
    while pending:
        path = pending.pop()
        if path in found:
            continue
        found.add(path)
        for name in module_level_imports(path):
            parts = name.split(".")
            for depth in range(1, len(parts) + 1):
                base = root.joinpath(*parts[:depth])
                for candidate in (base / "__init__.py", base.with_suffix(".py")):
                    if candidate.is_file():
                        pending.append(candidate)
    return sorted(path.relative_to(root) for path in found)


def third_party_imports(files: list[Path], root: Path = REPO) -> set[str]:
    """Top-level names of the non-local, non-standard-library modules those files import when loaded."""
    local = {path.parts[0].removesuffix(".py") for path in files}
    names = {name.split(".")[0] for path in files for name in module_level_imports(root / path)}
    return {
        name for name in names if name not in local and name not in sys.stdlib_module_names and name != "__future__"
    }


def requirements_text(template: Path = TEMPLATES / "requirements.txt", pinned: dict[str, str] | None = None) -> str:
    """The template with each bare package name pinned from the repository's requirements.txt."""
    pinned = pins() if pinned is None else pinned
    lines = []
    for line in template.read_text().splitlines():
        name = line.strip()
        if name and not name.startswith(("#", "-")):
            if normalize(name) not in pinned:
                raise SystemExit(f"space/requirements.txt names '{name}', which requirements.txt does not pin.")
            line = f"{name}=={pinned[normalize(name)]}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def readme_text(
    model_id: str | None, template: Path = TEMPLATES / "README.md", pinned: dict[str, str] | None = None
) -> str:
    """The Space's README.md: for a Hub model, front matter that names it (`models`, `preload_from_hub`); for the
    bundled one, none (app.py then serves the folder beside it)."""
    pinned = pins() if pinned is None else pinned
    bundled = SHIPPED_MODEL_DIR.relative_to(REPO).as_posix()
    if model_id:
        model_lines = f"models:\n  - {model_id}\npreload_from_hub:\n  - {model_id}\n"
        model_text = (
            f"the model [`{model_id}`](https://huggingface.co/{model_id}), loaded from the Space's copy of it "
            "(`preload_from_hub`); set the Space variable `XRAY_MODEL` to serve another"
        )
    else:
        model_lines = ""
        model_text = f"the model in `{bundled}/` (its card is `{bundled}/README.md`), bundled with the Space"
    return Template(template.read_text()).substitute(
        model_lines=model_lines,
        model_text=model_text,
        command=f"python -m cxr.space{f' --model_id {model_id}' if model_id else ''}",
        gradio_version=pinned["gradio"],
    )


def assemble(model_id: str | None, output_dir: Path, overwrite: bool = False) -> list[Path]:
    """Write the Space folder into `output_dir`, for the Hub model `model_id` or, where None, with the shipped model
    folder bundled; return its files (relative), sorted."""
    if model_id is None and not (SHIPPED_MODEL_DIR / "config.json").is_file():
        raise SystemExit(f"No shipped model at {SHIPPED_MODEL_DIR} to bundle; give --model_id (docs/deployment.md).")
    if model_id is not None and (not HUB_ID.match(model_id) or Path(model_id).expanduser().exists()):
        raise SystemExit(
            f"--model_id: '{model_id}' is not a Hub id (owner/name); push the model first (docs/deployment.md)."
        )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    others = [entry for entry in output_dir.iterdir() if not entry.name.startswith(".git")]
    if others and not overwrite:
        raise SystemExit(
            f"--output_dir: '{output_dir}' already holds files ({', '.join(sorted(e.name for e in others)[:5])}); "
            "give an empty folder or a fresh clone of the Space, or add --overwrite to replace them."
        )
    for entry in others:
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()

    for relative in local_modules():
        (output_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / relative, output_dir / relative)
    for name in EXTRAS:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, output_dir / name)
        elif source.is_file():
            shutil.copyfile(source, output_dir / name)
    if model_id is None:
        shutil.copytree(SHIPPED_MODEL_DIR, output_dir / SHIPPED_MODEL_DIR.relative_to(REPO))
        # The Hub takes binary files over 10 MB only through Git LFS (or Xet).
        attributes = output_dir / ".gitattributes"  # a fresh clone of a Space has one: keep its lines
        lines = attributes.read_text() if attributes.is_file() else ""
        if "*.safetensors" not in lines:
            attributes.write_text(lines + "*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    pinned = pins()
    (output_dir / "README.md").write_text(readme_text(model_id, pinned=pinned), encoding="utf-8")
    (output_dir / "requirements.txt").write_text(requirements_text(pinned=pinned))
    return sorted(
        path.relative_to(output_dir) for path in output_dir.rglob("*") if path.is_file() and ".git" not in path.parts
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model_id",
        default=None,
        help="The Hub id of the model the Space serves (owner/name). Default: none, and the model that ships with the "
        f"code ({SHIPPED_MODEL_DIR.relative_to(REPO)}) is copied into the Space.",
    )
    parser.add_argument(
        "--output_dir", type=Path, default=Path("build/space"), help="Where to write the Space. Default: build/space."
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="Remove what the output folder holds (except .git*) first."
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    files = assemble(args.model_id, args.output_dir, args.overwrite)
    served = args.model_id or f"the bundled {SHIPPED_MODEL_DIR.relative_to(REPO)}"
    print(f"Space for {served} in {args.output_dir}/ ({len(files)} files):")
    for path in files:
        print(f"  {path}")
    lfs = "" if args.model_id else "git lfs install && "
    print(f"Push it: cd {args.output_dir} && {lfs}git add -A && git commit -m 'Assemble the Space' && git push")


if __name__ == "__main__":
    main()
