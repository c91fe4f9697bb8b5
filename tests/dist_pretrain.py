"""A few steps of the real `pretrain`, for the 2-process learning-rate schedule test (run by torchrun).

Usage: torchrun --nproc_per_node N tests/dist_pretrain.py OUT_DIR. Every process builds the same small world and
tiny model from seeds; the main process writes OUT_DIR/log.jsonl with every step's `lr`.
"""

import sys
from pathlib import Path

from accelerate import Accelerator

from qanchor_lab.model import QAnchorModel
from qanchor_lab.pretrain import PretrainConfig, pretrain
from qanchor_lab.world import WorldConfig, generate_world
from tests.conftest import tiny_config

STEPS = 8


def main(out: Path) -> None:
    acc = Accelerator(cpu=True)
    world = generate_world(WorldConfig(n_users=300, seed=5))
    model = QAnchorModel.from_data(tiny_config(), world.events, world.profiles, world.users_in("pretrain"))
    # warm-up int(0.25 * 8) = 2 steps, then the cosine to 0 at step 8; a log line every step
    config = PretrainConfig(batch_size=4, max_steps=STEPS, lr=1e-3, warmup_ratio=0.25, log_every=1)
    pretrain(model, world, config, out, accelerator=acc, show_progress=False)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
