"""Linear probing of a pretrained encoder. `python tools/linprobe.py --checkpoint runs/pretrain` (demo on
synthetic data; add feature_cache=true to extract the features once and train on them), or `accelerate launch
tools/linprobe.py --checkpoint mae_pretrain_vit_base.pth --data 'train/{000000..000999}.tar'
data.val='val/{000000..000049}.tar' model.name=vit_base_patch16 model.img_size=224 optim.effective_batch=16384`.
Run with --help for every option."""

from _run import run_tool  # tools/_run.py: puts this checkout on sys.path, so no install is needed

from mae_vit.config import LinprobeConfig, parse_config


def main(argv):
    cfg = parse_config(LinprobeConfig, argv, prog="linprobe.py")
    from mae_vit.tasks.linprobe import linprobe  # after parsing: --help and config errors stay fast
    from mae_vit.train.run_config import user_set_keys

    linprobe(cfg, user_keys=user_set_keys(cfg, argv))  # the keys given win over the checkpoint's run


if __name__ == "__main__":
    run_tool(main)
