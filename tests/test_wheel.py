"""What `pip install showtell` gives: a complete wheel (every module of the checkout's packages, and nothing
else) that runs its main job from any folder without the checkout or the extras (`showtell --version`,
`showtell demo --preset tiny`), printing commands as `showtell ...`; and how printed commands name the
program (base.invocation)."""

import os
import re
import subprocess
import zipfile
from pathlib import Path

import pytest
from helpers import REPO, build_wheel, install_wheel

from base import invocation
from base.invocation import command_line, program_name

PACKAGES = ("base", "data", "extract", "decoder", "beam", "evaluation")


def test_printed_commands_name_the_program_as_invoked(monkeypatch, tmp_path):
    assert program_name("/home/u/venv/bin/showtell") == "showtell"
    assert program_name("cli.py") == "python cli.py"
    assert program_name("../showtell/cli.py") == "python ../showtell/cli.py"
    assert program_name("/x/my dir/cli.py") == "python '/x/my dir/cli.py'"
    # in-process (here: pytest) in a checkout: the checkout's cli.py; an installed copy: the console script
    assert program_name("/usr/bin/pytest") == "python cli.py"
    monkeypatch.setattr("sys.argv", ["/usr/bin/pytest"])
    line = command_line("caption", "--model-dir", "my model", 3)
    assert line == "python cli.py caption --model-dir 'my model' 3"
    monkeypatch.setattr(invocation, "_ROOT", tmp_path)  # site-packages: no setup.cfg next to cli.py
    assert program_name("/usr/bin/pytest") == "showtell"


@pytest.mark.slow
def test_the_wheel_installs_and_runs_the_tiny_demo_from_anywhere(tmp_path):
    wheel = build_wheel(tmp_path / "build")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {p.relative_to(REPO).as_posix() for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")
               if "__pycache__" not in p.parts}
    assert not sorted({"cli.py", *sources} - names), "modules missing from the wheel"
    assert {n.split("/")[0] for n in names} - {"cli.py", *PACKAGES} == {"showtell-0.1.0.dist-info"}

    python = install_wheel(wheel, tmp_path / "venv")  # no pycocoevalcap: the plain install
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "TF_CPP_MIN_LOG_LEVEL": "2"}

    def run(*argv, timeout=120):
        return subprocess.run([str(a) for a in argv], cwd=elsewhere, env=env, capture_output=True, text=True,
                              timeout=timeout)

    probe = "import cli, evaluation.metrics as m; print(cli.__file__, m.pycocoevalcap_dir())"
    where = run(python, "-c", probe, timeout=300)
    module_file, coco = where.stdout.split()
    assert Path(module_file).is_relative_to(tmp_path / "venv") and coco == "None", where.stderr
    showtell = python.parent / "showtell"
    version = run(showtell, "--version")
    assert version.returncode == 0 and version.stdout.strip() == "showtell, version 0.1.0"

    demo = run(showtell, "demo", "--preset", "tiny", "--workdir", "w", "--no-progress", timeout=1800)
    out = demo.stdout
    assert demo.returncode == 0, (out[-2000:], demo.stderr[-3000:])
    commands = [line for line in out.splitlines() if line.startswith("$ ")]
    assert len(commands) == 9 and all(c.startswith("$ showtell ") for c in commands), commands
    assert "cli.py" not in out
    assert len(re.findall(r"^CIDEr +\d+\.\d{4}$", out, re.M)) == 3  # the XE, SCST and attention tables
    assert "scorers: showtell's own (no pycocoevalcap)" in out and "METEOR and SPICE skipped" in out
    assert re.search(r"^SCST vs XE: CIDEr \d+\.\d{3} vs \d+\.\d{3}", out, re.M)
    assert (elsewhere / "w" / "report.html").is_file()
    print("\n".join(out.splitlines()[-12:]))  # the demo's last lines (pytest -s shows them)
