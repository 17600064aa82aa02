"""Recipe of the built-in demo model: a small Mixtral trained from scratch on Python's standard library.

    python scripts/train_demo.py [--work build/demo] [--steps 1000]     # train, evaluate, export to WORK/model
    python scripts/train_demo.py [--work build/demo] --install          # then, as its own step: ship WORK/model

1. corpus: the standard library's `.py` files (PSF license) outside test folders; every 20th file (sorted
   by path) is held out for validation;
2. a 2048-piece SentencePiece BPE vocabulary (bos=1, eos=2, byte fallback, whitespace kept) on the
   training files;
3. `mixtral-jax train --config scripts/demo_config.json ...` (the command is printed);
4. validation perplexity, training time, a greedy sample and the loss curve (`WORK/summary.json`), and
   `mixtral-jax export WORK/run WORK/model --dtype bfloat16`.
Each stage is skipped when its output exists, so the script also resumes an interrupted training run. Nothing
of the package changes until `--install` copies `WORK/model` over `mixtral_jax/assets/demo/`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "scripts" / "demo_config.json"
DEMO = ROOT / "mixtral_jax" / "assets" / "demo"
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages"}
VOCAB = 2048
SEQ_LEN, BATCH = 128, 8
SAMPLE_PROMPT, SAMPLE_TOKENS = "def fibonacci(n):", 64
DECAY_STEPS = 1000  # the cosine schedule's length; --steps may stop the run earlier


def corpus(work: Path) -> tuple[list[Path], list[Path]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if not EXCLUDED_DIRS & set(p.relative_to(stdlib).parts))
    val = files[::20]
    train = [p for i, p in enumerate(files) if i % 20]
    (work / "val_files.txt").write_text("".join(f"{p}\n" for p in val))
    return train, val


def tokenizer(work: Path, train: list[Path]) -> Path:
    import sentencepiece as spm

    model = work / "tokenizer.model"
    if model.is_file():
        return model
    text = work / "spm_input.txt"
    text.write_text("".join(p.read_text(encoding="utf-8", errors="replace") for p in train))
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(work / "tokenizer"), model_type="bpe", vocab_size=VOCAB,
        byte_fallback=True, character_coverage=0.9995, split_digits=True, add_dummy_prefix=False,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, normalization_rule_name="identity",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, input_sentence_size=2_000_000, shuffle_input_sentence=True,
        max_sentence_length=16384, num_threads=2, minloglevel=2,
    )
    text.unlink()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "demo")
    parser.add_argument("--steps", type=int, default=1000, help="stop after this many steps (default 1000)")
    parser.add_argument("--install", action="store_true",
                        help="only copy WORK/model, made by an earlier run, over the package's demo model")
    args = parser.parse_args()
    if args.install:
        install(args.work / "model")
        return
    args.work.mkdir(parents=True, exist_ok=True)
    train_files, val_files = corpus(args.work)
    spm_model = tokenizer(args.work, train_files)
    run = args.work / "run"
    train_args = [
        "train", "--config", str(CONFIG), "--tokenizer", str(spm_model), "--data", *map(str, train_files),
        "--steps", str(args.steps), "--batch-size", str(BATCH), "--seq-len", str(SEQ_LEN), "--lr", "2e-3",
        "--warmup-steps", "30", "--decay-steps", str(DECAY_STEPS), "--save-every", "50", "--log-every", "10",
        "--output", str(run),
    ]
    shown = train_args[:6] + ["<stdlib files>"] + train_args[6 + len(train_files):]
    print("mixtral-jax", " ".join(shlex.quote(a) for a in shown), flush=True)
    from mixtral_jax.cli import main as cli

    start = time.perf_counter()
    if cli(train_args):
        raise SystemExit("training failed")
    print(f"training (this call) took {time.perf_counter() - start:.0f} s", flush=True)
    report(run, spm_model, val_files, args.work)


def report(run: Path, spm_model: Path, val_files: list[Path], work: Path) -> None:
    """Validation perplexity, training time, a greedy sample and the loss curve into WORK/summary.json;
    then the export into WORK/model."""
    import math

    import mixtral_jax
    from mixtral_jax import data, train
    from mixtral_jax.cli import main as cli
    from mixtral_jax.tokenizer import Tokenizer

    model = mixtral_jax.load(run)
    val = data.tokenize_files(val_files, Tokenizer(spm_model))
    loss = train.evaluate(model, val, SEQ_LEN)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged_tokens = [BATCH * SEQ_LEN * (r["step"] - q["step"]) for q, r in zip([{"step": 0}] + records, records)]
    prompt = model.tokenizer.encode(SAMPLE_PROMPT)
    sample = SAMPLE_PROMPT + model.tokenizer.decode(model.generate([prompt], SAMPLE_TOKENS)[0])
    summary = {
        "steps": records[-1]["step"], "val_tokens": int(len(val)), "val_loss": loss, "val_perplexity": math.exp(loss),
        "train_seconds": sum(n / r["tokens_per_s"] for n, r in zip(logged_tokens, records)),
        "loss_curve": {r["step"]: round(r["loss"], 3) for r in records if r["step"] % 50 == 0 or r is records[0]},
        "sample": sample,
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2), flush=True)
    model_dir = work / "model"
    if cli(["export", str(run), str(model_dir), "--dtype", "bfloat16", "--force"]):
        raise SystemExit("export failed")
    print(f"exported {model_dir}; `python scripts/train_demo.py --work {work} --install` ships it", flush=True)


def install(model_dir: Path) -> None:
    """Replace the package's demo model by `model_dir` (an export of this recipe), the old one only once
    the new one is in place beside it."""
    if not (model_dir / "config.json").is_file() or not (model_dir / "model.safetensors").is_file():
        raise SystemExit(f"{model_dir}: no exported demo model here; run the recipe first")
    new, old = DEMO.with_name(".demo.new"), DEMO.with_name(".demo.old")
    shutil.rmtree(new, ignore_errors=True)
    shutil.copytree(model_dir, new, ignore=shutil.ignore_patterns(".*"))
    shutil.rmtree(old, ignore_errors=True)
    DEMO.rename(old)
    new.rename(DEMO)
    shutil.rmtree(old)
    print(f"installed {model_dir} as {DEMO}")


if __name__ == "__main__":
    main()
