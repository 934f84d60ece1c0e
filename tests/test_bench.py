"""Every benchmark runs: `python bench/X.py --smoke` (toy sizes, a few seconds each) exits 0 and prints its
headline ratio line last, as the full run does. The numbers of a smoke run mean nothing; only the shape of
the output is checked. Independent of ../shared/data (the benches fall back to generated inputs)."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# bench file -> its headline line (the last one), the ratio in group 1
HEADLINES = {
    "attention.py": r"headline: streamed / in-memory attention train step: (\S+) \(target >= 0\.90\)",
    "beam.py": r"speed-up batched / per-image: (\S+)x \(target >= 10x\)",
    "extract.py": r"extract / ceiling: (\S+) \(target >= 0\.90\)",
    "export.py": r"exported / caption \(worse of batch 1 and \d+\): (\S+) \(target >= 0\.90\)",
    "scst.py": r"headline: reward share of the SCST step (\S+) \(target <= 0\.15\)",
    "train_decoder.py": r"headline: training from the feature cache is (\S+)x faster than the im2txt-style "
                        r"step \(median of \d+ back-to-back pairs\)",
}


def run_smoke(name: str) -> list[str]:
    """Run bench/<name> --smoke; its stdout lines (fails on a non-zero exit, with the output)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / name), "--smoke"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (f"bench/{name} --smoke exited {proc.returncode}:\n"
                                  f"{proc.stdout}\n{proc.stderr}")
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines, f"bench/{name} --smoke printed nothing:\n{proc.stderr}"
    assert "(smoke)" in lines[0], lines[0]
    return lines


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(HEADLINES))
def test_bench_smoke(name):
    lines = run_smoke(name)
    match = re.fullmatch(HEADLINES[name], lines[-1])
    assert match, f"last line of bench/{name} is not its headline: {lines[-1]!r}"
    ratio = float(match.group(1))
    assert math.isfinite(ratio) and ratio > 0, lines[-1]


def test_every_benchmark_is_smoke_tested():
    """A bench/*.py that runs as a script (`if __name__ == "__main__"`) is in HEADLINES (so a new benchmark
    cannot rot unseen); the others are helper modules the benches import."""
    for path in sorted((REPO / "bench").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        if "__main__" in text:
            assert path.name in HEADLINES, f"bench/{path.name} is not smoke-tested in tests/test_bench.py"
