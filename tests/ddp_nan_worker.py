"""Run under torchrun by tests/test_guard.py: at step 1 a BatchNorm statistic overflows on
rank 1 alone (loss and the all-reduced gradients stay finite), so only rank 1 can see that the
step is bad; every rank must still skip it together. Each rank dumps its weights and counters."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from userlab.config import ExperimentConfig  # noqa: E402
from userlab.train import Trainer  # noqa: E402


def main(cfg_path: str, out: str, steps: int) -> None:
    cfg = ExperimentConfig.from_json(cfg_path)
    trainer = Trainer(cfg, resume=False, progress=False, max_steps=steps)
    if trainer.rank == 1:
        bn = next(m for m in trainer.model.encoder.modules() if isinstance(m, torch.nn.BatchNorm1d))
        check = trainer.guard.is_finite

        def overflowed(loss, grad_norm, step=0):
            if step == 1:  # as a forward pass over overflowing activations would leave it
                bn.running_var.fill_(float("inf"))
            return check(loss, grad_norm, step)

        trainer.guard.is_finite = overflowed
    trainer.fit()
    torch.save({"encoder": trainer.model.encoder.state_dict(), "skipped": trainer.guard.skipped,
                "image_keys": trainer.model.image_queue.keys.clone()},
               Path(out) / f"rank{trainer.rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
