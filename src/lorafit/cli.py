"""The `lorafit` command line: every command's flags and handler. User errors print one line and exit non-zero;
bugs keep their traceback.

Handlers import what they need when they run, so `lorafit --help` and a mistyped flag answer without loading torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import LorafitError

PRECISIONS = ["auto", "fp32", "bf16", "fp16"]
RUN_HELP = "run folder written by `lorafit train`"


class Parser(argparse.ArgumentParser):
    """argparse, but usage mistakes are one line like every other user error."""

    def error(self, message):
        self.exit(2, f"lorafit: error: {message} (see `{self.prog} --help`)\n")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-c",
        "--config",
        type=Path,
        help="YAML config file (default: the embedded default, builtin:minilm on builtin:ag_news_sample)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, value parsed as YAML (repeatable), e.g. --set lora.r=8 --set lora.target_modules=[query,value]",
    )


def parse_ints(raw: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in raw.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise LorafitError(f"{flag} {raw!r}: expected positive integers separated by commas, e.g. {flag} 2,4,8")
    return values


# ---------------------------------------------------------------------------------------------------------------------
# train, budget, keys


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train a run from a config (default: the embedded MiniLM on the AG News sample)")
    _config_args(p)
    p.add_argument("-o", "--output", type=Path, help="run folder (default: a new folder under runs/)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument(
        "--resume",
        type=Path,
        metavar="RUN",
        help="continue an interrupted run from its newest checkpoint "
        "(--set may change only train.lr, train.precision, speed.num_threads, eval.batch_size, checkpoint.*)",
    )
    p.set_defaults(fn=cmd_train)


def cmd_train(a) -> int:
    from .config import load_config
    from .runs import check_output, default_run_dir, resume_config
    from .training.recipe import run

    if a.resume:
        given = [flag for flag, value in (("-c", a.config), ("-o", a.output), ("--overwrite", a.overwrite)) if value]
        if given:
            raise LorafitError(
                f"--resume continues a run with its own config.yaml in its own folder; drop {', '.join(given)}"
            )
        run(resume_config(a.resume, a.overrides), a.resume, resume=True)
        return 0
    cfg = load_config(a.config, a.overrides)
    out = a.output or default_run_dir(cfg)
    check_output(out, a.overwrite)
    run(cfg, out)
    return 0


def add_budget(sub) -> None:
    p = sub.add_parser(
        "budget", help="count trainable parameters by part without loading weights; exit 3 when over budget"
    )
    _config_args(p)
    p.add_argument("--json", type=Path, help="also write the breakdown as JSON")
    p.set_defaults(fn=cmd_budget)


def cmd_budget(a) -> int:
    import json

    from . import budget
    from .atomic import atomic_write_text
    from .config import load_config
    from .data import num_labels

    cfg = load_config(a.config, a.overrides)
    b = budget.compute(cfg, num_labels(cfg))
    print(b.table())
    if a.json:
        atomic_write_text(a.json, json.dumps(b.to_dict(), indent=1))
    budget.check(b)
    return 0


def add_keys(sub) -> None:
    p = sub.add_parser("keys", help="list every config key with its default and meaning")
    p.add_argument(
        "--markdown",
        action="store_true",
        help="print the reference as a Markdown table (the README's config reference)",
    )
    p.set_defaults(fn=cmd_keys)


def cmd_keys(a) -> int:
    import yaml

    from .config import all_keys, reference_markdown

    if a.markdown:
        print(reference_markdown(), end="")
        return 0
    for key, default, doc in all_keys():
        value = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
        print(f"{key} = {value}\n    {doc}")
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# Using a run: eval, predict, report, compare, export


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a saved run on a labelled file")
    p.add_argument("run", type=Path, help=RUN_HELP)
    p.add_argument("--data", required=True, help="labelled .csv/.parquet/.jsonl file (or builtin:ag_news_sample_test)")
    p.add_argument("--json", type=Path, help="write the metrics as JSON")
    p.add_argument("--precision", choices=PRECISIONS, help="override the run's precision")
    p.set_defaults(fn=cmd_eval)


def cmd_eval(a) -> int:
    from .inference.evaluate import main as evaluate_main

    evaluate_main(a.run, a.data, a.json, a.precision)
    return 0


def add_predict(sub) -> None:
    p = sub.add_parser("predict", help="label a file with a trained run (ids kept, input order kept)")
    p.add_argument("run", type=Path, help=RUN_HELP)
    p.add_argument(
        "--input",
        required=True,
        help="a .csv/.tsv/.parquet/.jsonl file, a pickled DataFrame or datasets.Dataset "
        "(.pkl; unpickling runs code, use trusted files), or - for JSON lines on stdin",
    )
    p.add_argument("--output", required=True, help="a .csv/.tsv/.parquet/.jsonl file, or - for JSON lines on stdout")
    p.add_argument(
        "--id-column", help="input column carried over as the id (default: ID when present, else the row number from 0)"
    )
    p.add_argument("--label-column", default="label", help="name of the predicted-label column (default: label)")
    p.add_argument(
        "--labels", choices=["names", "ids"], default="names", help="write class names (default) or class ids"
    )
    p.add_argument("--proba", action="store_true", help="add one probability column per class (proba_NAME)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--precision", choices=PRECISIONS, help="override the run's precision")
    p.set_defaults(fn=cmd_predict)


def cmd_predict(a) -> int:
    from .inference.predict import main as predict_main

    predict_main(a.run, a.input, a.output, a.id_column, a.label_column, a.labels, a.proba, a.overwrite, a.precision)
    return 0


def add_blend(sub) -> None:
    p = sub.add_parser(
        "blend",
        help="blend a finished run's adapter with a TF-IDF model (as eval.blend does), kept when more accurate on validation",
    )
    p.add_argument("run", type=Path, help=RUN_HELP)
    p.add_argument("--precision", choices=PRECISIONS, help="override the run's precision")
    p.set_defaults(fn=cmd_blend)


def cmd_blend(a) -> int:
    from . import blend
    from .training.blend_run import blend_run

    figures = blend_run(a.run, a.precision)
    print(blend.summary({"blend": figures}))
    return 0


def add_report(sub) -> None:
    p = sub.add_parser("report", help="rebuild a run's report.html and its PNGs")
    p.add_argument("run", type=Path, help=RUN_HELP)
    p.set_defaults(fn=cmd_report)


def cmd_report(a) -> int:
    from .report.run_report import write_report

    print(f"wrote {write_report(a.run)}")
    return 0


def add_compare(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="compare runs: differing config keys and results (Markdown, CSV) and a validation-loss overlay (HTML, PNG)",
    )
    p.add_argument(
        "runs", type=Path, nargs="+", metavar="RUN", help="run folders, or sweep folders whose subfolders are runs"
    )
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="folder for comparison.md/.csv/.html and val_loss.png (files there are replaced)",
    )
    p.set_defaults(fn=cmd_compare)


def cmd_compare(a) -> int:
    from .report.compare import compare

    table, notes = compare(a.runs, a.output)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(table, end="")
    print(f"wrote comparison.md, comparison.csv, comparison.html and val_loss.png to {a.output}")
    return 0


def add_export(sub) -> None:
    p = sub.add_parser("export", help="merge the adapter into the base model and save a plain transformers model")
    p.add_argument("run", type=Path, help=RUN_HELP)
    p.add_argument(
        "--merged",
        type=Path,
        required=True,
        metavar="DIR",
        help="folder for the merged model and tokenizer (loadable without peft)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    p.set_defaults(fn=cmd_export)


def cmd_export(a) -> int:
    from .inference.export import export_merged

    info = export_merged(a.run, a.merged, a.overwrite)
    print(
        f"exported the merged {info['model_type']} model and tokenizer to {a.merged} "
        f"(max abs logit difference to the run: {info['max_abs_logit_diff']:.1e}, fp32); "
        f"load it with AutoModelForSequenceClassification.from_pretrained({str(a.merged)!r})"
    )
    if info["preprocess"]:
        print(
            f"note: the run preprocesses texts ({', '.join(info['preprocess'])}); apply the same steps before calling the exported model"
        )
    if info["blend_left_out"]:
        print(
            "note: the run blends its adapter with a TF-IDF model (blend/), which a transformers model cannot hold: "
            "the export is the adapter alone, and its predictions are the adapter's, not the run's blend"
        )
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# Many runs: plan, sweep, bench


def add_plan(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="list the adapter layouts (targets, rank, DoRA, head, layers) that fit the budget, without loading weights",
    )
    _config_args(p)
    p.add_argument(
        "--budget",
        type=int,
        metavar="N",
        help="trainable-parameter budget (default: the config's budget.max_trainable)",
    )
    p.add_argument("--ranks", default="2,4,8,16", metavar="R,R,...", help="ranks to try (default: 2,4,8,16)")
    p.add_argument(
        "--methods",
        default="lora",
        metavar="M,M,...",
        help="PEFT methods to cross, each with its own size setting (default: lora; all: every method)",
    )
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="FILE",
        help="write the fitting layouts as a sweep file for `lorafit sweep --plan FILE`",
    )
    p.set_defaults(fn=cmd_plan)


def parse_methods(text: str) -> tuple[str, ...]:
    from .config import METHODS

    names = METHODS if text.strip() == "all" else tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise LorafitError(
            f"--methods {text!r}: unknown method(s) {unknown}; expected a comma-separated list of {', '.join(METHODS)}, or all"
        )
    return names


def cmd_plan(a) -> int:
    from .config import load_config
    from .experiments.plan import make_plan, table, write

    cfg = load_config(a.config, a.overrides)
    plan = make_plan(cfg, a.budget, parse_ints(a.ranks, "--ranks"), methods=parse_methods(a.methods))
    print(table(plan))
    if not plan.fits:
        raise LorafitError(
            f"none of the {plan.counted} configurations fits the budget of {plan.max_trainable:,}; "
            "raise --budget or budget.max_trainable, or try lower --ranks"
        )
    if a.output:
        write(plan, a.output, a.config)
        print(
            f"wrote {len(plan.fits)} points to {a.output}; train them with: lorafit sweep {f'-c {a.config} ' if a.config else ''}--plan {a.output} -o sweeps/NAME"
        )
    return 0


def add_sweep(sub) -> None:
    p = sub.add_parser(
        "sweep", help="train a grid, a plan or an Optuna search of configs into one sweep folder; re-running resumes"
    )
    _config_args(p)
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        metavar="DIR",
        help="sweep folder (e.g. sweeps/NAME): one run folder per point and seed, results.csv, results.md",
    )
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="values of one key, parsed as YAML (repeatable: the grid is the product), e.g. --grid lora.r=2,4,8",
    )
    p.add_argument(
        "--grid-file",
        type=Path,
        metavar="FILE",
        help="a sweep file: 'grid: {key: [values]}' and/or 'points: [{key: value}]'",
    )
    p.add_argument(
        "--plan",
        type=Path,
        metavar="FILE",
        help="the points written by `lorafit plan -o FILE` (combined with any --grid)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="list the points, their budgets and what is finished; train nothing"
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        metavar="N",
        help="train each point with seeds train.seed .. train.seed+N-1; tables show mean ± std",
    )
    p.add_argument(
        "--metric",
        choices=["val_loss", "val_accuracy", "val_macro_f1"],
        help="sort (and search) by this validation metric (default: eval.early_stopping.metric)",
    )
    p.add_argument(
        "--search",
        choices=["optuna"],
        help="search instead of a grid: Optuna TPE with pruning on the intermediate validation metric",
    )
    p.add_argument("--trials", type=int, metavar="N", help="search: trials in total, across every worker of the study")
    p.add_argument(
        "--space", type=Path, metavar="FILE", help="search: YAML of key -> [choices] or {low, high, log, step}"
    )
    p.add_argument(
        "--storage",
        metavar="URL",
        help="search: an Optuna storage URL shared by several workers "
        "(e.g. postgresql://user:pw@host/db); default: SQLite in the sweep folder",
    )
    p.add_argument(
        "--study",
        metavar="NAME",
        help="search: the study name (required with --storage; default: the sweep folder's name)",
    )
    p.add_argument(
        "--pruner",
        choices=["median", "none"],
        default="median",
        help="search: prune trials whose intermediate metric is worse than the median of earlier trials at the same step (default) or never",
    )
    p.set_defaults(fn=cmd_sweep)


def _check_sweep_flags(a) -> None:
    grid_mode = bool(a.grid or a.grid_file or a.plan)
    if a.search and grid_mode:
        raise LorafitError(
            "--search explores a --space; it does not combine with --grid, --grid-file or --plan (run those as a separate sweep)"
        )
    if not a.search and not grid_mode:
        raise LorafitError(
            "nothing to sweep: give --grid KEY=V1,V2 (repeatable), --grid-file FILE, --plan FILE, or --search optuna --trials N --space FILE"
        )
    search_flags = [
        f
        for f, v in (("--trials", a.trials), ("--space", a.space), ("--storage", a.storage), ("--study", a.study))
        if v is not None
    ]
    if a.search and a.dry_run:
        raise LorafitError("--dry-run lists the points of a grid or plan; a search has no points before it runs")
    if not a.search and search_flags:
        raise LorafitError(f"{', '.join(search_flags)} only apply with --search optuna")
    if a.seeds < 1:
        raise LorafitError(f"--seeds {a.seeds}: expected 1 or more")
    if a.search:
        if a.trials is None or a.trials < 1 or a.space is None:
            raise LorafitError(
                "--search optuna needs --trials N (N >= 1) and --space FILE (key -> [choices] or {low, high, log})"
            )
        if a.storage and not a.study:
            raise LorafitError("--storage needs --study NAME, so that every worker joins the same study")


def _grid_points(a) -> list[dict]:
    """The points of --grid-file, --plan and --grid, combined."""
    from .experiments.points import check_keys, expand, parse_grid_arg, read_points_file

    grid: dict[str, list] = {}
    points: list[dict] = []
    for path in [p for p in (a.grid_file, a.plan) if p]:
        g, pts = read_points_file(path)
        if path == a.plan and not pts:
            raise LorafitError(f"--plan {path}: no 'points:' in it; expected a file written by `lorafit plan -o FILE`")
        grid |= g
        points += pts
    for item in a.grid:
        key, values = parse_grid_arg(item)
        grid[key] = values
    check_keys(list(grid) + [k for p in points for k in p], "sweep")
    return expand(points, grid)


def cmd_sweep(a) -> int:
    from .config import load_config

    _check_sweep_flags(a)
    cfg = load_config(a.config, a.overrides)
    metric = a.metric or cfg.eval.early_stopping.metric
    if a.search:
        from .experiments.search import run_search

        run_search(cfg, a.output, a.space, a.trials, metric, a.seeds, a.storage, a.study, a.pruner)
    else:
        from .experiments.grid import run_grid

        run_grid(cfg, _grid_points(a), a.output, a.seeds, metric, a.dry_run)
    return 0


def add_fit(sub) -> None:
    p = sub.add_parser(
        "fit",
        help="spend a time budget on short trials of candidate recipes, then train the best (by validation) to the deadline",
    )
    _config_args(p)
    p.add_argument("--minutes", type=float, required=True, metavar="M", help="the time budget, in minutes")
    p.add_argument(
        "--budget",
        type=int,
        metavar="N",
        help="trainable-parameter budget (default: the config's budget.max_trainable)",
    )
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="fit folder (a sweep folder: trial runs, final/, results.md); re-running the same command resumes it",
    )
    p.add_argument(
        "--no-blend",
        action="store_true",
        help="keep the final run's adapter alone (by default it is blended with a TF-IDF model where that is more accurate on validation)",
    )
    p.set_defaults(fn=cmd_fit)


def cmd_fit(a) -> int:
    from .config import load_config
    from .experiments.fit import fit

    fit(load_config(a.config, a.overrides), a.minutes, a.output, a.budget, blend=not a.no_blend)
    return 0


def add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="time the reference Trainer recipe, a tuned Trainer and lorafit's path side by side; writes docs/benchmarks.md",
    )
    p.add_argument("--train-samples", type=int, default=1280, help="training samples per pipeline (default 1280)")
    p.add_argument(
        "--predict-samples", type=int, default=1000, help="rows predicted and scored per pipeline (max 2000)"
    )
    p.add_argument(
        "--budget-minutes",
        type=float,
        help="instead: train each pipeline for this many wall-clock minutes over the whole sample, then score",
    )
    p.add_argument("--pipelines", nargs="+", default=["reference", "tuned", "lorafit"], help="which pipelines to run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"), help="Markdown file to update")
    p.set_defaults(fn=cmd_bench)


def cmd_bench(a) -> int:
    from .experiments.bench import PIPELINES
    from .experiments.bench import main as bench_main

    unknown = [x for x in a.pipelines if x not in PIPELINES]
    if unknown:
        raise LorafitError(f"--pipelines: unknown {unknown}; expected some of {list(PIPELINES)}")
    bench_main(a.train_samples, a.predict_samples, a.budget_minutes, a.seed, a.out, a.pipelines)
    return 0


def add_serve(sub) -> None:
    from .serve.limits import Limits

    d = Limits()
    p = sub.add_parser(
        "serve",
        help="serve trained runs over HTTP, many on one shared base model (Hugging Face Inference API compatible)",
    )
    p.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="a run folder, NAME=RUN to serve it as NAME, or a sweep folder (its finished runs)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--token-file", help="a file holding the bearer token every request must send (needed off loopback)")
    p.add_argument(
        "--trusted-network",
        action="store_true",
        help="listen off loopback without a token: every client there may call",
    )
    p.add_argument("--max-batch", type=int, default=d.max_batch, help=f"texts per forward pass (default {d.max_batch})")
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=d.max_wait_ms,
        help=f"how long a request waits for others to batch with (default {d.max_wait_ms:g})",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=d.max_queue,
        help=f"texts waiting before requests get 503 (default {d.max_queue})",
    )
    p.add_argument("--max-texts", type=int, default=d.max_texts, help=f"texts per request (default {d.max_texts})")
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=d.max_body_bytes,
        help=f"request body size limit (default {d.max_body_bytes})",
    )
    p.add_argument(
        "--drain-seconds",
        type=float,
        default=d.drain_seconds,
        help=f"on SIGTERM, time for in-flight requests (default {d.drain_seconds:g})",
    )
    p.add_argument("--precision", choices=PRECISIONS, help="override the runs' precision")
    p.add_argument("--threads", type=int, help="compute threads (default: every core)")
    p.add_argument(
        "--workers",
        type=int,
        help="forward passes that may run at once, sharing the compute threads (default: 2 on a CPU, 1 on a GPU)",
    )
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.add_argument(
        "--merge",
        action=argparse.BooleanOptionalAction,
        help="serve every run merged, as predict computes it (faster; each run then holds its own copy of the layers "
        "it adapts), or with --no-merge none; default: merge the runs alone on their base, where it costs nothing, "
        "and give busy runs merged copies within --merge-budget-mb",
    )
    p.add_argument(
        "--merge-budget-mb",
        type=float,
        default=d.merge_budget_mb,
        help="memory for merged copies of the busiest runs that share a base; 0 for none "
        f"(default {d.merge_budget_mb:g}; docs/serving.md)",
    )
    p.set_defaults(fn=cmd_serve)


def cmd_serve(a) -> int:
    from .serve.limits import Limits
    from .serve.server import serve

    for flag in ("port", "max_batch", "max_queue", "max_texts", "max_body_bytes", "threads", "workers"):
        value = getattr(a, flag)
        if value is not None and (value < 0 or (value == 0 and flag != "port")):
            raise LorafitError(f"--{flag.replace('_', '-')} {value}: expected a positive number")
    for flag in ("max_wait_ms", "drain_seconds", "merge_budget_mb"):
        if getattr(a, flag) < 0:
            raise LorafitError(f"--{flag.replace('_', '-')} {getattr(a, flag)}: expected zero or more")
    limits = Limits(
        a.max_texts,
        a.max_body_bytes,
        a.max_batch,
        a.max_wait_ms,
        a.max_queue,
        a.drain_seconds,
        a.merge_budget_mb,
        a.workers,
    )
    serve(
        a.runs,
        a.host,
        a.port,
        limits,
        a.token_file,
        a.trusted_network,
        a.precision,
        a.threads,
        a.access_log,
        a.merge,
    )
    return 0


COMMANDS = (
    add_train,
    add_budget,
    add_eval,
    add_bench,
    add_keys,
    add_predict,
    add_report,
    add_blend,
    add_compare,
    add_export,
    add_serve,
    add_plan,
    add_sweep,
    add_fit,
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lorafit", description="Budgeted LoRA fine-tuning of text classifiers.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    from .training import distributed

    try:
        d = distributed.launched()  # torchrun / accelerate launch: this process's rank; one process: a no-op
        if d.active and args.command != "train":
            raise LorafitError(
                f"`lorafit {args.command}` runs in one process; only `lorafit train` runs under torchrun or accelerate launch: start it without the launcher"
            )
        return args.fn(args)
    except LorafitError as e:
        try:
            distributed.current().fail_together(e)  # several processes, and this one failed its checks: tell the others
        except LorafitError as agreed:
            e = agreed
        distributed.current().exiting()  # the exit code is decided: a launcher's late SIGTERM must not replace it
        if distributed.reports(e):  # several processes: rank 0 prints the error once, every process exits with its code
            print(f"lorafit: error: {e}", file=sys.stderr)
        return e.exit_code
    except distributed.Stopped:  # SIGTERM from the launcher before training started: another process failed its checks
        if distributed.current().main:  # (most likely with the error rank 0 printed already, or would have)
            print(f"lorafit: error: {distributed.current().stopped_message(None, False)}", file=sys.stderr)
        return distributed.STOPPED_EXIT
    except KeyboardInterrupt:
        if distributed.current().main:
            print("lorafit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
