"""`transfertune train`: train a value model against a frozen base. Its recipe flags are made from
training.recipe.ValueRecipe (cli.common.add_recipe_flags)."""
from __future__ import annotations

from transfertune.cli.common import add_device_args, add_recipe_flags, recipe_from_args

DESCRIPTION = "Train a value model with the composed SFT loss (response tokens only)."


def add_arguments(p) -> None:
    p.add_argument("--base", required=True, help="frozen training base (short name, dir or HF id)")
    p.add_argument("--data", required=True,
                   help='JSONL of {"prompt","response"}, {"prompt","completion"} or {"messages"}')
    p.add_argument("--output", required=True,
                   help="value directory to write: new or empty (see --overwrite, --resume)")
    add_recipe_flags(p)
    p.add_argument("--no-zero-init-head", dest="head", action="store_const", const="copy",
                   help="= --head copy (older spelling, kept for one release)")
    add_device_args(p, what="frozen base (the value model trains in fp32)",
                    default="the accelerator when there is one, else cpu; cpu or cuda, GPUs chosen with "
                            "CUDA_VISIBLE_DEVICES")
    p.add_argument("--resume", action="store_true",
                   help="continue the unfinished run in --output from its last complete checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace what transfertune wrote in a non-empty --output (other files are refused)")
    p.add_argument("--eval-data", default=None, metavar="FILE",
                   help="held-out JSONL (formats as --data): its composed loss is logged as eval_loss every "
                        "--eval-steps steps and at the end")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model repos to run their own code")


def run(args) -> None:
    from transfertune.io.run_dirs import is_main_process
    from transfertune.training.value_trainer import train_value_recipe

    train_value_recipe(
        args.base, args.data, args.output, recipe_from_args(args), resume=args.resume, overwrite=args.overwrite,
        trust_remote_code=args.trust_remote_code, eval_data=args.eval_data, dtype=args.dtype,
        device=args.device, device_flag="--device",
    )
    if is_main_process():
        print(f"value model saved to {args.output}")
