"""`transfertune export`: write a composed model as a directory vLLM opens."""
from __future__ import annotations

from transfertune.cli.common import NUMBER, POSITIVE

PROCESSOR = "transfertune.serving.vllm.mix_processor:ValueMixProcessor"  # mix_processor.py imports vLLM

DESCRIPTION = ("Write base + value models as one directory that `vllm serve DIR` and "
               "vllm.LLM(DIR) open through transfertune's vLLM plugin (LoRA value models are "
               "merged). The base's weight files are hard-linked when possible, else copied. Requests compose "
               "every value model at --weight by default, or pick their own by name (docs/serving.md).")


def add_arguments(p) -> None:
    p.add_argument("--engine", choices=["vllm"], default="vllm", help="target engine (vllm)")
    p.add_argument("--base", required=True, help="base model: built-in short name, local dir or cached HF id")
    p.add_argument("--value", action="append", required=True, metavar="[NAME=]DIR",
                   help="value directory, repeat for several; NAME (default: the directory's name) is what a request "
                        "picks it by (vllm_xargs transfertune_value)")
    p.add_argument("--weight", action="append", type=NUMBER, default=None, metavar="W",
                   help="weight of each --value in the default composition, in order (default 1 each; 0 leaves a "
                        "value model out unless a request picks it)")
    p.add_argument("--beta", type=POSITIVE, default=None, help="default: the beta stored in the first value directory")
    p.add_argument("--output", required=True, help="directory to write (new, empty, or an export with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --output")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model repos to run their own code")


def run(args) -> None:
    from transfertune.cli.serve import named_values
    from transfertune.serving.vllm.export import describe, export_vllm

    if args.weight is not None and len(args.weight) != len(args.value):
        raise ValueError(f"{len(args.value)} --value but {len(args.weight)} --weight")
    names, values = named_values(args.value)
    out = export_vllm(args.base, values, args.output, names=names, weights=args.weight, beta=args.beta,
                      overwrite=args.overwrite, trust_remote_code=args.trust_remote_code)
    print(f"wrote {out}: {describe(out)}\nserve it with `transfertune serve --engine vllm --base {out}` "
          f"(vLLM's server) or open it with vllm.LLM('{out}'); requests pick value models by name through "
          f"the logits processor {PROCESSOR} (docs/serving.md)")
