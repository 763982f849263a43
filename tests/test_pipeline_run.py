"""The end-to-end entry point on tiny models: data -> D -> SFT -> joint RL -> evaluation, then a rerun resumes.

Runs `python -m pipelines.run` as a user would (a subprocess with its own local Ray).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "tests" / "fixtures" / "run_tiny.yaml"


def run(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pipelines.run", "--config", str(CONFIG), "--set", f"run_dir={run_dir}",
               "--set", "ray_address=local", *extra]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1500)


@pytest.mark.slow
def test_run_end_to_end_then_resume(tmp_path):
    run_dir = tmp_path / "run"
    first = run(run_dir)
    assert first.returncode == 0, first.stderr[-4000:]
    stages = json.loads((run_dir / "stages.json").read_text())
    assert list(stages) == ["data", "dataset", "sft", "rl", "evaluate"]
    table = (run_dir / "eval" / "results.md").read_text()
    for method in ("HAPS", "HAPS z, adapters removed (eval only)", "w/o high-level router (random z)", "oracle (D)"):
        assert f"| {method} |" in table
    assert (run_dir / "eval" / "results.png").stat().st_size > 1000
    assert "HAPS" in first.stdout
    metrics = [json.loads(line) for line in (run_dir / "rl" / "metrics" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/reward" in m for m in metrics) and any("valid/reward" in m for m in metrics)
    assert any("test/reward" in m for m in metrics)
    d_files = list((run_dir / "dataset" / "D").rglob("*.parquet"))
    assert d_files

    second = run(run_dir)
    assert second.returncode == 0, second.stderr[-4000:]
    assert second.stderr.count("done in an earlier run, skipped") == 5
