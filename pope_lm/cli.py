"""The `pope-lm` command line: `train`, `prepare`, and the tools that later issues add.

Every user mistake ends with one line `error: ...` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from pope_lm.config import ConfigError
from pope_lm.data import DataError

EXIT_USAGE = 2
# sysexits' EX_TEMPFAIL: training stopped on SIGUSR1 after saving a checkpoint; launch/slurm.sh requeues the job.
EXIT_REQUEUE = 75
PRECISION_HELP = "auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16"


def _train(args: argparse.Namespace) -> int:
    from pope_lm.checkpointing import CheckpointWriteError
    from pope_lm.config import load_config
    from pope_lm.strategy import Preempted
    from pope_lm.train import train

    cfg = load_config(args.recipe, args.overrides)
    try:
        metrics = train(cfg)
    except Preempted as stop:
        print(f"{stop}; exit code {EXIT_REQUEUE} asks the launcher to requeue (then resume=auto)", file=sys.stderr)
        return EXIT_REQUEUE
    except CheckpointWriteError as exc:  # the disk, not the recipe: exit 1, the last written checkpoint stands
        print(f"error: {exc}", file=sys.stderr)
        return 1
    shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith(("val/", "train/", "test/"))}
    print(f"done: step {metrics['step']}, {shown}, run dir {cfg.resolved_run_dir}")
    return 0


def _consolidate(args: argparse.Namespace) -> int:
    from pope_lm.consolidate import consolidate

    print(f"wrote {consolidate(args.checkpoint, args.out)}")
    return 0


def _eval_length(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pope_lm.evaluation import EvalSettings, eval_length, parse_lengths

    settings = EvalSettings(
        lengths=parse_lengths(args.lengths), data=args.data, out=Path(args.out), split=args.split,
        batch_size=args.batch_size, max_tokens=args.max_tokens, bucket_size=args.bucket_size, device=args.device,
        precision=args.precision, tokenizer=args.tokenizer,
    )
    results = eval_length(args.checkpoints, settings, args.rope_scaling, args.scale_factor, args.labels,
                          args.tracking_uri, args.experiment, tracking=not args.no_tracking)
    for model in results:
        print(model.label + ": " + ", ".join(f"{r.length}: {r.ppl:.2f}" for r in model.lengths))
    print(f"wrote {settings.out / 'length_ppl.csv'}, position_loss.csv and length_ppl.png")
    return 0


def _export_hf(args: argparse.Namespace) -> int:
    from pope_lm.hf.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, tokenizer_name=args.tokenizer, dtype=args.dtype)
    print(f"exported {args.checkpoint} to {out}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from pope_lm.sampling import SamplingSettings, sample

    settings = SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_k=args.top_k or None, greedy=args.greedy, seed=args.seed)
    print(args.prompt + sample(args.checkpoint, args.prompt, settings, args.device, args.tokenizer, args.precision))
    return 0


def _eval_zeroshot(args: argparse.Namespace) -> int:
    from pope_lm.zeroshot import ZeroShotSettings, eval_zeroshot

    settings = ZeroShotSettings(tasks=args.tasks.split(","), out=args.out, batch_size=args.batch_size,
                                device=args.device, dtype=args.dtype, limit=args.limit,
                                include_path=args.include_path, tracking_uri=args.tracking_uri,
                                experiment=args.experiment)
    print(eval_zeroshot(args.model_dir, settings))
    return 0


def _add_tool_parsers(sub: argparse._SubParsersAction) -> None:
    """eval-length, export-hf, sample and eval-zeroshot (issue 6); their modules are imported only when run."""
    evl = sub.add_parser(
        "eval-length", help="perplexity against context length for one or more checkpoints",
        description="Score checkpoints on long documents at several context lengths (non-overlapping windows); "
                    "writes length_ppl.csv, position_loss.csv and length_ppl.png, and logs them to MLflow.")
    evl.add_argument("checkpoints", nargs="+", metavar="CKPT", help="native pope-lm checkpoints (.ckpt)")
    evl.add_argument("--data", nargs="+", required=True,
                     help="text files, globs or folders of .txt files (e.g. PG-19 test books), or prepared datasets")
    evl.add_argument("--lengths", default="1024:10240:1024",
                     help="'a,b,c' or 'start:stop:step' (default: the paper's 1024:10240:1024)")
    evl.add_argument("--rope-scaling", default="none",
                     help="RoPE models: none (as trained) | pi | ntk | yarn; one value, or one per checkpoint")
    evl.add_argument("--scale-factor", default=None,
                     help="context-extension factor s (default: longest length / training length); one or per ckpt")
    evl.add_argument("--labels", default=None, help="comma-separated legend labels, one per checkpoint")
    evl.add_argument("--out", default="eval-length", help="output folder (default: ./eval-length)")
    evl.add_argument("--split", default="test", help="split of a prepared dataset (default: test)")
    evl.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    evl.add_argument("--max-tokens", type=int, default=None,
                     help="score about N tokens per length, the same leading text at every length (quick looks)")
    evl.add_argument("--bucket-size", type=int, default=None,
                     help="positions per loss bucket (default: longest length / 32)")
    evl.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    evl.add_argument("--precision", default="auto", help=PRECISION_HELP)
    evl.add_argument("--tokenizer", default=None, help="override the checkpoint's tokenizer (gpt2, nt-6mer, ...)")
    evl.add_argument("--tracking-uri", default=None,
                     help="MLflow store (default: the first checkpoint's training-run store, when found)")
    evl.add_argument("--experiment", default=None, help="MLflow experiment (default: the checkpoint's)")
    evl.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    evl.set_defaults(func=_eval_length)

    exp = sub.add_parser(
        "export-hf", help="export a checkpoint as a Hugging Face model folder",
        description="Write config.json, model.safetensors, the modeling code, generation config and tokenizer, "
                    "loadable offline with AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True).")
    exp.add_argument("checkpoint", metavar="CKPT", help="native pope-lm checkpoint (.ckpt)")
    exp.add_argument("out", metavar="OUT", help="output folder; must not exist or be empty")
    exp.add_argument("--tokenizer", default=None, help="override the checkpoint's tokenizer")
    exp.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (weights as saved)")
    exp.set_defaults(func=_export_hf)

    smp = sub.add_parser("sample", help="generate text from a checkpoint (KV-cache decoding)",
                         description="Continue a prompt with a native checkpoint; prints prompt + continuation.")
    smp.add_argument("checkpoint", metavar="CKPT", help="native pope-lm checkpoint (.ckpt)")
    smp.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    smp.add_argument("--max-new-tokens", type=int, default=100)
    smp.add_argument("--temperature", type=float, default=0.8)
    smp.add_argument("--top-k", type=int, default=200, help="sample among the k likeliest tokens (0: all)")
    smp.add_argument("--greedy", action="store_true", help="argmax decoding (ignores temperature and top-k)")
    smp.add_argument("--seed", type=int, default=1337)
    smp.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    smp.add_argument("--precision", default="auto", help=PRECISION_HELP)
    smp.add_argument("--tokenizer", default=None, help="override the checkpoint's tokenizer")
    smp.set_defaults(func=_sample)

    zs = sub.add_parser(
        "eval-zeroshot", help="lm-evaluation-harness tasks on an exported model (pip install 'pope-lm[eval]')",
        description="Run lm-evaluation-harness on a folder written by export-hf; prints a results table, writes "
                    "results.json and logs the metrics to MLflow when --tracking-uri is given.")
    zs.add_argument("model_dir", metavar="OUT", help="folder written by `pope-lm export-hf`")
    zs.add_argument("--tasks", default="lambada_openai,blimp,cbt,hellaswag,piqa,arc_easy",
                    help="comma-separated lm-eval tasks (default: the paper's six)")
    zs.add_argument("--include-path", default=None, help="folder of extra lm-eval task YAML files")
    zs.add_argument("--limit", type=float, default=None, help="examples per task (a fraction if < 1)")
    zs.add_argument("--batch-size", type=int, default=8)
    zs.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    zs.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16")
    zs.add_argument("--out", default=None, help="folder for results.json and results.md (default: OUT-zeroshot)")
    zs.add_argument("--tracking-uri", default=None, help="MLflow store to log the metrics to")
    zs.add_argument("--experiment", default="pope-lm-zeroshot", help="MLflow experiment")
    zs.set_defaults(func=_eval_zeroshot)


class _PrintVersions(argparse.Action):
    """`--version`: pope-lm's version and those of the libraries that decide its numbers and speed (bug reports)."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        def version(name: str) -> str:
            try:
                return importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                return "not installed"

        libraries = ", ".join(f"{name} {version(name)}" for name in ("torch", "triton", "lightning", "deepspeed"))
        print(f"pope-lm {version('pope-lm')} ({libraries})")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pope-lm", description="Pretrain decoder LMs with PoPE attention.")
    parser.add_argument("--version", action=_PrintVersions, help="print the versions of pope-lm and its core "
                        "libraries, and exit")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train or resume a run described by a recipe",
                           description="Train the run a YAML recipe describes; key=value pairs override it, "
                                       "e.g. trainer.max_steps=200 resume=auto.")
    train.add_argument("recipe", help="YAML recipe, e.g. recipes/tiny.yaml")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    train.set_defaults(func=_train)

    merge = sub.add_parser("consolidate", help="write a checkpoint's weights as one fp32 safetensors file",
                           description="Gather the weights of a checkpoint (a native .ckpt file, or the directory "
                                       "of ZeRO shards a DeepSpeed run writes) into one fp32 safetensors file, "
                                       "with the run's config in its metadata.")
    merge.add_argument("checkpoint", metavar="CKPT", help="e.g. runs/774m/checkpoints/step-00001000.ckpt")
    merge.add_argument("out", metavar="OUT", help="output file, e.g. model.safetensors")
    merge.set_defaults(func=_consolidate)
    _add_tool_parsers(sub)

    from pope_lm.data.cli import add_prepare_subcommands

    add_prepare_subcommands(sub)
    return parser


def _not_an_advert(record: logging.LogRecord) -> bool:
    """False for Lightning's tip, at the start of every Trainer, to install its cloud logger (litlogger)."""
    return not record.getMessage().startswith("💡 Tip:")


def _silence_library_noise() -> None:
    """Drop what libraries print on every run that the user can neither act on nor needs."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_not_an_advert)  # added once, however often
    # Lightning 2.6 calls a pytree API that torch deprecates (lightning/pytorch/utilities/_pytree.py; torch 2.11, 2.13)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # Lightning's advice to give the evaluation loaders more workers, on machines with many cores: they read their
    # few batches in order in the main process by design (TokenDataModule._eval_loader), whatever data.num_workers is
    warnings.filterwarnings("ignore", message=r"The '(val|test)_dataloader' does not have many workers")
    # Lightning's DeepSpeed strategy warns that an overridden configure_gradient_clipping will not clip: it is
    # overridden to do nothing on purpose, since pope-lm's DeepSpeed config clips (DeepSpeedLitGPT)
    warnings.filterwarnings("ignore", message="Since DeepSpeed handles gradient clipping internally")


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("POPE_LM_LOG_LEVEL", "INFO"), format="%(message)s")
    # Lightning's package logger prints through a handler of its own and still propagates to the root's: every
    # Lightning message would appear twice.
    logging.getLogger("lightning").propagate = False
    _silence_library_noise()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
