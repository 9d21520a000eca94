"""tools/pretrain.py for the multi-process tests, with what they need to look inside each process.

Started once per process (directly with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT in the environment,
or by torchrun). Environment switches, all optional:
    MP_DELAY_<rank>=S     this rank sleeps S seconds before it starts (a slow node, slow imports)
    MP_RECORD=DIR         each rank writes DIR/init_<rank>.pt (its freshly built weights), DIR/masks_<rank>.pt
                          (the MAE's first mask draws) and DIR/final_<rank>.pt (its weights at the end), and prints
                          "RANK r ENDED AT STEP s" when the run returns
    MP_SLEEP_IN_SAVE_<rank>=S   this rank sleeps S seconds before its first checkpoint (a slow collective)
"""

import os
import sys
import time
from pathlib import Path

import torch

rank = int(os.environ.get("RANK", "0"))
time.sleep(float(os.environ.get(f"MP_DELAY_{rank}", "0")))
record = os.environ.get("MP_RECORD")

from mae_vit.config import PretrainConfig, parse_config  # noqa: E402
from mae_vit.config.cli import run_tool  # noqa: E402
from mae_vit.models.mae import MaskedAutoencoderViT  # noqa: E402
from mae_vit.tasks.pretrain import Pretrain, pretrain  # noqa: E402

if record:
    record = Path(record)
    masks = []
    real_masking = MaskedAutoencoderViT.random_masking

    def random_masking(x, mask_ratio, noise=None):
        kept, mask, ids_restore = real_masking(x, mask_ratio, noise)
        if len(masks) < 3:
            masks.append(mask.detach().cpu().clone())
            if len(masks) == 3:
                torch.save(masks, record / f"masks_{rank}.pt")
        return kept, mask, ids_restore

    MaskedAutoencoderViT.random_masking = staticmethod(random_masking)
    real_build, real_finish = Pretrain.build_model, Pretrain.finish

    def build_model(self, accelerator, resuming):
        model = real_build(self, accelerator, resuming)
        torch.save({k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
                   record / f"init_{rank}.pt")
        return model

    def finish(self, state):
        torch.save({k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
                   record / f"final_{rank}.pt")
        return real_finish(self, state)

    Pretrain.build_model, Pretrain.finish = build_model, finish

sleep_in_save = float(os.environ.get(f"MP_SLEEP_IN_SAVE_{rank}", "0"))
if sleep_in_save:
    import mae_vit.train.loop as loop

    real_save = loop.save_checkpoint

    def save_checkpoint(*args, **kwargs):
        time.sleep(sleep_in_save)
        return real_save(*args, **kwargs)

    loop.save_checkpoint = save_checkpoint

summary = run_tool(lambda argv: pretrain(parse_config(PretrainConfig, argv)), sys.argv[1:])
# What the tests read from this process must be there: fail here, naming it, rather than later in the test.
assert summary["step"] > 0, summary
if record:
    missing = [n for n in (f"init_{rank}.pt", f"masks_{rank}.pt", f"final_{rank}.pt") if not (record / n).is_file()]
    assert not missing, f"rank {rank} did not record {missing}"
print(f"RANK {rank} ENDED AT STEP {summary['step']}", flush=True)
