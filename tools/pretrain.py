"""MAE pretraining. `python tools/pretrain.py` (demo on synthetic data) or
`accelerate launch tools/pretrain.py --config configs/pretrain/mae_vit_base_in1k.yaml
--data 'shards/{000000..000999}.tar'`. Run with --help for every option."""

from _run import run_tool  # tools/_run.py: puts this checkout on sys.path, so no install is needed

from mae_vit.config import PretrainConfig, parse_config


def main(argv):
    cfg = parse_config(PretrainConfig, argv, prog="pretrain.py")
    from mae_vit.tasks.pretrain import pretrain  # after parsing: --help and config errors stay fast

    pretrain(cfg)


if __name__ == "__main__":
    run_tool(main)
