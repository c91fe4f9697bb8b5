"""One pre-training step's loss and gradients, for the 2-process equivalence test (run by torchrun).

Usage: torchrun --nproc_per_node N tests/dist_step.py OUT_DIR. Every process builds the same world and
model from seeds; the global batch of 8 pairs is split evenly across processes.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from accelerate import Accelerator
from safetensors.torch import save_file

from qanchor_lab.model import QAnchorModel
from qanchor_lab.pretrain import PretrainConfig, PretrainStep, _global_sum, count_answer_tokens, make_pairs
from qanchor_lab.world import WorldConfig, generate_world
from tests.conftest import tiny_config

GLOBAL_BATCH = 8


def main(out: Path) -> None:
    acc = Accelerator(cpu=True)
    world = generate_world(WorldConfig(n_users=1000, seed=5))
    model = QAnchorModel.from_data(tiny_config(), world.events, world.profiles, world.users_in("pretrain"))
    store = model.behaviour(world.events, world.profiles, world.users_in("pretrain"))
    pairs = make_pairs(world.qa, store)
    per = GLOBAL_BATCH // acc.num_processes
    mine = np.arange(GLOBAL_BATCH)[acc.process_index * per:(acc.process_index + 1) * per]
    step = acc.prepare(PretrainStep(model, PretrainConfig(batch_size=max(per, 2))))
    answers = [pairs.answers[i] for i in mine]
    n_tok = _global_sum(count_answer_tokens(model, answers), acc.device)
    loss, *_ = step(store.batch(pairs.user_index[mine]), [pairs.queries[i] for i in mine], answers,
                            torch.as_tensor(pairs.user_index[mine]), torch.as_tensor(pairs.answer_ids[mine]),
                            n_tok / acc.num_processes)
    acc.backward(loss)
    total = loss.detach().clone()
    if acc.num_processes > 1:
        dist.all_reduce(total)
    if acc.is_main_process:
        grads = {n: p.grad.detach().contiguous() for n, p in acc.unwrap_model(step).named_parameters() if p.grad is not None}
        out.mkdir(parents=True, exist_ok=True)
        save_file(grads, out / "grads.safetensors")
        (out / "result.json").write_text(json.dumps({"world_size": acc.num_processes,
                                                     "loss": float(total) / acc.num_processes}))
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
