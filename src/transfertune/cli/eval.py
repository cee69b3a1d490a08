"""`transfertune eval`: every way of getting a post-trained target, side by side (evaluation/runner.py). The value
model's flags (--value-*) are made from the same ValueRecipe as `train`'s."""
from __future__ import annotations

import sys

from transfertune.cli.common import (
    COUNT,
    NUMBER,
    POSITIVE,
    SEED,
    add_device_args,
    add_recipe_flags,
    flag_type,
    recipe_from_args,
)

DESCRIPTION = ("Evaluate target alone, source (+ fine-tuning / + value), target + value, proxy-tuning, weight-diff "
               "transfer and target fine-tuning (full, LoRA) on held-out task data. Results and trained models are "
               "cached in --cache-dir.")


def add_arguments(p) -> None:
    from transfertune.evaluation.config import DEFAULT_METHODS, METHODS, EvalConfig
    from transfertune.evaluation.tasks import KINDS, SPLIT_BY, SPLITS

    d = EvalConfig()
    add_device_args(p, "evaluated models (training runs where the Trainer puts it)", "cpu")
    p.add_argument("--source", default=d.source, help=f"small base the value model is trained on (default {d.source})")
    p.add_argument("--targets", nargs="+", default=d.targets, help="target bases (default: %(default)s)")
    p.add_argument("--tasks", nargs="+", default=d.tasks, metavar="TASK",
                   help="built-in task names, JSONL files or directories of them (a directory holding train.jsonl "
                        "is used as already split; default: %(default)s)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS, metavar="METHOD",
                   help=f"methods to run (default: {', '.join(DEFAULT_METHODS)}; also {METHODS[-1]}: a label "
                        f"reward fitted against --source, for classification over one label set)")
    p.add_argument("--split", default=d.split, choices=[s for s in SPLITS if s != "train"],
                   help="held-out split of built-in tasks and already split directories (default heldout_example)")
    p.add_argument("--shifted-split", choices=[s for s in SPLITS if s.startswith("shifted")], default=None,
                   help="also measure every cell on this prompt-shifted split of the built-in tasks (shifted_dev to "
                        "choose designs, shifted_test to report), with the share of the score kept")
    p.add_argument("--split-by", choices=SPLIT_BY, default=d.split_by,
                   help="JSONL tasks: hold out examples (rows sharing an \"example\" id stay together) or templates "
                        "(rows need a \"template\" field); default example")
    p.add_argument("--heldout-fraction", type=flag_type(gt=0, lt=1), default=d.heldout_fraction,
                   help="JSONL tasks: fraction of examples / templates held out (default %(default)s)")
    p.add_argument("--split-seed", type=int, default=d.split_seed, help="JSONL tasks: seed of the split (default 0)")
    p.add_argument("--kind", choices=KINDS, default=None,
                   help="JSONL tasks: what to measure besides NLL (default: classification when rows carry "
                        "\"choices\"/\"label\" or --labels is given, else generation = NLL only; qa = exact match "
                        "of the greedy answer)")
    p.add_argument("--labels", nargs="+", default=None, metavar="LABEL",
                   help="JSONL tasks: the label set of classification rows without \"choices\" (default: their "
                        "labels / responses)")
    p.add_argument("--examples", type=COUNT, default=d.eval_examples,
                   help="held-out examples per task (default %(default)s)")
    add_recipe_flags(p, defaults=d.value, prefix="value-", only_eval=True)
    p.add_argument("--finetune-lr", type=POSITIVE, default=d.finetune_lr,
                   help="learning rate of full fine-tuning: the source, and the target unless --target-lr "
                        "(default %(default)s)")
    p.add_argument("--lora-lr", type=POSITIVE, default=d.lora_lr,
                   help="learning rate of LoRA fine-tuning (default %(default)s)")
    p.add_argument("--target-lr", type=POSITIVE, default=d.target_lr,
                   help="learning rate of the target's full fine-tuning (default: --finetune-lr)")
    p.add_argument("--finetune-steps", type=COUNT, default=d.finetune_steps,
                   help="fine-tuning steps of the source (proxy-tuning, weight diff; default %(default)s)")
    p.add_argument("--target-steps", type=COUNT, default=d.target_steps,
                   help="compute budget of the target fine-tuning oracles, in steps (default %(default)s)")
    p.add_argument("--batch-size", type=COUNT, default=d.batch_size, help="training batch size (default %(default)s)")
    p.add_argument("--max-length", type=flag_type(integer=True, ge=2), default=d.max_length,
                   help="tokens per example (default %(default)s)")
    p.add_argument("--beta", type=POSITIVE, nargs="+", default=d.betas, help="beta values to sweep for target + value")
    p.add_argument("--alpha", type=NUMBER, nargs="+", default=d.alphas, help="alpha values for proxy / weight diff")
    p.add_argument("--seed", type=SEED, default=0, help="random seed, 0 to 2**32-1 (default 0)")
    p.add_argument("--cache-dir", default=d.cache_dir, help="trained models and per-cell results (default %(default)s)")
    p.add_argument("--output", default=None, help="where results.json/.md/.png go (default: --cache-dir)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace results.json/.md/.png in --output (and results-SECTION.png beside --docs) that "
                        "transfertune did not write (its own are replaced without it)")
    p.add_argument("--docs", default=None, metavar="MD",
                   help="also write the report to this markdown file: a new one, or one transfertune wrote (it "
                        "holds <!-- section: NAME --> blocks or starts with '# Transfer results')")
    p.add_argument("--docs-section", default="main", metavar="NAME",
                   help="section of --docs to write (other sections are kept; default main)")
    p.add_argument("--docs-title", default=None, help="heading of that section")
    p.add_argument("--vocab-map", action="append", default=None, metavar="[TARGET=]exact|align",
                   help="token map for targets with another tokenizer (default exact; align = IVL alignment on "
                        "the task's training texts); TARGET=KIND sets one target's map (repeat for several)")


def run(args) -> None:
    from transfertune.evaluation.config import EvalConfig, parse_vocab_maps
    from transfertune.evaluation.report import format_markdown, truncation_notes
    from transfertune.evaluation.runner import run_eval
    from transfertune.io.placement import check_device

    vocab_map, vocab_maps = parse_vocab_maps(args.vocab_map)
    defaults = EvalConfig()
    cfg = EvalConfig(
        source=args.source, targets=args.targets, tasks=args.tasks, methods=args.methods, split=args.split,
        shifted=args.shifted_split,
        eval_examples=args.examples, value=recipe_from_args(args, prefix="value-", base=defaults.value),
        finetune_lr=args.finetune_lr, lora_lr=args.lora_lr, target_lr=args.target_lr,
        finetune_steps=args.finetune_steps, target_steps=args.target_steps,
        batch_size=args.batch_size, max_length=args.max_length, betas=args.beta, alphas=args.alpha, seed=args.seed,
        cache_dir=args.cache_dir, vocab_map=vocab_map, vocab_maps=vocab_maps, split_by=args.split_by,
        dtype=args.dtype, device=str(check_device(args.device or "cpu", "--device")),
        heldout_fraction=args.heldout_fraction, split_seed=args.split_seed, kind=args.kind, labels=args.labels,
    )
    result = run_eval(cfg, out=args.output, docs=args.docs, section=args.docs_section, title=args.docs_title,
                      overwrite=args.overwrite)
    print(format_markdown(result))
    for note in truncation_notes(result["rows"]):
        print(f"note: {note}", file=sys.stderr)
    print(f"\nwrote results.json, results.md and results.png to {args.output or args.cache_dir}")
