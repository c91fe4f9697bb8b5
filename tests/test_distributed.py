"""Two processes (torchrun, gloo on CPU) give the loss and gradients of one process on the whole batch, and the
learning-rate schedule of one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(script: str, n: int, out: Path, port: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", str(port),
           str(ROOT / "tests" / script), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _run(n: int, out: Path) -> dict:
    _torchrun("dist_step.py", n, out, 29500 + n)
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


@pytest.mark.slow
def test_two_processes_follow_the_one_process_learning_rate_schedule(tmp_path):
    """The schedule advances once per optimizer step, whatever the process count (Accelerate's wrapped
    scheduler steps once per process: two processes ran warm-up and cosine twice as fast, then climbed back)."""
    rates = {}
    for n in (1, 2):
        _torchrun("dist_pretrain.py", n, tmp_path / str(n), 29510 + n)  # ports apart from dist_step's
        log = [json.loads(line) for line in (tmp_path / str(n) / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log] == list(range(1, 9))
        rates[n] = [r["lr"] for r in log]
    assert rates[2] == rates[1]
    peak = rates[1].index(max(rates[1]))
    assert rates[1][0] < rates[1][peak] == pytest.approx(1e-3) and peak == 1               # 2 warm-up steps
    after = rates[1][peak:]
    assert all(a >= b for a, b in zip(after, after[1:])) and after[-1] < 1e-9          # cosine down to 0
