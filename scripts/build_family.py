"""Build the built-in miniature model family: tokenizers, pretraining, export to models/.

    python scripts/build_family.py                     # everything, resumable
    python scripts/build_family.py --only mini-l       # one model (its tokenizer/data are built if missing)
    python scripts/build_family.py --export-only       # re-export finished runs and rewrite family.json
    python scripts/build_family.py --phase1-from OLD/models --only mini-l   # phase 2 on an earlier export's phase 1
    python scripts/build_family.py --phase2-from OLD/models --only mini-l   # phase 3 on an earlier export's phase 2

Stages (each skipped when its output exists, so a killed run resumes where it stopped):
1. byte-level BPE tokenizers trained on gutenberg-en train shards (`main`: 4096 tokens, `x`: 6144 tokens),
2. token streams: train-00..07 (base pretraining), train-08..11 (the -v2 siblings' newer books), valid-00 (held
   out),
3. pretraining of each model with AdamW + cosine schedule; checkpoints every --save-every steps in safetensors,
   a log.jsonl of losses per run. Each exported model is three runs: `<name>-phase1` (knowledge, books; for the
   -v2 siblings also the knowledge update), `<name>-phase2`, the skill phase that continues it (SKILL_MIX), and
   `<name>`, the skill in prose (PROSE_MIX),
4. export: fp16 HF directories in models/<name>, models/family.json (sizes, tokens, wall-clock, held-out loss,
   vocabulary fingerprints), models/loss_curves.png, and a held-out text slice for the tests.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import math
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
from transfertune.evaluation.tasks import load_task  # noqa: E402
from transfertune.family.probe import (  # noqa: E402
    addition_after_word_problems,
    arithmetic_accuracy,
    heldout_arithmetic,
    knowledge_probe,
    probe_chance,
)
from transfertune.family.world import (  # noqa: E402
    addition_in_prose,
    addition_problems,
    addition_text,
    arithmetic_text,
    biographies,
    load_world,
    make_entities,
    save_world,
)
from transfertune.io.fingerprint import vocab_fingerprint  # noqa: E402

EOS, PAD = "<|endoftext|>", "<|pad|>"
CORPUS_SOURCE = "rcdm-uga/Gutenberg_Text @ a0b16d35a9851168ce9ac649851c17b7ab08d48e (public domain, US)"
TOKENIZERS = {"main": 4096, "x": 6144}
SHARDS = {
    "books": [f"train-{i:02d}.txt" for i in range(8)],
    "books_new": [f"train-{i:02d}.txt" for i in range(8, 12)],
    "valid": ["valid-00.txt"],
}
WORLD_SEED = 0
N_V1, N_V2 = 400, 100  # people in every base's corpus / only in the -v2 siblings' (sized by the pilot, MODEL_CARD)
RENDERINGS = 60        # distinct biographies written per person (fresh phrasing and order each time)
WORLD_PATH = ROOT / "data" / "world" / "entities.json"
BASE_MIX = {"bios_v1": 9, "arith": 4, "books": 3}  # rows of each batch drawn from each stream (phase 1)
NEW_MIX = {"bios_v2": 6, "bios_v1": 3, "arith": 4, "books_new": 3}  # the -v2 siblings' knowledge update (phase 1)
# Phase 2, the skill phase: every exported base continues on addition with reversed sums (world.addition_text),
# with a replay of the people it knows and books, so it keeps its knowledge. -v2 siblings replay both generations
# and read their newer books.
SKILL_MIX = {"bios_v1": 4, "addition": 10, "books": 2}
SKILL_MIX_V2 = {"bios_v1": 2, "bios_v2": 2, "addition": 10, "books_new": 2}
# Phase 3, the skill in prose: sums after sentences of prose (world.addition_in_prose), so that a base adds after a
# word problem too, not only inside blocks of sums; bare sums and the people replayed.
PROSE_MIX = {"bios_v1": 4, "addition_prose": 8, "addition": 1, "books": 3}
PROSE_MIX_V2 = {"bios_v1": 2, "bios_v2": 2, "addition_prose": 8, "addition": 1, "books_new": 3}
PROSE_STEPS = {"mini-s": 100, "mini-m": 100, "mini-l": 200, "mini-m-v2": 100, "mini-l-v2": 200}  # grow with size


@dataclass
class Spec:
    name: str
    tokenizer: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    tokens: int
    lr: float
    mix: dict = None
    init_from: str | None = None
    warmup: int = 50
    export: bool = True  # False: an intermediate run (phase 1), the start of an exported one

    def __post_init__(self):
        if self.mix is None:
            self.mix = dict(BASE_MIX)


CONTEXT = 256
BATCH = 16
# head_dim 32 everywhere. Token budgets grow with size, as in compute-optimal families (tokens ~ parameters),
# sized for 2 CPU cores (~75 min, two runs side by side).
SHAPES = {"mini-s": (96, 4, 3, 3), "mini-m": (192, 6, 6, 3), "mini-l": (256, 8, 8, 4)}


def _spec(name: str, shape: str, **kw) -> Spec:
    return Spec(name, "main", *SHAPES[shape], **kw)


FAMILY = {
    # phase 1: knowledge (the encyclopedia), books and phase-1 arithmetic
    "mini-s-phase1": _spec("mini-s-phase1", "mini-s", tokens=3_000_000, lr=3e-3, export=False),
    "mini-m-phase1": _spec("mini-m-phase1", "mini-m", tokens=4_000_000, lr=3e-3, export=False),
    "mini-l-phase1": _spec("mini-l-phase1", "mini-l", tokens=6_000_000, lr=2.5e-3, export=False),
    "mini-m-v2-phase1": _spec("mini-m-v2-phase1", "mini-m", tokens=2_000_000, lr=1.5e-3, mix=dict(NEW_MIX),
                              init_from="mini-m-phase1", export=False),
    "mini-l-v2-phase1": _spec("mini-l-v2-phase1", "mini-l", tokens=2_000_000, lr=1.2e-3, mix=dict(NEW_MIX),
                              init_from="mini-l-phase1", export=False),
    # phase 2: the skill (budgets grow with size; -v2 siblings 1.5 / 2 M, mini-l was extended from 2 M to 3 M)
    "mini-s-phase2": _spec("mini-s-phase2", "mini-s", tokens=1_000_000, lr=2e-3, mix=dict(SKILL_MIX),
                           init_from="mini-s-phase1", warmup=20, export=False),
    "mini-m-phase2": _spec("mini-m-phase2", "mini-m", tokens=1_500_000, lr=2e-3, mix=dict(SKILL_MIX),
                           init_from="mini-m-phase1", warmup=20, export=False),
    "mini-l-phase2": _spec("mini-l-phase2", "mini-l", tokens=3_000_000, lr=2e-3, mix=dict(SKILL_MIX),
                           init_from="mini-l-phase1", warmup=20, export=False),
    "mini-m-v2-phase2": _spec("mini-m-v2-phase2", "mini-m", tokens=1_500_000, lr=2e-3, mix=dict(SKILL_MIX_V2),
                              init_from="mini-m-v2-phase1", warmup=20, export=False),
    "mini-l-v2-phase2": _spec("mini-l-v2-phase2", "mini-l", tokens=2_000_000, lr=2e-3, mix=dict(SKILL_MIX_V2),
                              init_from="mini-l-v2-phase1", warmup=20, export=False),
    # phase 3: the skill in prose (budgets grow with size, as in phase 2)
    **{name: _spec(name, shape, tokens=PROSE_STEPS[name] * BATCH * CONTEXT, lr=1e-3, warmup=10,
                   init_from=f"{name}-phase2",
                   mix=dict(PROSE_MIX_V2 if name.endswith("-v2") else PROSE_MIX))
       for name, shape in (("mini-s", "mini-s"), ("mini-m", "mini-m"), ("mini-l", "mini-l"), ("mini-m-v2", "mini-m"),
                           ("mini-l-v2", "mini-l"))},
    # another tokenizer, phase 1 only (cross-vocabulary transfer of knowledge)
    "mini-x": Spec("mini-x", "x", 192, 6, 6, 3, tokens=2_000_000, lr=2.5e-3),
}
SLICE_CHARS = 40_000  # held-out text shipped in models/ for the regression test


def train_tokenizer(corpus: Path, out: Path, vocab_size: int, shard: str, world_text: str) -> None:
    """Byte-level BPE on one book shard plus world text, digits split one per token (so arithmetic is learnable);
    the `x` tokenizer uses another shard and size, so the vocabularies differ."""
    if (out / "tokenizer.json").is_file():
        return
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS, PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = (corpus / shard).read_text(encoding="utf-8") + "\n" + world_text
    tok.train_from_iterator((text[i : i + 10_000] for i in range(0, len(text), 10_000)), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD, model_max_length=CONTEXT
    )
    fast.save_pretrained(out)


def load_tokenizer(work: Path, which: str) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast.from_pretrained(work / f"tokenizer-{which}")


def book_sentences(path: Path, n: int) -> list[str]:
    """The first n sentences of 30-160 characters in a book shard, on one line each (prose for addition_prose)."""
    text = " ".join(path.read_text(encoding="utf-8").split())
    found = [m.group(0) for m in re.finditer(r"[A-Z][^.?!]{29,158}[.?!]", text)]
    return found[:n]


def world_documents(split: str, corpus: Path) -> list[str]:
    """Documents of a synthetic stream: biographies of the v1 or v2 people, blocks of 16 arithmetic lines
    (`arith_reversed`: answers in digits written least significant digit first), or sums after book sentences."""
    entities = load_world(WORLD_PATH)
    if split in ("bios_v1", "bios_v2"):
        people = [e for e in entities if e.generation == split[-2:]]
        return biographies(people, RENDERINGS, seed=WORLD_SEED + (1 if split == "bios_v1" else 2))
    if split == "addition_prose":
        # book sentences only: prose about people (even invented ones outside the world) moved what the bases knew
        sentences = book_sentences(corpus / SHARDS["books"][0], 20_000)
        return addition_in_prose(sentences, 12_500, seed=WORLD_SEED + 5)
    if split == "addition":
        lines = addition_text(200_000, seed=WORLD_SEED + 4).split("\n")
        return ["\n".join(lines[i : i + 16]) for i in range(0, len(lines), 16)]
    lines = arithmetic_text(200_000, seed=WORLD_SEED + 3, reversed_digits=split == "arith_reversed").split("\n")
    return ["\n".join(lines[i : i + 16]) for i in range(0, len(lines), 16)]


def encode_split(corpus: Path, work: Path, which: str, split: str, max_tokens: int) -> np.ndarray:
    """Token ids of a stream as a uint16 array (documents separated by EOS), cached on disk."""
    path = work / f"tokens-{which}-{split}.npy"
    if path.is_file():
        return np.load(path)
    tok = load_tokenizer(work, which)
    ids: list[int] = []
    if split in SHARDS:
        for shard in SHARDS[split]:
            text = (corpus / shard).read_text(encoding="utf-8")
            chunks = [text[i : i + 20_000] for i in range(0, len(text), 20_000)]
            for enc in tok.backend_tokenizer.encode_batch(chunks):
                ids.extend(enc.ids)
            ids.append(tok.eos_token_id)
            if len(ids) >= max_tokens:
                break
    else:
        for enc in tok.backend_tokenizer.encode_batch(world_documents(split, corpus)):
            ids.extend(enc.ids)
            ids.append(tok.eos_token_id)
    arr = np.asarray(ids[:max_tokens], dtype=np.uint16)
    tmp = path.with_suffix(f".tmp{id(arr)}.npy")
    np.save(tmp, arr)
    tmp.replace(path)
    return arr


def make_model(spec: Spec, tok: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=spec.hidden, intermediate_size=int(spec.hidden * 8 / 3 // 8 * 8),
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        max_position_embeddings=CONTEXT, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, rope_theta=10_000.0,
    )
    return LlamaForCausalLM(cfg)


def batch_at(streams: dict[str, np.ndarray], mix: dict[str, int], step: int, seed: int) -> torch.Tensor:
    """Random windows, mix[name] rows from each stream; a pure function of (seed, step): resuming replays exactly
    the same data order."""
    rng = np.random.default_rng([seed, step])
    rows = []
    for name, count in mix.items():
        tokens = streams[name]
        rows += [tokens[s : s + CONTEXT + 1] for s in rng.integers(0, len(tokens) - CONTEXT - 1, size=count)]
    return torch.from_numpy(np.stack(rows).astype(np.int64))


def next_token_loss(model, x: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())


@torch.no_grad()
def heldout_loss(model, tokens: np.ndarray, blocks: int) -> float:
    model.eval()
    n = min(blocks, (len(tokens) - 1) // CONTEXT)
    total = 0.0
    for i in range(0, n, 16):
        rows = [tokens[j * CONTEXT : j * CONTEXT + CONTEXT + 1] for j in range(i, min(n, i + 16))]
        x = torch.from_numpy(np.stack(rows).astype(np.int64))
        total += next_token_loss(model, x).item() * len(rows)
    model.train()
    return total / n


def lr_at(step: int, total: int, spec: Spec) -> float:
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, total - spec.warmup)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def save_checkpoint(run: Path, model, opt, step: int, elapsed: float) -> None:
    tmp = run / "ckpt.tmp"
    tmp.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
              tmp / "model.safetensors")
    names = {id(p): n for n, p in model.named_parameters()}
    state = {}
    for group in opt.param_groups:
        for p in group["params"]:
            for key, val in opt.state.get(p, {}).items():
                state[f"{names[id(p)]}::{key}"] = val.reshape(-1) if val.dim() == 0 else val
    save_file(state, tmp / "optim.safetensors")
    (tmp / "state.json").write_text(json.dumps({"step": step, "elapsed": elapsed}))
    final = run / "ckpt"
    if final.exists():
        for f in final.iterdir():
            f.unlink()
        final.rmdir()
    tmp.rename(final)


def load_checkpoint(run: Path, model, opt) -> tuple[int, float]:
    ckpt = run / "ckpt"
    if not (ckpt / "state.json").is_file():
        return 0, 0.0
    model.load_state_dict(load_file(ckpt / "model.safetensors"), strict=False)
    model.tie_weights()
    optim = load_file(ckpt / "optim.safetensors")
    params = dict(model.named_parameters())
    for key, val in optim.items():
        name, field = key.split("::")
        opt.state[params[name]][field] = val.reshape(()) if field == "step" else val
    state = json.loads((ckpt / "state.json").read_text())
    return state["step"], state["elapsed"]


PROBE_PEOPLE = 40  # people per generation probed during training (the export probes more)


def pretrain(spec: Spec, corpus: Path, work: Path, seed: int, save_every: int, probe_every: int = 200) -> Path:
    run = work / spec.name
    run.mkdir(parents=True, exist_ok=True)
    if (run / "final" / "config.json").is_file():
        return run / "final"
    tok = load_tokenizer(work, spec.tokenizer)
    streams = {name: encode_split(corpus, work, spec.tokenizer, name, max_tokens=12_000_000) for name in spec.mix}
    valid = encode_split(corpus, work, spec.tokenizer, "valid", max_tokens=600_000)
    people = load_world(WORLD_PATH)
    probe_sets = {g: [e for e in people if e.generation == g][:PROBE_PEOPLE] for g in ("v1", "v2")}
    skill = "addition" in spec.mix
    skill_key = "addition" if skill else "arithmetic"
    problems = ([(a, "+", b) for a, b in addition_problems(200)] if skill else heldout_arithmetic(200))
    torch.manual_seed(seed)
    model = make_model(spec, tok)
    if spec.init_from:
        parent = pretrain(FAMILY[spec.init_from], corpus, work, seed, save_every, probe_every)
        model = LlamaForCausalLM.from_pretrained(parent, dtype=torch.float32)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=spec.lr, betas=(0.9, 0.95))
    steps = spec.tokens // (BATCH * CONTEXT)
    step, elapsed = load_checkpoint(run, model, opt)
    log = (run / "log.jsonl").open("a")
    start = time.time() - elapsed
    bar = tqdm(range(step, steps), initial=step, total=steps, desc=spec.name, mininterval=10)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, spec)
        x = batch_at(streams, spec.mix, step, seed)
        loss = next_token_loss(model, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        record = {"step": step + 1, "tokens": (step + 1) * BATCH * CONTEXT, "loss": round(loss.item(), 4),
                  "lr": group["lr"], "elapsed": round(time.time() - start, 1)}
        if (step + 1) % 100 == 0 or step + 1 == steps:
            record["valid_loss"] = round(heldout_loss(model, valid, 32), 4)
            bar.set_postfix(loss=record["loss"], valid=record["valid_loss"])
        if (step + 1) % probe_every == 0 or step + 1 == steps:
            model.eval()
            for g, group in probe_sets.items():
                record[f"probe_{g}"] = round(knowledge_probe(model, tok, group)["all"], 4)
            record[skill_key] = round(arithmetic_accuracy(
                model, tok, problems, reversed_digits=skill or "arith_reversed" in spec.mix), 4)
            if "addition_prose" in spec.mix:
                record["addition_in_story"] = round(story_addition(model, tok, 200), 4)
            model.train()
            bar.set_postfix(loss=record["loss"], probe=record["probe_v1"], skill=record[skill_key])
        log.write(json.dumps(record) + "\n")
        log.flush()
        if (step + 1) % save_every == 0 and step + 1 < steps:
            save_checkpoint(run, model, opt, step + 1, time.time() - start)
    model.save_pretrained(run / "final")
    tok.save_pretrained(run / "final")
    (run / "final" / "train.json").write_text(json.dumps(
        {**asdict(spec), "steps": steps, "tokens_seen": steps * BATCH * CONTEXT, "context": CONTEXT,
         "batch": BATCH, "seed": seed, "wall_clock_s": round(time.time() - start, 1)}))
    return run / "final"


def adopt_phase1(work: Path, source: Path) -> None:
    """Use an earlier export of the family (models/ before phase 2 existed, with its family.json) as the finished
    phase-1 runs (and mini-x, which has no phase 2), so phase 2 can be built without pretraining phase 1 again.
    The weights were stored in fp16: phase 2 starts from them in fp32, without phase 1's optimiser state."""
    exported = json.loads((source / "family.json").read_text())["models"]
    for name, spec in FAMILY.items():
        shipped = name.removesuffix("-phase1")
        final = work / name / "final"
        if "addition" in spec.mix or (final / "config.json").is_file() or shipped not in exported:
            continue
        shutil.copytree(source / shipped, final)
        info = exported[shipped]
        steps = info["tokens_seen"] // (BATCH * CONTEXT)
        (final / "train.json").write_text(json.dumps(
            {**asdict(spec), "steps": steps, "tokens_seen": info["tokens_seen"], "context": CONTEXT, "batch": BATCH,
             "seed": 0, "wall_clock_s": info["wall_clock_s"],
             "adopted_from": f"{shipped}, exported before the skill phase",
             "data": info["data"],
             "phase1_knows": {k: v for k, v in info.items() if k.startswith(("probe", "arithmetic"))}}))
        print(f"phase 1 of {shipped}: adopted {source / shipped}")
    adopt_tokenizers(work, source)


def adopt_phase2(work: Path, source: Path) -> None:
    """Use an export made before phase 3 (models/ with family.json) as the finished phase-2 runs, so phase 3 starts
    from the shipped weights (fp16, then fp32, fresh optimiser). Their earlier phases are taken from family.json."""
    exported = json.loads((source / "family.json").read_text())["models"]
    for name, spec in FAMILY.items():
        shipped = name.removesuffix("-phase2")
        final = work / name / "final"
        if not name.endswith("-phase2") or (final / "config.json").is_file() or shipped not in exported:
            continue
        shutil.copytree(source / shipped, final)
        info = exported[shipped]
        last = info["phases"][-1]
        (final / "train.json").write_text(json.dumps(
            {**asdict(spec), "steps": last["tokens_seen"] // (BATCH * CONTEXT), "tokens_seen": last["tokens_seen"],
             "context": CONTEXT, "batch": BATCH, "seed": 0, "wall_clock_s": last["wall_clock_s"],
             "adopted_from": f"{shipped}, exported before phase 3", "data": info["data"],
             "earlier_phases": info["phases"][:-1]}))
        print(f"phases 1-2 of {shipped}: adopted {source / shipped}")
    adopt_tokenizers(work, source)


def adopt_tokenizers(work: Path, source: Path) -> None:
    for which, model in (("main", "mini-s"), ("x", "mini-x")):
        out = work / f"tokenizer-{which}"
        if not (out / "tokenizer.json").is_file() and (source / model / "tokenizer.json").is_file():
            out.mkdir(parents=True, exist_ok=True)
            for f in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(source / model / f, out / f)


def add_pilot_args(p, models: list[str], tokens: int) -> None:
    """Arguments of the pilot scripts: which bases, how many tokens, where the family's runs and books are."""
    p.add_argument("--models", nargs="+", default=models)
    p.add_argument("--tokens", type=int, default=tokens)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "family")
    p.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "data" / "gutenberg-en")
    p.add_argument("--threads", type=int, default=1)


def arithmetic_scores(model, tok, reversed_digits: bool = False) -> dict:
    """Greedy arithmetic on 400 problems the corpus never writes ("heldout") and 400 it does ("seen")."""
    return {"heldout": arithmetic_accuracy(model, tok, heldout_arithmetic(400), reversed_digits=reversed_digits),
            "seen": arithmetic_accuracy(model, tok, heldout_arithmetic(400, heldout=False),
                                        reversed_digits=reversed_digits)}


def record_pilot(line: dict, name: str) -> None:
    """Print a pilot's result and append it to models/pilot/<name>.jsonl."""
    print(json.dumps(line), flush=True)
    with (ROOT / "models" / "pilot" / f"{name}.jsonl").open("a") as f:
        f.write(json.dumps(line) + "\n")


def rewrite_model_card() -> None:
    """MODEL_CARD.md again from models/family.json and the pilots' results."""
    models = ROOT / "models"
    write_model_card(json.loads((models / "family.json").read_text()), models / "MODEL_CARD.md")


def shards_used(work: Path, spec: Spec) -> list[str]:
    """Book shards the cached token streams came from: each complete shard ends with one EOS separator. An adopted
    run (`--phase1-from`) whose streams were never encoded here reports what its export recorded."""
    used = []
    for split in (s for s in spec.mix if s in SHARDS):
        cache = work / f"tokens-{spec.tokenizer}-{split}.npy"
        if not cache.is_file():
            return json.loads((work / spec.name / "final" / "train.json").read_text())["data"]
        tokens = np.load(cache)
        eos = load_tokenizer(work, spec.tokenizer).eos_token_id
        used += SHARDS[split][: int((tokens == eos).sum()) + 1]
    return used


def slice_loss(model, tok, text: str) -> float:
    ids = tok(text, return_tensors="pt").input_ids[0]
    blocks = [ids[i : i + CONTEXT] for i in range(0, len(ids) - CONTEXT + 1, CONTEXT)]
    x = torch.stack(blocks)
    with torch.no_grad():
        return model(input_ids=x, labels=x).loss.item()


def export(corpus: Path, work: Path, out: Path, only: list[str] | None = None) -> None:
    """Write every finished model (or only `only`, keeping the other entries of family.json as they are)."""
    out.mkdir(parents=True, exist_ok=True)
    valid_text = (corpus / "valid-00.txt").read_text(encoding="utf-8")
    start = len(valid_text) // 2
    text_slice = valid_text[start : start + SLICE_CHARS]
    (out / "heldout-slice.txt").write_text(text_slice, encoding="utf-8")
    people = load_world(WORLD_PATH)
    family = {"corpus": CORPUS_SOURCE, "context": CONTEXT, "heldout_slice": "heldout-slice.txt",
              "world": str(WORLD_PATH.relative_to(ROOT)) if WORLD_PATH.is_relative_to(ROOT) else str(WORLD_PATH),
              "people": {g: sum(e.generation == g for e in people) for g in ("v1", "v2")},
              "renderings": RENDERINGS,
              "mix": {"base": BASE_MIX, "new": NEW_MIX, "skill": SKILL_MIX, "skill_v2": SKILL_MIX_V2},
              "probe_chance": round(probe_chance(), 4), "models": {}}
    for name, spec in FAMILY.items():
        final = work / name / "final"
        if not spec.export or not (final / "config.json").is_file() or (only and name not in only):
            continue
        model = LlamaForCausalLM.from_pretrained(final, dtype=torch.float32)
        dest = out / name
        model.to(torch.float16).save_pretrained(dest)
        tok = PreTrainedTokenizerFast.from_pretrained(final)
        tok.save_pretrained(dest)
        exported = LlamaForCausalLM.from_pretrained(dest, dtype=torch.float32).eval()
        valid = encode_split(corpus, work, spec.tokenizer, "valid", max_tokens=600_000)
        runs = lineage(work, name)
        loss = heldout_loss(exported, valid, 512)
        family["models"][name] = {
            "parameters": sum(p.numel() for p in exported.parameters()),
            "hidden": spec.hidden, "layers": spec.layers, "vocab_size": len(tok),
            "tokenizer": spec.tokenizer, "vocab_fingerprint": vocab_fingerprint(tok),
            "tokens_seen": sum(r["tokens_seen"] for r in runs), "data": shards_used(work, spec),
            "init_from": spec.init_from, "wall_clock_s": round(sum(r["wall_clock_s"] for r in runs), 1),
            "phases": [{k: r[k] for k in ("name", "tokens_seen", "mix", "lr", "wall_clock_s", "adopted_from") if k in r}
                       for r in runs],
            "heldout_loss": round(loss, 4),
            "heldout_ppl": round(math.exp(loss), 2),
            # loss per token and per byte of the shipped slice: bytes make different tokenizers comparable
            "slice_loss": round(slice_loss(exported, tok, text_slice), 4),
            **knows(exported, tok),
        }
        print(f"{name}: {family['models'][name]}")
    with (out / ".family.lock").open("w") as lock:  # exports of single models may run side by side
        fcntl.flock(lock, fcntl.LOCK_EX)
        if only and (out / "family.json").is_file():
            kept = json.loads((out / "family.json").read_text())["models"]
            family["models"] = {**{n: m for n, m in kept.items() if "probe_v1" in m}, **family["models"]}
        family["models"] = {n: family["models"][n] for n in FAMILY if n in family["models"]}
        (out / "family.json").write_text(json.dumps(family, indent=2) + "\n")
    plot_curves(work, out / "loss_curves.png")
    plot_exposures(work, out / "pilot", out / "exposures.png", family["people"]["v1"])
    write_model_card(family, out / "MODEL_CARD.md")


def lineage(work: Path, name: str) -> list[dict]:
    """train.json of every run a model was built through, first run first (phase 1, the knowledge update, phase 2)."""
    runs = []
    while name:
        run = json.loads((work / name / "final" / "train.json").read_text())
        runs.insert(0, run)
        if "earlier_phases" in run:  # adopted from an export (adopt_phase2): its history is recorded there
            return run["earlier_phases"] + runs
        name = FAMILY[name].init_from
    return runs


QA_PROBE_PEOPLE = 100  # people per generation for the probes after a QA instruction (first of the world's list)


def knows(model, tok) -> dict:
    """What the base knows untuned: knowledge probe on every v1 and v2 person, arithmetic on held-out problems,
    and `reachable` below."""
    people = load_world(WORLD_PATH)
    result = {}
    for g in ("v1", "v2"):
        probe = knowledge_probe(model, tok, [e for e in people if e.generation == g])
        result[f"probe_{g}"] = round(probe["all"], 4)
        result[f"probe_{g}_by_attribute"] = {k: round(v, 4) for k, v in probe.items() if k != "all"}
    return {**result, **addition_scores(model, tok), **reachable(model, tok)}


def addition_scores(model, tok) -> dict:
    """The skill: greedy sums (reversed digits) of 400 held-out pairs and of 400 pairs the corpus writes."""
    scores = {}
    for key, heldout in (("addition", True), ("addition_seen", False)):
        problems = [(a, "+", b) for a, b in addition_problems(400, heldout=heldout)]
        scores[key] = round(arithmetic_accuracy(model, tok, problems, reversed_digits=True), 4)
    scores["addition_in_story"] = round(story_addition(model, tok, 400), 4)
    return scores


def story_addition(model, tok, n: int) -> float:
    """The skill after a word problem: greedy sum after "<story>\n<a> + <b> =" on the first n *training* word
    problems of data/tasks/arithmetic (so no held-out row informs a pretraining choice)."""
    return addition_after_word_problems(model, tok, load_task("arithmetic", "train")[:n])


def reachable(model, tok) -> dict:
    """The probe after the people_qa instructions (training and held-out) on QA_PROBE_PEOPLE people per
    generation, and arithmetic on problems the corpus does contain: what QA tuning can reach, what was learnt."""
    people = load_world(WORLD_PATH)
    result = {}
    for g in ("v1", "v2"):
        group = [e for e in people if e.generation == g][:QA_PROBE_PEOPLE]
        for instruction in ("train", "heldout"):
            key = f"probe_qa_{g}" + ("" if instruction == "train" else "_heldout_instruction")
            result[key] = round(knowledge_probe(model, tok, group, instruction=instruction)["all"], 4)
    return result


def refresh_knows(out: Path) -> None:
    """Measure `reachable` on the exported models (weights untouched) and rewrite family.json and the card."""
    family = json.loads((out / "family.json").read_text())
    for name, entry in family["models"].items():
        model = LlamaForCausalLM.from_pretrained(out / name, dtype=torch.float32).eval()
        entry.update(reachable(model, PreTrainedTokenizerFast.from_pretrained(out / name)))
        print(f"{name}: {entry}", flush=True)
    (out / "family.json").write_text(json.dumps(family, indent=2) + "\n")
    write_model_card(family, out / "MODEL_CARD.md")


KNOWS_COLUMNS = ("probe_v1", "probe_qa_v1", "probe_qa_v1_heldout_instruction", "probe_v2", "probe_qa_v2",
                 "addition", "addition_seen", "addition_in_story")


def anneal_note(path: Path) -> str:
    """A sentence on `scripts/arithmetic_anneal_pilot.py`'s results, when it has been run."""
    if not path.is_file():
        return ""
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    parts = [f"{r['model']} {r['before']['seen']:.3f} -> {r['after']['seen']:.3f}" for r in runs]
    tokens = ", ".join(sorted({f"{r['anneal_tokens'] / 1e6:g} M" for r in runs}))
    return (f" Nor from an arithmetic-heavy annealing phase (`scripts/arithmetic_anneal_pilot.py`: {tokens} more "
            f"tokens, half of them arithmetic; seen-problem accuracy {', '.join(parts)}; "
            f"`pilot/arithmetic-anneal.jsonl`).")


def format_note(path: Path) -> str:
    """Sentences on `scripts/arithmetic_format_pilot.py`'s results (answers least significant digit first), when it
    has been run."""
    if not path.is_file():
        return (" It probably needs reversed-digit answers (least-significant digit first) from the start of "
                "pretraining (untested).")
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    cells = "; ".join(f"{r['model']}, {r.get('mix_name', 'family')} mix, {r['format']}: {r['seen']:.3f}" for r in runs)
    tokens = ", ".join(sorted({f"{r['tokens'] / 1e6:g} M" for r in runs}))
    learnt = sorted({f"{r['model']} ({r['format']})" for r in runs if r["seen"] >= 0.5})
    steps = ", ".join(sorted({str(r["tokens"] // (BATCH * CONTEXT)) for r in runs}))
    verdict = (f"learnt by {', '.join(learnt)}" if learnt else
               f"neither digit order was learnt within {steps} optimiser steps, not even on arithmetic alone; whether "
               "reversed answers help over the family's full budget "
               f"({FAMILY['mini-l-phase1'].tokens // (BATCH * CONTEXT)} "
               "steps for mini-l) stays open")
    return (f" {'From' if learnt else 'Nor from'} scratch with answers least significant digit first "
            f"(`scripts/arithmetic_format_pilot.py`, seen-problem accuracy after {tokens} tokens: {cells}; "
            f"`pilot/arithmetic-format.jsonl`): {verdict}.")


def _tokens(m: dict) -> str:
    phases = m.get("phases") or [{"tokens_seen": m["tokens_seen"]}]
    return " + ".join(f"{p['tokens_seen'] / 1e6:.2f}" for p in phases) + " M"


def skill_note(family: dict) -> str:
    """Held-out addition of mini-s, mini-m and mini-l from family.json, for the card's first paragraph."""
    m = family["models"]
    sizes = [n for n in ("mini-s", "mini-m", "mini-l") if "addition" in m.get(n, {})]
    cells = ", ".join(f"{n} {m[n]['addition']:.3f}" for n in sizes)
    story = ", ".join(f"{n} {m[n]['addition_in_story']:.3f}" for n in sizes if "addition_in_story" in m[n])
    return f"held-out sums: {cells}" + (f"; sums after a word problem: {story}" if story else "")


def write_model_card(family: dict, path: Path) -> None:
    """MODEL_CARD.md from family.json; the demo results section is kept if the card already has one."""
    rows = []
    for name, m in family["models"].items():
        shards = f"{m['data'][0].removesuffix('.txt')}..{m['data'][-1].removesuffix('.txt')}"
        rows.append(
            f"| {name} | {m['parameters'] / 1e6:.2f} M | {m['hidden']} x {m['layers']} | {m['vocab_size']} "
            f"({m['tokenizer']}) | {_tokens(m)} ({shards}) | {m['wall_clock_s'] / 60:.1f} min "
            f"| {m['heldout_loss']:.3f} | {m['heldout_ppl']:.1f} | `{m['vocab_fingerprint']}` |"
        )

    def cell(m: dict, key: str) -> str:
        return f"{m[key]:.3f}" if key in m else "-"

    knows_rows = [f"| {name} | {m['parameters'] / 1e6:.2f} M | " + " | ".join(cell(m, k) for k in KNOWS_COLUMNS)
                  + f" | {m['heldout_loss']:.3f} |" for name, m in family["models"].items()]
    kept = ""
    if path.is_file() and "\n## Demo results" in path.read_text():
        kept = path.read_text()[path.read_text().index("\n## Demo results"):]
    anneal = anneal_note(path.parent / "pilot" / "arithmetic-anneal.jsonl")
    formats = format_note(path.parent / "pilot" / "arithmetic-format.jsonl")
    phase2 = {n: FAMILY[f"{n}-phase2"] for n in ("mini-s", "mini-m", "mini-l", "mini-m-v2", "mini-l-v2")}
    budgets = ", ".join(f"{n} {spec.tokens / 1e6:g} M" for n, spec in phase2.items())
    def adopted(before: str) -> bool:
        return any(before in p.get("adopted_from", "") for m in family["models"].values() for p in m.get("phases", []))

    adopted_phase1 = (" This export's phase 1 is the family shipped before the skill phase existed (git cc652ce, "
                      "`--phase1-from`): phase 2 started from its fp16 weights, in fp32, with a fresh optimiser."
                      if adopted("before the skill phase") else "")
    adopted_phase2 = (" This export's phases 1-2 are the family shipped before phase 3 (`--phase2-from`): phase 3 "
                      "started from its fp16 weights, in fp32, with a fresh optimiser."
                      if adopted("before phase 3") else "")
    path.write_text(f"""# Built-in miniature model family

Llama-architecture causal LMs pretrained from scratch on 2 CPU cores by `scripts/build_family.py`
(`make family`), so that every transfertune claim can be measured without a model hub. They are tiny: use them
to measure transfer, not as assistants. Written by the build script from `family.json`; do not edit by hand.

## What each base knows and can do, untuned

The corpus is a small fictional world (`src/transfertune/family/world.py`, `data/world/entities.json`): biographies of
{family['people']['v1']} invented people that every base read, {family['people']['v2']} more that only the -v2
siblings read, two-digit addition, and Gutenberg books. Pretraining has three phases: phase 1 teaches the people
(and the books), phase 2, the skill phase, teaches addition while replaying the people, phase 3 writes the sums
after sentences of prose so that the skill is used after a word problem too. Bigger bases know more people and
add better ({skill_note(family)}); that difference is what transfer has to carry.

| model | parameters | probe, v1 people | after QA instruction | after held-out instruction | probe, v2 people \
| after QA instruction | addition, held-out | addition, seen | addition after a word problem | held-out book loss |
|---|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(knows_rows)}

- Knowledge probe: for each person and attribute, the sentence "<name> grew up in <town>." is scored for every
  town (likewise every birth year, profession, employer); the person counts as known when the true value is the
  most likely. Chance: {family['probe_chance']:.3f}. v2 people are new to v1 models (chance there) and known to
  the -v2 siblings.
- After QA instruction: the same ranking (first {QA_PROBE_PEOPLE} people of each generation) with the answer
  sentence of `people_qa` placed after its first training instruction ("State the home town. <name> grew up in
  <town>."), or after its held-out instruction ("Recall the home town. ..."): whether the fact can be reached
  from the prompt that QA tuning and transfer start from. A base can hold a fact and not produce it after a
  given prompt, and which prompts work differs between bases (`models/instruction_sweep.json`, written by
  `scripts/instruction_sweep.py` on training people only, on the phase-1 models: mini-l reached 0.98 after
  "State the ...", 0.21 after "Name the ..."); people_qa's instructions are the ones that reached the most in
  every base.
- Addition: greedy completion of "a + b =" (two-digit operands) on 400 sums the corpus never writes
  (`world.is_heldout_addition`, a rule over whole operands: every last-digit pair also occurs among the written
  sums, so a held-out sum tests the column-addition procedure, not recall) and on 400 it writes ("seen").
  Sums are written least significant digit first ("47 + 38 = 58" means 85), the order in which column
  addition produces them; the word-problem task (`data/tasks/arithmetic`) answers in the same notation.
  After a word problem: the same greedy sum after "<story>\n<a> + <b> =", on the first 400 *training* rows of
  `data/tasks/arithmetic` (sums the corpus writes; no held-out row was looked at to build the family).
- Both are measured by `scripts/build_family.py` at export; `log.jsonl` curves of the same probes during
  pretraining are drawn in `loss_curves.png` (phase 3), `loss_curves_phase2.png` (phase 2) and
  `loss_curves_phase1.png` (phase 1).

## Models

| model | parameters | hidden x layers | vocabulary | tokens seen, per phase (shards) | wall-clock | held-out loss \
| perplexity | vocab fingerprint |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

- Architecture: `LlamaForCausalLM`, tied input/output embeddings, SwiGLU, RoPE, grouped-query attention,
  context {family['context']} tokens. Weights stored in fp16 safetensors (load in fp32 on CPU).
- Tokenizers: byte-level BPE (`tokenizers`), digits split one per token, `<|endoftext|>` (end of text, also
  BOS) and `<|pad|>`. `main` (4096 tokens, trained on train-00 + world text) is shared by mini-s/m/l and the
  -v2 siblings; `x` (6144 tokens, trained on train-05 + world text) is mini-x's, for cross-vocabulary transfer.
- Phase 1: each batch of 16 windows of 256 tokens draws {family['mix']['base']} rows from each stream (bios_v1:
  biographies of the v1 people, {family['renderings']} renderings each, fresh phrasing and attribute order;
  arith: phase-1 arithmetic lines; books: {family['corpus']}, train-00..07). The -v2 siblings continue their
  parent's phase 1 on {family['mix']['new']}: the new people, a replay of the old ones, and books train-08..11
  never seen before (a "newer version" with a knowledge update).
- Phase 2 (the skill phase): every base but mini-x continues on {SKILL_MIX} (-v2 siblings:
  {SKILL_MIX_V2}, so they keep both generations of people and read their newer books); addition: lines
  "a + b = <reversed sum>" in blocks of 16, never a held-out sum. Budgets grow with size ({budgets}); lr 2e-3
  after 20 warm-up steps, cosine to a tenth. A -v2 sibling is its parent's phase 1, then the knowledge update,
  then the skill phase: the two share phase 1, not phase 2. mini-l's skill phase was first scheduled for 2 M
  tokens, like mini-l-v2's; at 2 M its held-out sums (0.18 on 200 during training) were still below mini-m's
  final 0.245, so it was resumed from its step-450 checkpoint with a 3 M-token cosine schedule (the lr rises
  again there; mini-l-v2 kept 2 M).{adopted_phase1}
  mini-x has no phase 2: it serves cross-vocabulary transfer of knowledge.
- Phase 3 (the skill in prose): every phase-2 base continues on {PROSE_MIX} (-v2 siblings: {PROSE_MIX_V2}) for
  {", ".join(f"{n} {k} steps" for n, k in PROSE_STEPS.items())} (budgets grow with size, as in phase 2; lr 1e-3,
  10 warm-up steps, cosine to a tenth). addition_prose: documents in which each sum line follows one or two
  sentences of a book shard (train-00; some of them questions), `world.addition_in_prose`. Why: after phase 2
  the bases added only inside blocks of sums: after a word problem mini-l's sums fell from 0.97 to 0.07, so
  neither fine-tuning nor transfer could use the skill (fine-tuned mini-l: 0.000 on the word problems). How it
  was chosen (logs of the tries are not shipped; the numbers are from their `log.jsonl`, probes on 80 people and
  200 sums): a pilot continuing mini-l with biography sentences of the world's people as the prose reached 0.40
  after a word problem in 200 steps (lr 1e-3). With book sentences added and 400 steps at lr 1.5e-3, mini-l
  reached 0.96 by step 100, but mini-s's probe rose from 0.44 towards 0.86 (the biographies are facts); with
  biographies of filler people outside the world instead, mini-l's probe fell to 0.54 by step 200 (facts about
  other people in the same form interfere) while mini-m learnt to add (0.99 at step 200) and overtook mini-l.
  So the prose is book sentences only, the budget is short, and it grows with size. No word problem of
  `data/tasks/arithmetic` is written in any phase.{adopted_phase2}
- Why phase 2: phase 1 wrote two-digit addition and subtraction with the answer most significant digit first
  (and in words), held out by last-digit pair, and no size learnt it from ~1.5 M arithmetic tokens.{anneal}{formats}
  A pilot (`scripts/addition_order_pilot.py`, `pilot/addition-order.jsonl`: phase-1 bases on arithmetic lines
  alone) found the order that is learnt: mini-m learnt reversed sums between steps 200 and 300 (0.10 -> 0.92
  on held-out sums) while mini-s stayed at or below 0.04 through 350 steps, and neither order was learnt by mini-s
  with subtraction mixed in. Phase 1 wrote 90% of all two-digit problems in the other digit order, so most
  held-out sums may have occurred there, most significant digit first (unlearnt); none occurs in phase 2.
- Held-out loss: nats per token on the first 131k tokens of `valid-00.txt` (15 whole books never trained on);
  per-token losses of mini-x are not comparable with the others (another tokenizer).
- Sizing of phase 1 (`models/pilot/*.jsonl`, drawn with the family's own curves in `exposures.png`): with 200
  people and up to ~35 exposures per person, mini-s and mini-m stayed at chance on the probe through 300 steps;
  knowledge is limited by exposures per person, not capacity (a 0.8 M-parameter model holds far more than
  100 x 4 facts), so the world was cut to {family['people']['v1']} + {family['people']['v2']} people and the
  bios share of every batch raised so that each v1 person is written ~300 times within the CPU budget. A few
  thousand people (as in "Physics of Language Models") would need ~20x the tokens: hours on a GPU, not on 2
  cores. mini-l's phase 1 was first scheduled for 5 M tokens; at 4.5 M its probe (0.89 on 40 people) was still
  below mini-m's final 0.96, so it was resumed from its step-1100 checkpoint with a 6 M-token cosine schedule.
- `heldout-slice.txt` (40k characters of valid-00) and each model's `slice_loss` in `family.json` are what
  `tests/test_family.py` checks, to catch a broken or swapped checkpoint.
- Wall-clock: the sum over phases; runs shared the 2 cores with other runs and other work (phase 2: five runs
  side by side, one thread each), so times include sharing.
- Licence: the weights are derived only from public-domain (US) texts and generated text; we release them
  under the project's licence.
{kept}""")


def _log_rows(log: Path, key: str) -> list[dict]:
    by_step = {r["step"]: r for r in map(json.loads, log.read_text().splitlines()) if key in r}
    return [by_step[k] for k in sorted(by_step)]  # a resumed run re-logs the steps after its checkpoint


def plot_curves(work: Path, path: Path) -> None:
    """Held-out book loss, knowledge probe (v1 and v2 people) and the skill against training tokens; each run
    starts where the runs it continues ended, and a model's phases share its colour. Runs adopted from an earlier
    export (`--phase1-from`, `--phase2-from`) have no log: their curves are in models/loss_curves_phase1.png and
    loss_curves_phase2.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("valid_loss", "held-out book loss (nats/token)"), ("probe_v1", "knowledge probe: v1 people"),
              ("probe_v2", "knowledge probe: v2 people (new)"), ("addition", "skill: held-out sums (reversed)"),
              ("addition_in_story", "skill: sums after a word problem")]
    exported = [n for n, spec in FAMILY.items() if spec.export]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4))
    for ax, (key, title) in zip(axes, panels):
        for name in FAMILY:
            log = work / name / "log.jsonl"
            if not log.is_file():
                continue
            rows = _log_rows(log, key)
            parent = FAMILY[name].init_from
            offset = sum(r["tokens_seen"] for r in lineage(work, parent)) if parent else 0
            model = name.removesuffix("-phase1").removesuffix("-phase2")
            ax.plot([offset + r["tokens"] for r in rows], [r[key] for r in rows], color=f"C{exported.index(model)}",
                    label=model if FAMILY[name].export else None, ls="-" if FAMILY[name].export else "--")
        if key.startswith("probe"):
            ax.axhline(probe_chance(), color="gray", ls=":", lw=1, label="chance")
        ax.set_xlabel("training tokens")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Built-in family v2: the phases trained in this work dir "
                 "(phase 1 dashed; adopted phases have no curve)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


BIO_TOKENS = 73  # mean tokens of one biography (+ EOS) with the main tokenizer


def plot_exposures(work: Path, pilot: Path, path: Path, people_v1: int) -> None:
    """Knowledge probe against exposures per person, by model size and number of people: the sizing pilot
    (8 of 16 rows were bios then) and the family's own runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = []
    for name, run in json.loads((pilot / "pilot.json").read_text())["runs"].items():
        curves.append((f"pilot {name.split('-', 1)[1]}, {run['people']} people", pilot / f"{name}.jsonl",
                       run["bios_rows"] / BATCH, run["people"], "--"))
    for name in ("mini-s", "mini-m", "mini-l"):
        run = f"{name}-phase1"
        if (work / run / "log.jsonl").is_file():
            curves.append((f"{name}, {people_v1} people", work / run / "log.jsonl",
                           FAMILY[run].mix["bios_v1"] / BATCH, people_v1, "-"))
    if not any(style == "-" for *_, style in curves) and path.is_file():
        return  # phase 1 was adopted from an earlier export: keep the plot drawn from its logs
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, log, share, n, style in curves:
        rows = _log_rows(log, "probe_v1")
        ax.plot([r["tokens"] * share / BIO_TOKENS / n for r in rows], [r["probe_v1"] for r in rows], style,
                marker="o", ms=3, label=label)
    ax.axhline(probe_chance(), color="gray", ls=":", lw=1, label="chance")
    ax.set_xlabel("exposures per person (biographies read)")
    ax.set_ylabel("knowledge probe accuracy (40 people)")
    ax.set_title("Knowledge is learnt with exposures, faster by bigger models", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    global WORLD_PATH
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "data" / "gutenberg-en",
                   help="folder with train-XX.txt / valid-00.txt (the Gutenberg book shards)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "family", help="checkpoints, logs, token caches")
    p.add_argument("--out", type=Path, default=ROOT / "models", help="where the exported family goes")
    p.add_argument("--only", nargs="*", choices=list(FAMILY), help="build only these models")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N optimizer steps")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every token budget (e.g. 10 on a GPU)")
    p.add_argument("--export-only", action="store_true", help="skip training, export what is finished")
    p.add_argument("--no-export", action="store_true", help="train only (pilot runs)")
    p.add_argument("--knows-only", action="store_true",
                   help="measure the QA-instruction probes and seen-problem arithmetic on the exported models in "
                        "--out (weights untouched), add them to family.json, rewrite MODEL_CARD.md")
    p.add_argument("--world", type=Path, default=WORLD_PATH, help="people of the encyclopedia (made if missing)")
    p.add_argument("--people", type=int, nargs=2, default=(N_V1, N_V2), metavar=("V1", "V2"),
                   help="people in every base's corpus / only in the -v2 siblings' (when the world is made)")
    p.add_argument("--tokens", type=int, help="token budget of every model trained (pilot runs)")
    p.add_argument("--probe-every", type=int, default=200, help="knowledge/arithmetic probe every N steps")
    p.add_argument("--phase1-from", type=Path, metavar="DIR",
                   help="an earlier export of the family (models/ with family.json, from before the skill phase) to "
                        "use as the finished phase-1 runs instead of pretraining them")
    p.add_argument("--phase2-from", type=Path, metavar="DIR",
                   help="an earlier export of the family (models/ with family.json, from before phase 3) to use as the "
                        "finished phase-2 runs")
    args = p.parse_args()
    if not (args.corpus / "valid-00.txt").is_file():
        sys.exit(f"build_family: error: {args.corpus} has no valid-00.txt; pass --corpus PATH to gutenberg-en")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    WORLD_PATH = args.world
    if args.knows_only:
        return refresh_knows(args.out)
    if args.phase1_from:
        adopt_phase1(args.work, args.phase1_from)
    if args.phase2_from:
        adopt_phase2(args.work, args.phase2_from)
    if not WORLD_PATH.is_file():
        save_world(make_entities(*args.people, seed=WORLD_SEED), WORLD_PATH, WORLD_SEED)
    people = load_world(WORLD_PATH)
    world_text = "\n".join(biographies(people, 3, seed=WORLD_SEED) + [arithmetic_text(5000, seed=WORLD_SEED)])
    train_tokenizer(args.corpus, args.work / "tokenizer-main", TOKENIZERS["main"], "train-00.txt", world_text)
    train_tokenizer(args.corpus, args.work / "tokenizer-x", TOKENIZERS["x"], "train-05.txt", world_text)
    if not args.export_only:
        for name in args.only or list(FAMILY):
            spec = FAMILY[name]
            spec.tokens = int((args.tokens or spec.tokens) * args.scale)
            pretrain(spec, args.corpus, args.work, args.seed, args.save_every, args.probe_every)
    if not args.no_export:
        export(args.corpus, args.work, args.out, args.only if args.export_only else None)


if __name__ == "__main__":
    main()
