"""The README and the pages under docs/: their Python snippets run as written, their commands
parse, their links point at files that exist, and the README stays a short front page.

The snippets are executed from outside the repository with only ``PYTHONPATH`` pointing at
it, as the docs tell users to, against a tiny model trained and exported by the CLI under
the names the docs use.
"""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

README = REPO / "README.md"
DOCS = REPO / "docs"
MAX_README_LINES = 300
COMMON = ["--bs", "12", "--workers", "0", "--no-progress", "--seed", "1"]
# The Python blocks of all pages run as one script, the README's first, then the docs pages:
# these first, in this order (a page's blocks may continue an earlier page's: scaling.md's
# Milvus example uses the model, gallery and codes of python_api.md), then the rest by name.
SNIPPET_ORDER = ["python_api.md", "scaling.md"]
# What each page's snippets print, so that a snippet that silently does nothing fails.
EXPECTED_OUTPUT = {
    "python_api.md": ["mAP", "best match of the first query", "faiss's best match"],
    "scaling.md": ["Milvus's best match of the first query"],
}


def docs_pages() -> list[Path]:
    pages = sorted(DOCS.glob("*.md"))
    first = [DOCS / name for name in SNIPPET_ORDER]
    return first + [page for page in pages if page not in first]


def all_pages() -> list[Path]:
    return [README, *docs_pages()]


def fenced_blocks(language: str, page: Path) -> list[str]:
    text = page.read_text(encoding="utf-8")
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def prose(page: Path) -> str:
    """The page without its fenced code blocks (where '#' and '[..](..)' mean something else)."""
    text = page.read_text(encoding="utf-8")
    return re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)


def test_docs_pages_exist_in_snippet_order():
    for name in SNIPPET_ORDER:
        assert (DOCS / name).is_file(), name
    assert len(docs_pages()) >= 5


def test_docs_have_python_snippets():
    blocks = [block for page in all_pages() for block in fenced_blocks("python", page)]
    assert len(blocks) >= 3
    assert any("encode_images(model" in block for block in blocks)
    for name in EXPECTED_OUTPUT:
        assert fenced_blocks("python", DOCS / name), name


def test_docs_python_snippets_run_as_written(tiny_data_dir, run_cli, tmp_path):
    pytest.importorskip("faiss")
    (tmp_path / "data").symlink_to(tiny_data_dir, target_is_directory=True)
    # The names the docs use: the Quick start model, then its -e --export-faiss.
    assert run_cli("--dataset", "synthface", *COMMON, "--len", "36", "--num", "6", "--words",
                   "64", "--epochs", "1", "--eval-every", "0", "--amp", "off") == 0
    assert run_cli("-e", "--dataset", "synthface", *COMMON, "--load", "synthface_36bits.tar",
                   "--export-faiss", "gallery.faiss") == 0
    parts = []
    for page in all_pages():
        blocks = fenced_blocks("python", page)
        if blocks:
            parts.append(f"# ---- {page.relative_to(REPO)}\n" + "\n".join(blocks))
    script = tmp_path / "docs_snippets.py"
    script.write_text("\n".join(parts), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, check=False,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    for name, fragments in EXPECTED_OUTPUT.items():
        for fragment in fragments:
            assert fragment in out.stdout, (name, fragment, out.stdout[-2000:])


def opqn_commands(page: Path) -> list[list[str]]:
    commands = []
    for block in fenced_blocks("bash", page):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if "opqn_main.py" in words:
                commands.append(words[words.index("opqn_main.py") + 1:])
    return commands


@pytest.mark.parametrize("page", all_pages(), ids=lambda page: page.name)
def test_docs_commands_use_existing_flags(page):
    import opqn_main

    parser = opqn_main.build_parser()
    for argv in opqn_commands(page):
        parser.parse_args(argv)  # an unknown flag exits 2 and fails the test


def test_docs_commands_are_many():
    assert sum(len(opqn_commands(page)) for page in all_pages()) >= 20


def test_readme_is_a_front_page():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_README_LINES
    bash = "\n".join(fenced_blocks("bash", README))
    for command in ("pip install -r requirements.txt", "python -m pytest -q tests",
                    "python opqn_main.py --dataset synthface --len 36 --num 6 --words 64"):
        assert command in bash, command
    commands = opqn_commands(README)
    for flag in ("-e", "-c", "--search"):
        assert any(flag in argv for argv in commands), flag
    for section in ("## Quick start", "## Documentation", "## Code map", "## Citation"):
        assert re.search(rf"^{re.escape(section)}$", text, flags=re.MULTILINE), section


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def links(page: Path) -> list[str]:
    return LINK.findall(prose(page))


def test_readme_links_every_docs_page():
    linked = {(README.parent / target.split("#")[0]).resolve() for target in links(README)}
    for page in docs_pages():
        assert page.resolve() in linked, f"README does not link {page.relative_to(REPO)}"


def github_anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the page's headings: lower case, punctuation dropped, spaces
    to hyphens, repeats numbered."""
    anchors, seen = set(), {}
    for heading in re.findall(r"^#{1,6} (.+?)\s*$", prose(page), flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


@pytest.mark.parametrize("page", all_pages(), ids=lambda page: page.name)
def test_relative_links_point_at_existing_files(page):
    """Every relative link and image of the page names a file that exists, and an #anchor a
    heading of that file."""
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.relative_to(REPO)}: {target} does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in github_anchors(linked), f"{page.relative_to(REPO)}: {target}"


def test_docs_pages_start_with_a_title_and_a_link_back():
    for page in docs_pages():
        lines = page.read_text(encoding="utf-8").splitlines()
        assert lines[0].startswith("# "), page.name
        assert "(../README.md)" in "\n".join(lines[1:4]), page.name


def code_map_paths(section: str) -> set[str]:
    """The files and folders the code map's list names, as paths from the repository root:
    an item opens with its top folder (`utils/`), and the names under it are relative to it
    unless they start at the root (`bench/...`)."""
    roots = ("models/", "losses/", "data/", "utils/", "bench/", "tests/", "opqn_main.py")
    paths = set(re.findall(r"`((?:models|losses|data|utils|bench)/[\w/]*\.py)`", section))
    bullets = next(part for part in section.split("\n\n") if part.startswith("- "))
    for item in bullets[2:].split("\n- "):  # one item per top folder, then its files
        folder = re.match(r"`(\w+)/`", item).group(1)
        for name in re.findall(r"`([\w/]+\.py|[\w/]+/)`", item)[1:]:
            paths.add(name if name.startswith(roots) else f"{folder}/{name}")
    return paths


def test_code_map_names_files_and_functions_that_exist():
    """Every file and function the README's code map names is there (moves update it), and
    it names every package and module of models/, losses/, data/ and utils/."""
    section = README.read_text(encoding="utf-8").split("## Code map", 1)[1].split("\n## ")[0]
    paths = code_map_paths(section)
    assert len(paths) > 30
    for path in paths:
        assert (REPO / path).exists(), path
    for folder in ("models", "losses", "data", "utils"):
        for module in (REPO / folder).rglob("*.py"):
            rel = module.relative_to(REPO)
            if module.name == "__init__.py":
                if len(rel.parts) > 2:  # a sub-package, named as `pkg/`
                    assert f"{rel.parent.as_posix()}/" in paths, rel.parent
                continue
            assert rel.as_posix() in paths, rel
    sources = "\n".join(p.read_text(encoding="utf-8") for folder in
                        ("models", "losses", "data", "utils") for p in (REPO / folder).rglob("*.py"))
    table = [line for line in section.splitlines() if line.startswith("| ")][2:]
    names = {name for line in table for name in re.findall(r"`([A-Za-z_][\w.]*)`", line)}
    assert len(names) > 8
    for name in names:
        for part in name.split("."):
            assert re.search(rf"^\s*(def|class) {part}\b", sources, flags=re.MULTILINE), name
