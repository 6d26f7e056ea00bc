"""docs/results.md in one command: every online-accuracy table, run and written from scratch.

    python -m bench.results --jobs 2                 # everything, full test splits (about 1 h on 2 cores)
    python -m bench.results --quick --out /tmp/r.md  # a small generated set, a few steps: the smoke test
    python -m bench.results --report-only            # rebuild the page from runs/results/full/*.json

What runs (one pretraining protocol for every model: 3 epochs, batch 32, lr 1e-3, seed 0,
except where a setting names its own):

- settings: ETTh1-S 48 -> 12 and ETTh1-M 60 -> 1 / 24 / 48 (FSNet/OneNet's table), ETTh1-S
  48 -> 12 under the seed's protocol (2 epochs, batch 8, lr 1e-4, every model's online lr 1e-3:
  table 1 as the seed and the FSNet bug-fix study ran it), and memcast's generated data with
  recurring regimes (``memcast make-data --regimes 3``);
- both feedback modes: delayed (a target is learned from once observed, the service's regime)
  and immediate (the literature's protocol, for published tables);
- method groups, each one ``trainer.evaluate.evaluate`` call (the code ``memcast evaluate``
  runs): the served default (naive, titans_none, titans_memory_only, combo_memory_only);
  memory_only without its output corrector and analog mix (``corrector_lr`` 0, ``analog_rows``
  0), and pure (no outcome step either: the seed's); with immediate feedback, the served default
  without its corrector's known-value term (``known_lr`` 0: what it learns, without the
  horizon values the protocol reveals before the next forecast); full_model and its combination (the models' own online defaults); ogd
  and fsnet as their papers run them (online lr 1e-3, no clipping, no anchor);
- River's SNARIMAX and Holt-Winters (``bench.accuracy.run_river``, settings picked on the
  validation split), once per setting: River learns value by value, so both feedback modes are
  the same run;
- last, memory_only on the first setting again, three times, each run alone: issue 10's cost line
  (steps/s of one stream) measured with nothing beside it, where the tables' steps/s are not.

Every job runs in its own process with one torch thread; ``--jobs N`` runs N at a time, each
evaluation as soon as the checkpoints it needs are pretrained (cached under ``<work>/models``,
so later runs reuse them). Each job writes one JSON file under ``<work>/<quick|full>/``; the
page is made from those files only, so ``--report-only`` rebuilds it and ``--resume`` skips
the jobs whose file exists.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import logging
import multiprocessing
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._common import ROOT, SHARED_ETTH1, machine_info, now_iso, write_json

PROTOCOL = {"epochs": 3, "batch_size": 32, "lr": 1e-3, "seed": 0}
QUICK_PROTOCOL = {"epochs": 1, "batch_size": 16, "lr": 1e-3, "seed": 0, "max_train_windows": 64}
SEED_PROTOCOL = (("epochs", 2), ("batch_size", 8), ("lr", 1e-4))  # table 1 of the seed and of FSNet's study
REFERENCE_ONLINE_LR = 1e-3
# the baselines as their papers run them: no gradient clipping, no pull toward the pretrained
# weights (memcast's full_model safety, which cost fsnet half its gain with immediate feedback)
REFERENCE_ONLINE = {
    "online_clip": 0.0,
    "online_anchor": 0.0,
}  # FSNet's and OGD's online learning rate in their papers
FEEDBACKS = ("delayed", "immediate")


@dataclass(frozen=True)
class Setting:
    """One data set and window: a row of the tables."""

    key: str
    title: str
    data: str  # a CSV path, or "regimes" for the generated data made under the work folder
    features: str
    seq_len: int
    pred_len: int
    target: str | None = None
    protocol: tuple[tuple[str, Any], ...] = ()  # pretraining settings that replace PROTOCOL's
    online_lr: float | None = None  # every model's online lr (a group's own wins)


@dataclass(frozen=True)
class Group:
    """Methods evaluated together (a combination needs its experts' forecasts in the same call)."""

    key: str
    methods: tuple[str, ...]
    online: dict[str, float] = field(default_factory=dict)  # online-only model settings
    online_lr: float | None = None  # overrides every model's online lr (the baselines' papers)
    rename: dict[str, str] = field(default_factory=dict)  # a method's row name in the tables
    cost: int = 1  # rough relative run time, to start the long jobs first
    feedbacks: tuple[str, ...] = FEEDBACKS  # where the group's rows differ


GROUPS = (
    Group("served", ("naive", "titans_none", "titans_memory_only", "combo_memory_only"), cost=3),
    Group("pure", ("titans_memory_only",), {"outcome_lr": 0.0, "corrector_lr": 0.0, "analog_rows": 0},
          rename={"titans_memory_only": "memory_only_pure"}),
    Group("no_corrector", ("titans_memory_only",), {"corrector_lr": 0.0, "analog_rows": 0},
          rename={"titans_memory_only": "memory_only_no_corrector"}),
    # the served default without the known-value term (``known_lr`` 0): with delayed feedback
    # no value is known in advance, so its rows equal the default's bit for bit (not run)
    Group("unknown", ("titans_memory_only", "combo_memory_only"), {"known_lr": 0.0},
          rename={"titans_memory_only": "memory_only_unknown", "combo_memory_only": "combo_memory_only_unknown"},
          cost=3, feedbacks=("immediate",)),
    Group("full", ("titans_full_model", "combo_full_model"), cost=10),
    Group("ogd", ("ogd",), REFERENCE_ONLINE, online_lr=REFERENCE_ONLINE_LR, cost=3),
    Group("fsnet", ("fsnet",), REFERENCE_ONLINE, online_lr=REFERENCE_ONLINE_LR, cost=6),
)  # fmt: skip
MODELS = ("titans_none", "ogd", "fsnet")  # one checkpoint each per setting (titans_* share theirs)
# issue 10's cost line (memory_only >= 500 steps/s on one stream) measured alone after every
# other job: the tables' steps/s run beside ``--jobs - 1`` other processes on a 2-core machine
SPEED = Group("speed", ("titans_memory_only",), feedbacks=("delayed",))
SPEED_ROUNDS = 3


def settings(etth1: Path | None, quick: bool) -> list[Setting]:
    regimes = Setting("regimes", "generated, 3 recurring regimes, 48 -> 12", "regimes", "M", 48, 12)
    if quick:
        return [Setting("regimes", "generated, 3 recurring regimes, 24 -> 4 (quick)", "regimes", "M", 24, 4)]
    found: list[Setting] = []
    if etth1 is not None:
        d = str(etth1)
        found.append(Setting("etth1_s12", "ETTh1-S 48 -> 12", d, "S", 48, 12, target="OT"))
        found += [Setting(f"etth1_m{h}", f"ETTh1-M 60 -> {h}", d, "M", 60, h) for h in (1, 24, 48)]
        found.append(
            Setting(
                "etth1_s12_seed", "ETTh1-S 48 -> 12, the seed's protocol", d, "S", 48, 12, target="OT",
                protocol=SEED_PROTOCOL, online_lr=REFERENCE_ONLINE_LR,
            )
        )  # fmt: skip
    return found + [regimes]


# ---------------------------------------------------------------------------------------------
# Jobs (each runs in a worker process)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    kind: str  # "pretrain", "evaluate", "river" or "speed" (an evaluation run alone)
    setting: Setting
    feedback: str = ""
    group: Group | None = None
    model: str = ""  # pretrain: the method whose checkpoint to make
    round: int = 0  # speed: which of the repeated runs

    @property
    def name(self) -> str:
        parts = [self.kind, self.setting.key, self.feedback, self.group.key if self.group else "", self.model]
        return "-".join(p for p in parts if p) + (f"-r{self.round}" if self.round else "")

    @property
    def cost(self) -> int:
        if self.kind == "river":
            return 4 + self.setting.pred_len // 12
        return self.group.cost if self.group else 1


@dataclass(frozen=True)
class Context:
    work: Path  # models, data and per-job JSON
    results: Path  # <work>/<quick|full>
    quick: bool
    max_steps: int | None
    device: str


def data_path(setting: Setting, ctx: Context) -> str:
    if setting.data != "regimes":
        return setting.data
    from trainer.synthetic import write_synthetic_csv

    rows = 1200 if ctx.quick else 4000
    path = ctx.work / "data" / f"regimes-{rows}.csv"
    if not path.is_file():  # made before the pool starts; deterministic for the seed
        write_synthetic_csv(path, rows=rows, channels=4, seed=0, regimes=3)
    return str(path)


def train_config(setting: Setting, ctx: Context, online: dict[str, float] | None = None) -> Any:
    from trainer.train_config import TrainConfig

    protocol = (QUICK_PROTOCOL if ctx.quick else PROTOCOL) | dict(setting.protocol)
    return TrainConfig.build(
        data=data_path(setting, ctx),
        features=setting.features,
        target=setting.target,
        seq_len=setting.seq_len,
        pred_len=setting.pred_len,
        progress=False,
        device=ctx.device,
        **protocol,
        **(online or {}),
    )


def run_job(job: Job, ctx: Context) -> dict[str, Any]:
    """Run one job in this (worker) process and return what its JSON file holds."""
    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, force=True)
    started = time.perf_counter()
    out: dict[str, Any] = {"job": job.name, "kind": job.kind, "setting": job.setting.key}
    if job.kind == "pretrain":
        from models.checkpoint import REPORT_FILE
        from models.online import UpdateMode
        from trainer.methods import checkpoint_for, parse_method

        spec = parse_method(job.model, UpdateMode.NONE, None)
        ckpt = checkpoint_for(spec, train_config(job.setting, ctx), ctx.work / "models", ctx.device)
        report = json.loads((ckpt.path / REPORT_FILE).read_text())
        out.update(
            checkpoint=str(ckpt.path),
            parameters=sum(p.numel() for p in ckpt.model.parameters()),
            pretraining_s=report.get("wall_time_s"),  # the run that made it (maybe an earlier, cached one)
            best_epoch=report.get("best_epoch"),
            best_val_loss=report.get("best_val_loss"),
        )
    elif job.kind == "river":
        from bench.accuracy import run_river
        from trainer.data import load_dataset

        s = job.setting
        data = load_dataset(data_path(s, ctx), s.features, s.target, s.seq_len, s.pred_len)
        out["rows"] = run_river(
            data, s.seq_len, s.pred_len, ctx.max_steps, ctx.quick, 150 if ctx.quick else 400
        )
    else:
        from trainer.evaluate import EvalConfig, evaluate

        assert job.group is not None
        group = job.group
        report = evaluate(
            EvalConfig(
                train=train_config(job.setting, ctx, group.online),
                methods=group.methods,
                feedback=job.feedback,
                online_lr=group.online_lr if group.online_lr is not None else job.setting.online_lr,
                max_steps=ctx.max_steps,
                out=str(ctx.results / "eval" / job.name),
                runs_dir=str(ctx.work / "models"),
                plots=False,
            )
        )
        out["feedback"] = job.feedback
        out["group"] = group.key
        out["round"] = job.round
        out["test_steps"] = report["data"]["test_steps"]
        out["methods"] = {group.rename.get(k, k): v for k, v in report["methods"].items()}
    out["wall_s"] = time.perf_counter() - started
    return out


# ---------------------------------------------------------------------------------------------
# Scheduling
# ---------------------------------------------------------------------------------------------
def plan(found: list[Setting]) -> tuple[list[Job], list[Job], list[Job]]:
    """(pretraining and River jobs, evaluation jobs, speed jobs), the first two longest first.
    The speed jobs time memory_only on the first setting (ETTh1-S 48 -> 12 where it is found),
    one at a time with nothing beside them."""
    first = [Job("pretrain", s, model=m) for s in found for m in MODELS]
    first += [Job("river", s) for s in found]
    evals = [Job("evaluate", s, f, g) for s in found for f in FEEDBACKS for g in GROUPS if f in g.feedbacks]
    speed = [Job("speed", found[0], "delayed", SPEED, round=r) for r in range(1, SPEED_ROUNDS + 1)]
    key = lambda j: -j.cost  # noqa: E731
    return sorted(first, key=key), sorted(evals, key=key), speed


def run_all(found: list[Setting], ctx: Context, jobs: int, resume: bool) -> None:
    """Run every job, ``jobs`` processes at a time; an evaluation starts once its setting's
    checkpoints exist (two jobs never pretrain the same model at once)."""
    for s in found:
        data_path(s, ctx)
    first, evals, speed = plan(found)
    done = {j.name for j in first + evals + speed if resume and kept(j, ctx)}
    ready = {s.key for s in found if all(f"pretrain-{s.key}-{m}" in done for m in MODELS)}
    pending_pretrain = {s.key: {f"pretrain-{s.key}-{m}" for m in MODELS} - done for s in found}
    queue = [j for j in first if j.name not in done]
    waiting = [j for j in evals if j.name not in done]
    alone = [j for j in speed if j.name not in done]
    total, finished, failures = len(queue) + len(waiting) + len(alone), 0, []
    started = time.perf_counter()
    context = multiprocessing.get_context("spawn")  # torch in forked children is not safe
    with futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        running: dict[futures.Future[dict[str, Any]], Job] = {}

        def fill() -> None:
            nonlocal queue, waiting
            queue += [j for j in waiting if j.setting.key in ready]
            waiting = [j for j in waiting if j.setting.key not in ready]
            queue.sort(key=lambda j: -j.cost)
            while queue and len(running) < jobs:
                job = queue.pop(0)
                running[pool.submit(run_job, job, ctx)] = job

        fill()
        while running:
            complete, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
            for future in complete:
                job = running.pop(future)
                finished += 1
                elapsed = time.perf_counter() - started
                try:
                    write_json(job_file(job, ctx), future.result())
                except Exception as exc:  # noqa: BLE001  # any job's error: reported, the others go on, exit 1 at the end
                    failures.append(f"{job.name}: {exc!r}")
                    print(f"[{finished}/{total} {elapsed:5.0f} s] FAILED {job.name}: {exc!r}", flush=True)
                    continue
                print(f"[{finished}/{total} {elapsed:5.0f} s] {job.name}", flush=True)
                if job.kind == "pretrain":
                    pending_pretrain[job.setting.key].discard(job.name)
                    if not pending_pretrain[job.setting.key]:
                        ready.add(job.setting.key)
            fill()
        if not waiting:  # the pool is empty now: each speed job runs alone
            for job in alone:
                finished += 1
                try:
                    write_json(job_file(job, ctx), pool.submit(run_job, job, ctx).result())
                except Exception as exc:  # noqa: BLE001  # as above
                    failures.append(f"{job.name}: {exc!r}")
                    print(f"[{finished}/{total}] FAILED {job.name}: {exc!r}", flush=True)
                    continue
                print(
                    f"[{finished}/{total} {time.perf_counter() - started:5.0f} s] {job.name} (alone)",
                    flush=True,
                )
    if failures or waiting:
        raise SystemExit(
            "results: jobs failed or never ran:\n  " + "\n  ".join(failures + [j.name for j in waiting])
        )


def kept(job: Job, ctx: Context) -> bool:
    """A job ``--resume`` skips: its result file exists and, for a pretraining, its checkpoint
    too (else two evaluations would pretrain the same model at once)."""
    path = job_file(job, ctx)
    if not path.is_file():
        return False
    return job.kind != "pretrain" or Path(json.loads(path.read_text())["checkpoint"]).is_dir()


def job_file(job: Job, ctx: Context) -> Path:
    return ctx.results / "jobs" / f"{job.name}.json"


def load_jobs(results: Path) -> list[dict[str, Any]]:
    files = sorted((results / "jobs").glob("*.json"))
    if not files:
        raise SystemExit(f"no job results under {results / 'jobs'}: run without --report-only first")
    return [json.loads(f.read_text()) for f in files]


# ---------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=2, help="processes at a time (one torch thread each)")
    p.add_argument("--quick", action="store_true", help="generated data only, 1 epoch, a few steps")
    p.add_argument("--etth1", type=Path, default=SHARED_ETTH1, help="ETTh1.csv (skipped when missing)")
    p.add_argument("--max-steps", type=int, help="cap the online steps (default: the whole test split)")
    p.add_argument("--device", default="cpu", help="torch device of the models (cpu, cuda, ...)")
    p.add_argument("--work", type=Path, default=Path("runs/results"), help="models, data and job results")
    p.add_argument("--out", type=Path, default=Path("docs/results.md"))
    p.add_argument("--resume", action="store_true", help="skip the jobs whose result file exists")
    p.add_argument("--report-only", action="store_true", help="rebuild the page from the job results")
    p.add_argument("--commit", help="the commit to stamp the page with (default: git's HEAD here)")
    return p


def main(argv: list[str] | None = None) -> int:
    from bench._results_report import write_report

    args = parser().parse_args(argv)
    work = args.work if args.work.is_absolute() else (ROOT / args.work)
    mode = "quick" if args.quick else "full"
    max_steps = args.max_steps if args.max_steps is not None else (40 if args.quick else None)
    ctx = Context(work.resolve(), (work / mode).resolve(), args.quick, max_steps, args.device)
    etth1 = args.etth1 if args.etth1 and args.etth1.is_file() else None
    if etth1 is None and not args.quick:
        print(f"results: {args.etth1} not found; only the generated data set is run", flush=True)
    found = settings(etth1, args.quick)
    started = time.perf_counter()
    meta_file = ctx.results / "run.json"
    if not args.report_only:
        run_all(found, ctx, args.jobs, args.resume)
        me = "python -m bench.results " + " ".join(argv if argv is not None else sys.argv[1:])
        machine = machine_info()
        if args.commit:
            machine["commit"] = args.commit
        meta = {
            "date": now_iso(),
            "machine": machine,
            "command": me.strip(),
            "wall_s": time.perf_counter() - started,
            "jobs": args.jobs,
            "protocol": QUICK_PROTOCOL if args.quick else PROTOCOL,
            "reference_online_lr": REFERENCE_ONLINE_LR,
            "max_steps": max_steps,
            "settings": [s.__dict__ for s in found],
        }
        if args.resume and meta_file.is_file():  # the jobs kept from earlier runs: say which
            earlier = json.loads(meta_file.read_text())
            meta["earlier"] = [
                *earlier.get("earlier", []),
                {k: earlier[k] for k in ("date", "command", "wall_s")},
            ]
            meta["earlier"][-1]["commit"] = earlier["machine"]["commit"]
        write_json(meta_file, meta)
    if not meta_file.is_file():
        raise SystemExit(f"{meta_file} is missing: run without --report-only first")
    out = args.out if args.out.is_absolute() else ROOT / args.out
    write_report(json.loads(meta_file.read_text()), load_jobs(ctx.results), out)
    print(f"results: wrote {out} in {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
