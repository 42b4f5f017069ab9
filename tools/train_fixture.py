"""Train the small Gemma 2 that quantization quality is measured on (development only).

Writes, under tests/fixtures/ (see tests/fixtures/README.md):

    gemma2-tiny-trained/    bf16 ``transformers.Gemma2ForCausalLM`` (save_pretrained, safetensors), the
                            tokenizer (tokenizer.model + the HF files) and training.json (corpus, curve)
    eval.txt                held-out text for KL / top-1 / perplexity
    calibration.txt         a different held-out text for GPTQ calibration

Corpus: text every CPython install ships, read from the running interpreter's standard library —
English prose (the language-reference topics in ``pydoc_data/topics.py`` and the docstrings of the
top-level stdlib modules) and Python code (the full source of the modules in CODE_MODULES). The
documents named in EVAL / CALIBRATION are held out of tokenizer and model training.

Tokenizer: SentencePiece BPE in Gemma's layout (the trainer flags of ``gemma2_convert.formats.tokenizer.tiny``:
0 <pad>, 1 <eos>, 2 <bos>, 3 <unk>, <mask>, <start_of_turn>, <end_of_turn>, whitespace runs, byte fallback).

Model: real Gemma 2 structure at small size — GQA 4:2, head_dim 128 != H/N = 64, both softcaps, sliding
window 64 < context 256 on the even layers. query_pre_attn_scalar equals head_dim, as in the published
2B and 9B: stock llama.cpp ignores the key and scales queries by 1/sqrt(head_dim) at every depth but 46
(``src/models/gemma2.cpp``), so with any other value its converter + ``llama-quantize`` would run a
different model, and quality baselines measured through it would be wrong.
Every linear layer's in_features (256 or 512) is a multiple of 256, as K-quants need. Eager attention,
fp32 AdamW on 2 threads, warmup–stable–decay learning rate.

Length: by default the clock decides (``--minutes``, 13): the learning rate stays at its peak until
85 % of the budget has passed, then decays over a fifth as many steps again. The step counts it chose
go into training.json as a ``replay`` command (``--steps N --decay-steps K``), which reproduces the
run bit for bit given the same Python (the corpus), sentencepiece, torch and CPU kind.

Usage (from the repository root):
    python tools/train_fixture.py [--out tests/fixtures] [--minutes 13] [--force]
    python tools/train_fixture.py --steps N --decay-steps K --force     # replay a recorded run
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import math
import os
import platform
import shutil
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import pydoc_data.topics
import sentencepiece as spm
import torch
import transformers

from gemma2_convert.formats.tokenizer.tiny import trainer_options  # the Gemma-layout SentencePiece flags
from gemma2_convert.formats.tokenizer.hf_files import write_hf_tokenizer
from reference.config import Gemma2Config

MODEL_DIR = "gemma2-tiny-trained"
MAX_FIXTURE_BYTES = 10 * 1024 * 1024
VOCAB_SIZE = 2048
CONTEXT = 256  # training sequence length, <bos> included
THREADS = 2
CURVE_ROWS = 8  # held-out windows scored at each curve point (the final score uses all of eval.txt)
DECAY_AT = 0.85  # with --minutes: share of the time budget spent before the learning rate decays

CONFIG = Gemma2Config(
    vocab_size=VOCAB_SIZE, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=128, query_pre_attn_scalar=128,
    sliding_window=64, max_position_embeddings=CONTEXT, attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0, torch_dtype="bfloat16",
)

# Stdlib modules whose full source is the code part of the corpus (the other top-level modules
# contribute their docstrings to the English part).
CODE_MODULES = (
    "abc", "argparse", "base64", "bisect", "calendar", "contextlib", "copy", "csv", "dataclasses",
    "fnmatch", "fractions", "functools", "glob", "graphlib", "heapq", "numbers", "operator", "pathlib",
    "pprint", "queue", "random", "sched", "selectors", "statistics", "string", "timeit", "tokenize",
    "weakref",
)
SKIPPED_MODULES = ("this",)  # rot13 text; _sysconfigdata* is skipped by prefix

# Held-out documents: "topic:<pydoc topic>" or "code:<module>".
EVAL = ("topic:comparisons", "topic:try", "topic:typesmapping", "code:shlex")
CALIBRATION = ("topic:typesseq", "code:textwrap")


@dataclass(frozen=True)
class Document:
    name: str  # "topic:…", "doc:<module>" (docstrings) or "code:<module>"
    text: str


# ----------------------------------------------------------------------------- corpus


def stdlib_documents() -> list[Document]:
    """Every corpus document in a fixed order: pydoc topics, then the stdlib modules by name."""
    topics = pydoc_data.topics.topics
    docs = [Document(f"topic:{k}", topics[k]) for k in sorted(topics)]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.glob("*.py")):
        module = path.stem
        if module in SKIPPED_MODULES or module.startswith("_sysconfigdata"):
            continue
        source = path.read_text(encoding="utf-8")
        if module in CODE_MODULES or f"code:{module}" in EVAL + CALIBRATION:
            docs.append(Document(f"code:{module}", source))
        elif text := docstrings(source):
            docs.append(Document(f"doc:{module}", text))
    return docs


def docstrings(source: str) -> str:
    """The module, class and function docstrings of ``source``, in source order, blank-line separated."""
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    nodes = [n for n in ast.walk(ast.parse(source)) if isinstance(n, kinds)]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))
    return "\n\n".join(d for n in nodes if (d := ast.get_docstring(n)))


def split_corpus(docs: list[Document]) -> tuple[list[Document], str, str]:
    """(training documents, eval text, calibration text); held-out names must all exist."""
    by_name = {d.name: d for d in docs}
    missing = sorted(set(EVAL + CALIBRATION) - set(by_name))
    if missing:
        raise SystemExit(f"held-out documents {missing} are not in this Python's standard library")
    def join(names: tuple[str, ...]) -> str:
        return "\n\n".join(by_name[n].text.strip("\n") for n in names) + "\n"

    train = [d for d in docs if d.name not in EVAL + CALIBRATION]
    return train, join(EVAL), join(CALIBRATION)


def corpus_stats(train: list[Document]) -> dict[str, object]:
    """Bytes per part and a hash of the training text, for training.json and the README."""
    parts: dict[str, int] = {}
    digest = hashlib.sha256()
    for d in train:
        kind = d.name.split(":")[0]
        parts[kind] = parts.get(kind, 0) + len(d.text.encode())
        digest.update(d.name.encode() + b"\0" + d.text.encode() + b"\0")
    return {"documents": len(train), "bytes": parts, "sha256": digest.hexdigest()}


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(train: list[Document], path: Path) -> spm.SentencePieceProcessor:
    """A Gemma-layout BPE model with VOCAB_SIZE pieces, trained on the training documents' lines."""
    lines = (line for d in train for line in d.text.splitlines() if line.strip())
    options = trainer_options(VOCAB_SIZE)
    model = io.BytesIO()
    with open(os.devnull, "w") as quiet:
        spm.SentencePieceTrainer.train(sentence_iterator=lines, model_writer=model, logstream=quiet, **options)
    path.write_bytes(model.getvalue())
    return spm.SentencePieceProcessor(model_file=str(path))


def token_stream(sp: spm.SentencePieceProcessor, docs: list[Document]) -> torch.Tensor:
    """All documents as one id sequence, each followed by <eos>."""
    ids: list[int] = []
    for d in docs:
        ids += sp.encode(d.text) + [CONFIG.eos_token_ids[0]]
    return torch.tensor(ids, dtype=torch.long)


def windows(ids: torch.Tensor) -> torch.Tensor:
    """Consecutive CONTEXT-token rows ``<bos> + ids[k·(C−1) : (k+1)·(C−1)]``; the last may be short (padded)."""
    n = CONTEXT - 1
    rows = [ids[i:i + n] for i in range(0, len(ids), n)]
    out = torch.full((len(rows), CONTEXT), CONFIG.pad_token_id, dtype=torch.long)  # [R, C]
    out[:, 0] = CONFIG.bos_token_id
    for r, row in enumerate(rows):
        out[r, 1:1 + len(row)] = row
    return out


# ----------------------------------------------------------------------------- model and training


def new_model(seed: int) -> transformers.Gemma2ForCausalLM:
    hf = transformers.Gemma2Config(**CONFIG.to_hf_dict(), attn_implementation="eager")
    torch.manual_seed(seed)
    return transformers.Gemma2ForCausalLM(hf).float()


def labels_for(rows: torch.Tensor) -> torch.Tensor:
    """Loss on every real token: padding is ignored (-100)."""
    return rows.masked_fill(rows == CONFIG.pad_token_id, -100)


@torch.no_grad()
def mean_loss(model: transformers.Gemma2ForCausalLM, rows: torch.Tensor, batch: int = 16) -> float:
    """Mean next-token NLL (nats) over all predicted tokens of ``rows``."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch):
        x = rows[i:i + batch]
        y = labels_for(x)
        n = int((y[:, 1:] != -100).sum())
        total += model(input_ids=x, labels=y).loss.item() * n
        count += n
    model.train()
    return total / count


@dataclass
class Schedule:
    """Warmup–stable–decay learning rate: linear warmup, constant peak, linear decay to 10 % at the end.

    With ``steps`` None the clock picks the length: the stable phase runs until ``DECAY_AT`` of
    ``seconds`` has passed, then decay takes a fifth as many steps again. The chosen ``steps`` and
    ``decay_steps`` are recorded; passing them back replays the run exactly.
    """

    peak: float
    warmup: int
    steps: int | None
    decay_steps: int | None
    seconds: float

    def lr(self, step: int) -> float:
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        left = None if self.steps is None else self.steps - step
        if left is None or left > self.decay_steps:
            return self.peak
        return self.peak * (0.1 + 0.9 * left / self.decay_steps)

    def running(self, step: int, elapsed: float) -> bool:
        """Whether to take step ``step``; fixes the length once the stable phase's time is up."""
        if self.steps is None and elapsed >= DECAY_AT * self.seconds:
            self.decay_steps = max(1, step // 5)
            self.steps = step + self.decay_steps
        return self.steps is None or step < self.steps


def train(model, stream: torch.Tensor, heldout: torch.Tensor, sched: Schedule, args) -> list[dict[str, float]]:
    """AdamW on random CONTEXT windows of ``stream``; returns the loss curve."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=sched.peak, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(args.seed)
    curve, recent, start, step = [], [], time.perf_counter(), 0
    model.train()
    while sched.running(step, time.perf_counter() - start):
        starts = torch.randint(0, len(stream) - CONTEXT, (args.batch,), generator=gen)
        x = torch.stack([stream[s:s + CONTEXT] for s in starts.tolist()])  # [B, C]
        x[:, 0] = CONFIG.bos_token_id
        for group in opt.param_groups:
            group["lr"] = sched.lr(step)
        loss = model(input_ids=x, labels=labels_for(x)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        recent.append(loss.item())
        step += 1
        if step % args.eval_every == 0 or step == sched.steps:
            curve.append({"step": step, "tokens": step * args.batch * CONTEXT,
                          "train_loss": round(sum(recent) / len(recent), 4),
                          "heldout_loss": round(mean_loss(model, heldout[:CURVE_ROWS]), 4),
                          "seconds": round(time.perf_counter() - start, 1)})
            recent = []
            print(json.dumps(curve[-1]), flush=True)
    return curve


# ----------------------------------------------------------------------------- output


def save_fixture(model, spm_path: Path, out: Path) -> int:
    """save_pretrained in bf16 plus the tokenizer files; returns the directory's size in bytes."""
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    write_hf_tokenizer(spm_path, out, chat_template=None, model_max_length=CONTEXT)
    size = sum(p.stat().st_size for p in out.iterdir())
    if size > MAX_FIXTURE_BYTES:
        raise SystemExit(f"{out}: {size} bytes, over the {MAX_FIXTURE_BYTES}-byte fixture limit; shrink CONFIG")
    return size


def environment() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "sentencepiece": spm.__version__,
            "threads": str(torch.get_num_threads()), "machine": platform.machine()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("tests/fixtures"), help="fixtures directory")
    p.add_argument("--minutes", type=float, default=13.0,
                   help="training time budget that picks the step counts (ignored with --steps)")
    p.add_argument("--steps", type=int, help="optimizer steps, replaying a recorded run (needs --decay-steps)")
    p.add_argument("--decay-steps", type=int, help="final steps of linear learning-rate decay")
    p.add_argument("--batch", type=int, default=4, help="sequences of CONTEXT tokens per step")
    p.add_argument("--lr", type=float, default=5e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=10, help="warmup steps")
    p.add_argument("--eval-every", type=int, default=25, help="steps between held-out evaluations")
    p.add_argument("--seed", type=int, default=0, help="seed for initialisation and batch sampling")
    p.add_argument("--force", action="store_true", help="replace an existing fixture")
    args = p.parse_args(argv)
    if (args.steps is None) != (args.decay_steps is None):
        p.error("--steps and --decay-steps go together (copy both from training.json's replay command)")
    return args


def replay_command(args: argparse.Namespace, sched: Schedule) -> str:
    """The command that reproduces this run step for step."""
    return (f"python tools/train_fixture.py --steps {sched.steps} --decay-steps {sched.decay_steps} "
            f"--batch {args.batch} --lr {args.lr} --warmup {args.warmup} --eval-every {args.eval_every} "
            f"--seed {args.seed}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(THREADS)
    final = args.out / MODEL_DIR
    if final.exists() and not args.force:
        raise SystemExit(f"{final} exists; pass --force to replace it")
    tmp = args.out / f".{MODEL_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    train_docs, eval_text, calibration_text = split_corpus(stdlib_documents())
    sp = train_tokenizer(train_docs, tmp / "tokenizer.model")
    stream = token_stream(sp, train_docs)
    heldout = windows(torch.tensor(sp.encode(eval_text)))
    print(f"corpus: {len(train_docs)} documents, {stream.numel()} training tokens; "
          f"eval {len(eval_text.encode())} bytes ({heldout.numel()} tokens)", flush=True)

    model = new_model(args.seed)
    sched = Schedule(args.lr, args.warmup, args.steps, args.decay_steps, args.minutes * 60)
    start = time.perf_counter()
    curve = train(model, stream, heldout, sched, args)
    seconds = time.perf_counter() - start
    model = model.to(torch.bfloat16).float()  # measure what is stored
    heldout_loss = mean_loss(model, heldout)
    size = save_fixture(model, tmp / "tokenizer.model", tmp)

    log = {"replay": replay_command(args, sched), "environment": environment(),
           "corpus": corpus_stats(train_docs) | {"tokens": stream.numel()},
           "eval": {"documents": list(EVAL), "bytes": len(eval_text.encode())},
           "calibration": {"documents": list(CALIBRATION), "bytes": len(calibration_text.encode())},
           "training_seconds": round(seconds, 1), "curve": curve,
           "heldout_loss_bf16": round(heldout_loss, 4), "heldout_ppl_bf16": round(math.exp(heldout_loss), 2),
           "uniform_ppl": VOCAB_SIZE, "fixture_bytes": size}
    (tmp / "training.json").write_text(json.dumps(log, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    (args.out / "eval.txt").write_text(eval_text, encoding="utf-8")
    (args.out / "calibration.txt").write_text(calibration_text, encoding="utf-8")
    print(f"held-out ppl {math.exp(heldout_loss):.2f} (uniform {VOCAB_SIZE}); {size} bytes in {final}; "
          f"trained in {seconds:.0f} s; replay: {log['replay']}")


if __name__ == "__main__":
    main()
