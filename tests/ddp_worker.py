"""Run under torchrun by tests/test_train.py: a few DDP steps, then each rank dumps its state."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from userlab.config import ExperimentConfig  # noqa: E402
from userlab.train import Trainer  # noqa: E402


def main(cfg_path: str, out: str, steps: int) -> None:
    cfg = ExperimentConfig.from_json(cfg_path)
    trainer = Trainer(cfg, resume=False, progress=False, max_steps=steps)
    trainer.fit()
    model = trainer.model
    torch.save({"encoder": model.encoder.state_dict(),
                "image_ptr": model.image_queue.ptr.clone(), "text_ptr": model.text_queue.ptr.clone(),
                "image_ids": model.image_queue.ids.clone(), "image_keys": model.image_queue.keys.clone()},
               Path(out) / f"rank{trainer.rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
