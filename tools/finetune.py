"""Fine-tuning of a (pretrained) ViT classifier. `python tools/finetune.py --checkpoint runs/pretrain` (demo on
synthetic data), or `accelerate launch tools/finetune.py --config configs/finetune/vit_base_in1k.yaml
--checkpoint mae_pretrain_vit_base.pth --data 'train/{000000..000999}.tar' data.val='val/{000000..000049}.tar'`.
`--resolution N` fine-tunes at another resolution than the checkpoint's. Run with --help for every option."""

from _run import run_tool  # tools/_run.py: puts this checkout on sys.path, so no install is needed

from mae_vit.config import FinetuneConfig, parse_config


def main(argv):
    cfg = parse_config(FinetuneConfig, argv, prog="finetune.py")
    from mae_vit.tasks.finetune import finetune  # after parsing: --help and config errors stay fast
    from mae_vit.train.run_config import user_set_keys

    finetune(cfg, user_keys=user_set_keys(cfg, argv))  # the keys given win over the checkpoint's run


if __name__ == "__main__":
    run_tool(main)
