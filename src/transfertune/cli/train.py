"""`transfertune train`: train a value model against a frozen base. Its recipe flags are made from
training.recipe.ValueRecipe (cli.common.add_recipe_flags)."""
from __future__ import annotations

from transfertune.cli.common import add_device_args, add_recipe_flags, flag_type, recipe_from_args
from transfertune.core.choices import POOLS

DESCRIPTION = ("Train a value model with the composed SFT loss (response tokens only); with --labels, a label "
               "reward over a label set (portable reward tuning), used by `transfertune classify`.")


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
    group = p.add_argument_group("label rewards (--labels)")
    group.add_argument("--labels", nargs="*", default=None, metavar="LABEL",
                       help='train a label reward over this label set instead of a value model; --data rows are '
                            '{"prompt" or "text", "label", optional "choices"} (labels/label_data.py); with no '
                            'names the label set is the rows\' labels')
    group.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                       help="compose with the base's raw label scores instead of taking its own prior over the "
                            "labels out first")
    group.add_argument("--feature-layer", type=layer_type, default="middle",
                       help="hidden-state layer the reward reads: an index (-1 the last) or middle (the default)")
    group.add_argument("--pool", choices=POOLS, default="mean",
                       help="features pooled over the prompt's tokens (mean, default) or its last token")


def layer_type(text: str) -> int | str:
    if text == "middle":
        return text
    return flag_type(integer=True)(text)


def run(args) -> None:
    if args.labels is not None:
        return run_labels(args)
    from transfertune.io.run_dirs import is_main_process
    from transfertune.training.value_trainer import train_value_recipe

    train_value_recipe(
        args.base, args.data, args.output, recipe_from_args(args), resume=args.resume, overwrite=args.overwrite,
        trust_remote_code=args.trust_remote_code, eval_data=args.eval_data, dtype=args.dtype,
        device=args.device, device_flag="--device",
    )
    if is_main_process():
        print(f"value model saved to {args.output}")


def run_labels(args) -> None:
    from transfertune.training.recipe import ValueRecipe

    changed = [f"--{f.replace('_', '-')}" for f, v in vars(recipe_from_args(args)).items()
               if f != "seed" and v != getattr(ValueRecipe(), f)]
    for flag, value in (("--resume", args.resume), ("--eval-data", args.eval_data)):
        if value:
            changed.append(flag)
    if changed:
        raise ValueError(f"{', '.join(changed)} train value models; a label reward (--labels) is fitted on the "
                         f"base's features with its strength chosen on held-out rows, and takes none of them")
    from transfertune.labels.train_reward import train_label_reward

    train_label_reward(args.base, args.data, args.output, args.labels, calibrate=args.calibrate,
                       feature_layer=args.feature_layer, pool=args.pool, seed=args.seed, overwrite=args.overwrite,
                       trust_remote_code=args.trust_remote_code)
    print(f"label reward saved to {args.output}")
