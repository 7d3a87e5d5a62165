"""The README's Python snippets run as written, and its commands parse.

The snippets are executed from outside the repository with only ``PYTHONPATH`` pointing at
it, as the README tells users to, against a tiny model trained and exported by the CLI
under the names the README uses.
"""
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import REPO

README = REPO / "README.md"
COMMON = ["--bs", "12", "--workers", "0", "--no-progress", "--seed", "1"]


def fenced_blocks(language: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_has_python_snippets():
    blocks = fenced_blocks("python")
    assert len(blocks) >= 2
    assert any("encode_images(model" in block for block in blocks)


def test_readme_python_snippets_run_as_written(tiny_data_dir, run_cli, tmp_path):
    pytest.importorskip("faiss")
    (tmp_path / "data").symlink_to(tiny_data_dir, target_is_directory=True)
    # The names the README uses: the Quick start model, then its -e --export-faiss.
    assert run_cli("--dataset", "synthface", *COMMON, "--len", "36", "--num", "6", "--words",
                   "64", "--epochs", "1", "--eval-every", "0", "--amp", "off") == 0
    assert run_cli("-e", "--dataset", "synthface", *COMMON, "--load", "synthface_36bits.tar",
                   "--export-faiss", "gallery.faiss") == 0
    script = tmp_path / "readme_snippets.py"
    script.write_text("\n".join(fenced_blocks("python")), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "mAP" in out.stdout and "best match of the first query" in out.stdout
    assert "faiss's best match" in out.stdout


def readme_commands() -> list[list[str]]:
    commands = []
    for block in fenced_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if "opqn_main.py" in words:
                commands.append(words[words.index("opqn_main.py") + 1:])
    return commands


def test_readme_commands_use_existing_flags():
    import opqn_main

    commands = readme_commands()
    assert len(commands) >= 5
    parser = opqn_main.build_parser()
    for argv in commands:
        parser.parse_args(argv)  # an unknown flag exits 2 and fails the test


def test_code_map_names_files_and_functions_that_exist():
    """Every file and function the README's code map names is there (moves update it)."""
    section = README.read_text(encoding="utf-8").split("## Code map", 1)[1].split("\n## ")[0]
    paths = set(re.findall(r"`((?:models|losses|data|utils|bench)/[\w/]*\.py)`", section))
    bullets = next(part for part in section.split("\n\n") if part.startswith("- "))
    for item in bullets[2:].split("\n- "):  # one item per folder: `folder/`, then its files
        folder = re.match(r"`(\w+)/`", item).group(1)
        paths |= {f"{folder}/{name}" for name in re.findall(r"`([\w/]+\.py|\w+/)`", item)[1:]}
    assert len(paths) > 30
    for path in paths:
        assert (REPO / path).exists(), path
    sources = "\n".join(p.read_text(encoding="utf-8") for folder in
                        ("models", "losses", "data", "utils") for p in (REPO / folder).rglob("*.py"))
    table = [line for line in section.splitlines() if line.startswith("| ")][2:]
    names = {name for line in table for name in re.findall(r"`([A-Za-z_][\w.]*)`", line)}
    assert len(names) > 8
    for name in names:
        for part in name.split("."):
            assert re.search(rf"^\s*(def|class) {part}\b", sources, flags=re.M), name
