"""`transfertune classify`: a base over a label set, zero-shot or composed with label rewards (labels/classify.py)."""
from __future__ import annotations

import sys
from pathlib import Path

DESCRIPTION = ("Classify JSONL rows over a label set with any base that can score the label strings, alone "
               "(zero-shot) or composed with label rewards from `transfertune train --labels`; prints accuracy "
               "when the rows carry labels.")


def add_arguments(p) -> None:
    p.add_argument("--base", required=True, help="the classifying base (short name, dir, .gguf or HF id)")
    p.add_argument("--value", action="append", default=[], metavar="DIR",
                   help="a label reward directory (repeatable; they must share the label set); none: zero-shot")
    p.add_argument("--data", required=True,
                   help='JSONL of {"prompt" or "text", optional "label", optional "choices"} (labels/label_data.py)')
    p.add_argument("--labels", nargs="+", default=None, metavar="LABEL",
                   help="the label set (default: the reward's, else the rows' labels)")
    p.add_argument("--output", default=None, metavar="FILE",
                   help="write one JSONL row per input: prediction, probabilities, label (a new file, or see "
                        "--overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    calib = p.add_mutually_exclusive_group()
    calib.add_argument("--calibrate", dest="calibrate", action="store_true", default=None,
                       help="take the base's prior over the labels out (estimated on the rows; the default "
                            "without --value, and with rewards trained so)")
    calib.add_argument("--no-calibrate", dest="calibrate", action="store_false", help="use the raw label scores")
    p.add_argument("--backbone", default=None, metavar="MODEL",
                   help="where the rewards' backbone LM is now, if it moved since training")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model repos to run their own code")


def run(args) -> None:
    import json

    from transfertune.labels.classify import classify, write_predictions
    from transfertune.labels.feature_reward import LabelReward

    if args.output:
        out = Path(args.output)
        if out.is_dir():
            raise ValueError(f"--output {out} is a directory: give a file to write")
        if out.exists() and Path(args.data).exists() and out.samefile(args.data):
            raise ValueError(f"--output {out} is the --data file: classifying would overwrite its input")
        if out.exists() and not args.overwrite:
            raise ValueError(f"--output {out} exists: pass --overwrite to replace it, or choose a new file")
    rewards = [LabelReward.load(d) for d in args.value]
    result = classify(args.base, args.data, rewards, labels=args.labels, calibrate=args.calibrate,
                      backbone=args.backbone, trust_remote_code=args.trust_remote_code)
    if args.output:
        write_predictions(result, args.output)
        print(f"predictions written to {args.output}", file=sys.stderr)
    summary = {"rows": len(result.predictions), "labels": result.rows.labels}
    accuracy = result.accuracy()
    if accuracy is not None:
        summary["accuracy"] = round(accuracy, 4)
    print(json.dumps(summary))
