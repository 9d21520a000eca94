"""Run pretraining and kill the process (os._exit) at the K-th risky event: an optimizer step, a rename, a delete."""
import os, shutil, sys
import torch

K = int(sys.argv[1])
count = [0]

def killing(fn):
    def wrapper(*args, **kwargs):
        count[0] += 1
        if count[0] == K:
            os._exit(9)
        return fn(*args, **kwargs)
    return wrapper

os.replace = killing(os.replace)
os.unlink = killing(os.unlink)
shutil.rmtree = killing(shutil.rmtree)
torch.optim.AdamW.step = killing(torch.optim.AdamW.step)
from mae_vit.engine import rundir
real_save = rundir.save_checkpoint
def save_and_say(*a, **kw):
    path = real_save(*a, **kw)
    print(f"SAVED {path.name}", flush=True)
    return path
rundir.save_checkpoint = save_and_say
import mae_vit.engine.loop as loop
loop.save_checkpoint = save_and_say
from mae_vit.cli import run_tool
from mae_vit.config import PretrainConfig, parse_config
from mae_vit.engine.pretrain import pretrain
run_tool(lambda argv: pretrain(parse_config(PretrainConfig, argv)), sys.argv[2:])
print("EVENTS", count[0], flush=True)
