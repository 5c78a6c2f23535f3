"""Scale-out benchmark (issue 5): one recipe under DDP and DeepSpeed ZeRO-1/2/3 on one and two GPUs.

Each run spec is STRATEGY:GPUS or STRATEGY:GPUS:resume, with STRATEGY one of ddp, zero1, zero2, zero3. A run
trains the recipe through `pope_lm.train.train` under torchrun (one process per GPU) for --steps optimizer steps
and records, through a callback:

- the loss of every optimizer step, averaged over all ranks and micro-batches (no host sync per step);
- tokens/s over the steps after --warmup, between two device synchronisations (checkpoint saves excluded);
- the peak memory PyTorch allocated and reserved on each GPU.

A `:resume` run stops at half the steps (with the same max_steps, so the same schedule), saves its checkpoint,
and a second launch continues it with resume=auto: its curve should continue the uninterrupted run's.

    python benchmarks/scaleout.py run --recipe recipes/124m.yaml --steps 50 --out OUT \\
        --runs ddp:1 ddp:2 zero1:2 zero2:1 zero2:2 zero3:2 zero3:2:resume -- data.dataset=.gpu/shakespeare
    python benchmarks/scaleout.py report OUT/*.json > benchmarks/results/scaleout_124m_h100.md

`run` writes OUT/<recipe>-<spec>.json per run; `report` turns such files into a Markdown table with the scaling
efficiency (tokens/s on N GPUs / N x tokens/s of the same strategy on 1 GPU; `ddp:1`, `zero1:1` and `zero2:1` train
with the single-device strategy, as `pope-lm train` runs them on one process, so theirs is against what one GPU
gets), the peak memory per GPU and the largest loss difference
against DDP on as many GPUs, against the same strategy on one GPU (the same global batch), and, for a resumed run,
against its uninterrupted twin.
docs/scaling.md says how to run it through the device tool.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

STRATEGIES = {
    "ddp": ["trainer.strategy=ddp"],
    **{f"zero{stage}": ["trainer.strategy=deepspeed", f"trainer.zero_stage={stage}"] for stage in (1, 2, 3)},
}
GIB = 2**30


class Probe(L.Callback):
    """Measures a run from inside it; rank 0 ends up with `result`."""

    def __init__(self, warmup: int, stop_at: int | None) -> None:
        self.warmup = warmup
        self.stop_at = stop_at
        self.result: dict[str, Any] | None = None
        self._micro: list[torch.Tensor] = []
        self._losses: list[torch.Tensor] = []
        self._start = self._last = 0
        self._timed: tuple[int, float] | None = None
        self._elapsed: tuple[int, float] | None = None
        self._memory = [0.0, 0.0]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self._last = trainer.global_step
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any) -> None:
        self._micro.append(outputs["loss"].detach())  # already divided by the accumulation: they sum to the mean
        step = trainer.global_step
        if step == self._last:
            return  # between micro-batches of one optimizer step
        self._last = step
        self._losses.append(torch.stack(self._micro).sum())
        self._micro = []
        if step - self._start == self.warmup:
            self._timed = (step, _synchronized_clock())
        if step == min(trainer.max_steps, self.stop_at or trainer.max_steps):
            # The last step: time and memory now, before on_train_end writes the final checkpoint.
            if self._timed is not None:
                self._elapsed = (step - self._timed[0], _synchronized_clock() - self._timed[1])
            if torch.cuda.is_available():
                self._memory = [torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()]
            trainer.should_stop = True  # at stop_at; at max_steps Lightning stops anyway

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        losses = trainer.strategy.reduce(torch.stack(self._losses), reduce_op="mean")  # collectives: every rank
        memory = torch.tensor(self._memory, device=pl_module.device, dtype=torch.float64)
        memory = trainer.strategy.all_gather(memory).reshape(-1, 2).tolist()
        if not trainer.is_global_zero:
            return
        cfg = pl_module.cfg  # type: ignore[attr-defined]
        tokens_per_step = cfg.trainer.global_batch_size * cfg.data.seq_len
        steps, seconds = self._elapsed or (0, float("nan"))
        self.result = {
            "first_step": self._start + 1,
            "losses": losses.tolist(),
            "tokens_per_s": steps * tokens_per_step / seconds if steps else None,
            "timed_steps": steps,
            "peak_allocated_gib": [round(m[0] / GIB, 3) for m in memory],
            "peak_reserved_gib": [round(m[1] / GIB, 3) for m in memory],
        }


def _synchronized_clock() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def worker(args: argparse.Namespace) -> None:
    """One rank (under torchrun): train with the probe; rank 0 writes the measurements."""
    from pope_lm.config import load_config
    from pope_lm.train import train

    cfg = load_config(args.recipe, args.overrides)
    probe = Probe(args.warmup, args.stop_at)
    train(cfg, extra_callbacks=[probe])
    if probe.result is not None:
        t = cfg.trainer
        probe.result.update(
            recipe=Path(args.recipe).stem, strategy=t.strategy, zero_stage=t.zero_stage if t.strategy == "deepspeed"
            else None, gpus=t.devices * t.num_nodes, stop_at=args.stop_at, micro_batch_size=t.micro_batch_size,
            global_batch_size=t.global_batch_size, seq_len=cfg.data.seq_len, precision=t.precision,
            device=torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
            versions=_versions(), date=datetime.date.today().isoformat(),
        )
        Path(args.result).write_text(json.dumps(probe.result, indent=1) + "\n")


def _versions() -> dict[str, str | None]:
    import deepspeed

    return {"torch": torch.__version__, "cuda": torch.version.cuda, "lightning": L.__version__,
            "deepspeed": deepspeed.__version__, "python": platform.python_version()}


def run(args: argparse.Namespace) -> None:
    """Launch each run spec with torchrun and write OUT/<recipe>-<spec>.json."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_dir = Path(args.runs_dir or out / "runs")
    recipe = Path(args.recipe).stem
    failed: list[str] = []
    for spec in args.runs:
        strategy, gpus, *resume = spec.split(":")
        if strategy not in STRATEGIES or not gpus.isdigit() or resume not in ([], ["resume"]):
            raise SystemExit(f"error: run spec '{spec}' is not STRATEGY:GPUS[:resume] with STRATEGY one of "
                             f"{', '.join(STRATEGIES)}")
        label = f"{recipe}-{spec.replace(':', '-')}"
        # Uncompiled under every strategy (pope-lm compiles on GPU by default, except ZeRO-3 runs), so that
        # strategies compare like for like, and with the committed results.
        overrides = [*STRATEGIES[strategy], f"trainer.devices={gpus}", f"trainer.max_steps={args.steps}",
                     f"run_dir={runs_dir / label}", "tracking.enabled=false", "trainer.compile=false", *args.overrides]
        parts = [[None]] if not resume else [[args.steps // 2], [None, "resume=auto"]]
        results = []
        for stop_at, *extra in parts:
            part = out / f"{label}.part{len(results)}.json"
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
                       __file__, "worker", str(part), args.recipe, *overrides, *extra, f"--warmup={args.warmup}"]
            if stop_at is not None:
                command.append(f"--stop-at={stop_at}")
            print("+", " ".join(command), flush=True)
            if subprocess.run(command).returncode != 0:
                break
            results.append(json.loads(part.read_text()))
            part.unlink()
        if len(results) != len(parts):
            print(f"run {spec} failed; going on with the next", flush=True)
            failed.append(spec)
            continue
        result = results[-1]
        if resume:  # one curve: the first launch up to the checkpoint, then the resumed one
            result["resumed_at"] = results[0]["first_step"] + len(results[0]["losses"]) - 1
            result["losses"] = results[0]["losses"] + result["losses"]
            result["first_step"] = results[0]["first_step"]
        result["spec"] = spec
        (out / f"{label}.json").write_text(json.dumps(result, indent=1) + "\n")
    if failed:
        raise SystemExit(f"error: failed runs: {', '.join(failed)}")


def report(args: argparse.Namespace) -> None:
    """Print the Markdown table of a set of result files."""
    results = {}
    for path in args.results:
        record = json.loads(Path(path).read_text())
        if "spec" not in record:  # a launch's own file, which `run` labels and renames once the launch has exited
            if record.get("stop_at", 0) is not None or record["first_step"] != 1:  # cut short, or a resumed half
                print(f"(skipped {path}: the run did not finish)", file=sys.stderr)
                continue
            # A whole run whose worker wrote its result before the launcher was stopped (a session's deadline).
            strategy = "ddp" if record["strategy"] == "ddp" else f"zero{record['zero_stage']}"
            record["spec"] = f"{strategy}:{record['gpus']}"
            print(f"(read {path} as {record['spec']}: it finished, its launcher was stopped after)", file=sys.stderr)
        results[record["spec"]] = record
    if not results:
        raise SystemExit("error: no finished run among the result files")
    first = next(iter(results.values()))
    print(f"# Scale-out: {first['recipe']} on {first['device']} ({first['date']})\n")
    print(f"versions: {', '.join(f'{k} {v}' for k, v in first['versions'].items())}; micro-batch "
          f"{first['micro_batch_size']}, global batch {first['global_batch_size']} x {first['seq_len']} tokens; "
          f"loss = mean over ranks and micro-batches per optimizer step\n")
    print("| run | tokens/s | per GPU | scaling efficiency | peak allocated GiB (per GPU) | peak reserved GiB | "
          "max abs loss diff vs DDP | max abs loss diff vs 1 GPU | final loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for spec, r in results.items():
        strategy, gpus = spec.split(":")[:2]
        n, tps, single = int(gpus), r["tokens_per_s"] or 0.0, results.get(f"{strategy}:1")
        # tokens/s on n GPUs over n x the same strategy's on one GPU
        efficiency = f"{tps / (n * single['tokens_per_s']):.1%}" if n > 1 and single else ""
        print(f"| {spec} | {tps:,.0f} | {tps / n:,.0f} | {efficiency} | {max(r['peak_allocated_gib'])} | "
              f"{max(r['peak_reserved_gib'])} | {_max_diff(r, results.get(f'ddp:{gpus}'))} | "
              f"{_max_diff(r, single)} | {r['losses'][-1]:.4f} |")
    for spec, r in results.items():
        if "resumed_at" in r:
            twin = results.get(spec.removesuffix(":resume"))
            print(f"\n{spec}: resumed after step {r['resumed_at']}; max abs loss diff against the uninterrupted run "
                  f"after it: {_max_diff(r, twin, after=r['resumed_at'])}")


def _max_diff(run: dict[str, Any], reference: dict[str, Any] | None, after: int = 0) -> str:
    if reference is None or reference is run:
        return ""
    ours = dict(enumerate(run["losses"], start=run["first_step"]))
    theirs = dict(enumerate(reference["losses"], start=reference["first_step"]))
    diffs = [abs(ours[s] - theirs[s]) for s in ours.keys() & theirs.keys() if s > after]
    return f"{max(diffs):.2e}" if diffs else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    go = sub.add_parser("run", help="launch the runs")
    go.add_argument("--recipe", required=True)
    go.add_argument("--runs", nargs="+", required=True, metavar="STRATEGY:GPUS[:resume]")
    go.add_argument("--steps", type=int, default=50)
    go.add_argument("--warmup", type=int, default=10, help="optimizer steps before timing starts")
    go.add_argument("--out", required=True, help="folder for the result files")
    go.add_argument("--runs-dir", help="folder for the runs' checkpoints (default: OUT/runs)")
    go.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides for every run (after --)")
    go.set_defaults(func=run)
    rank = sub.add_parser("worker", help="internal: one torchrun rank")
    rank.add_argument("result")
    rank.add_argument("recipe")
    rank.add_argument("overrides", nargs="*")
    rank.add_argument("--warmup", type=int, required=True)
    rank.add_argument("--stop-at", type=int)
    rank.set_defaults(func=worker)
    table = sub.add_parser("report", help="Markdown table of result files")
    table.add_argument("results", nargs="+")
    table.set_defaults(func=report)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
