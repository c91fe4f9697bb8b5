"""Two processes (torchrun, gloo on CPU) give the loss and gradients of one process on the whole batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def _run(n: int, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", str(29500 + n),
           str(ROOT / "tests" / "dist_step.py"), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_concatenated_batch(tmp_path):
    one = _run(1, tmp_path / "one")
    two = _run(2, tmp_path / "two")
    assert one["world_size"] == 1 and two["world_size"] == 2  # torchrun really started two ranks
    assert abs(one["loss"] - two["loss"]) < 1e-5
    g1, g2 = load_file(tmp_path / "one" / "grads.safetensors"), load_file(tmp_path / "two" / "grads.safetensors")
    assert g1.keys() == g2.keys() and len(g1) > 10
    worst = max(float((g1[k] - g2[k]).abs().max()) for k in g1)
    assert worst < 1e-5, worst
    assert any(float(g.abs().max()) > 0 for g in g1.values())
