"""The `lorafit` command line. User errors print one line and exit non-zero; bugs keep their traceback."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import LorafitError


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", type=Path, help="YAML config file (default: the embedded default, builtin:minilm on builtin:ag_news_sample)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key, value parsed as YAML (repeatable), e.g. --set lora.r=8 --set lora.target_modules=[query,value]")


def cmd_train(a) -> int:
    from .config import load_config
    from .runs import check_output, default_run_dir, resume_config
    from .train import run

    if a.resume:
        given = [flag for flag, value in (("-c", a.config), ("-o", a.output), ("--overwrite", a.overwrite)) if value]
        if given:
            raise LorafitError(f"--resume continues a run with its own config.yaml in its own folder; drop {', '.join(given)}")
        run(resume_config(a.resume, a.overrides), a.resume, resume=True)
        return 0
    cfg = load_config(a.config, a.overrides)
    out = a.output or default_run_dir(cfg)
    check_output(out, a.overwrite)
    run(cfg, out)
    return 0


def cmd_budget(a) -> int:
    import json

    from . import budget
    from .config import load_config
    from .train import num_labels_for

    cfg = load_config(a.config, a.overrides)
    n = num_labels_for(cfg)
    if n is None:
        from .data import infer_label_names, read_table

        n = len(infer_label_names(read_table(cfg.data.source), cfg.data))
    b = budget.compute(cfg, n)
    print(b.table())
    if a.json:
        a.json.write_text(json.dumps(b.to_dict(), indent=1))
    budget.check(b)
    return 0


def cmd_eval(a) -> int:
    from .evaluate import main as evaluate_main

    evaluate_main(a.run, a.data, a.json, a.precision)
    return 0


def cmd_bench(a) -> int:
    from .bench import PIPELINES, main as bench_main

    unknown = [x for x in a.pipelines if x not in PIPELINES]
    if unknown:
        raise LorafitError(f"--pipelines: unknown {unknown}; expected some of {list(PIPELINES)}")
    bench_main(a.train_samples, a.predict_samples, a.budget_minutes, a.seed, a.out, a.pipelines)
    return 0


def cmd_keys(a) -> int:
    import yaml

    from .config import all_keys

    for key, default, doc in all_keys():
        value = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
        print(f"{key} = {value}\n    {doc}")
    return 0


def cmd_predict(a) -> int:
    from .predict import main as predict_main

    predict_main(a.run, a.input, a.output, a.id_column, a.label_column, a.labels, a.proba, a.overwrite, a.precision)
    return 0


def cmd_report(a) -> int:
    from .report import write_report

    print(f"wrote {write_report(a.run)}")
    return 0


def cmd_compare(a) -> int:
    from .report import compare

    table, notes = compare(a.runs, a.output)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(table, end="")
    print(f"wrote comparison.md, comparison.csv, comparison.html and val_loss.png to {a.output}")
    return 0


def cmd_export(a) -> int:
    from .export import export_merged

    info = export_merged(a.run, a.merged, a.overwrite)
    print(f"exported the merged {info['model_type']} model and tokenizer to {a.merged} "
          f"(max abs logit difference to the run: {info['max_abs_logit_diff']:.1e}, fp32); "
          f"load it with AutoModelForSequenceClassification.from_pretrained({str(a.merged)!r})")
    if info["preprocess"]:
        print(f"note: the run preprocesses texts ({', '.join(info['preprocess'])}); apply the same steps before calling the exported model")
    return 0


def cmd_plan(a) -> int:
    from .config import load_config
    from .plan import make_plan, table, write
    from .sweep import parse_ints

    cfg = load_config(a.config, a.overrides)
    plan = make_plan(cfg, a.budget, parse_ints(a.ranks, "--ranks"))
    print(table(plan))
    if not plan.fits:
        raise LorafitError(f"none of the {plan.counted} configurations fits the budget of {plan.max_trainable:,}; raise --budget or budget.max_trainable, or try lower --ranks")
    if a.output:
        write(plan, a.output, a.config)
        print(f"wrote {len(plan.fits)} points to {a.output}; train them with: lorafit sweep {f'-c {a.config} ' if a.config else ''}--plan {a.output} -o sweeps/NAME")
    return 0


def cmd_sweep(a) -> int:
    from .sweep import main as sweep_main

    sweep_main(a)
    return 0


class Parser(argparse.ArgumentParser):
    """argparse, but usage mistakes are one line like every other user error."""

    def error(self, message):
        self.exit(2, f"lorafit: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lorafit", description="Budgeted LoRA fine-tuning of text classifiers.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("train", help="train a run from a config (default: the embedded MiniLM on the AG News sample)")
    _config_args(p)
    p.add_argument("-o", "--output", type=Path, help="run folder (default: a new folder under runs/)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--resume", type=Path, metavar="RUN", help="continue an interrupted run from its newest checkpoint (--set may change only train.lr, train.precision, threads, eval batch size, checkpointing)")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("budget", help="count trainable parameters by part without loading weights; exit 3 when over budget")
    _config_args(p)
    p.add_argument("--json", type=Path, help="also write the breakdown as JSON")
    p.set_defaults(fn=cmd_budget)

    p = sub.add_parser("eval", help="evaluate a saved run on a labelled file")
    p.add_argument("run", type=Path, help="run folder written by `lorafit train`")
    p.add_argument("--data", required=True, help="labelled .csv/.parquet/.jsonl file (or builtin:ag_news_sample_test)")
    p.add_argument("--json", type=Path, help="write the metrics as JSON")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], help="override the run's precision")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("bench", help="time the reference Trainer recipe, a tuned Trainer and lorafit's path side by side; writes docs/benchmarks.md")
    p.add_argument("--train-samples", type=int, default=1280, help="training samples per pipeline (default 1280: about 5 minutes on 2 cores)")
    p.add_argument("--predict-samples", type=int, default=1000, help="rows predicted and scored per pipeline (max 2000)")
    p.add_argument("--budget-minutes", type=float, help="instead: train each pipeline for this many wall-clock minutes over the whole sample, then score")
    p.add_argument("--pipelines", nargs="+", default=["reference", "tuned", "lorafit"], help="which pipelines to run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"), help="Markdown file to update")
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("keys", help="list every config key with its default and meaning")
    p.set_defaults(fn=cmd_keys)

    p = sub.add_parser("predict", help="label a file with a trained run (ids kept, input order kept)")
    p.add_argument("run", type=Path, help="run folder written by `lorafit train`")
    p.add_argument("--input", required=True, help="a .csv/.tsv/.parquet/.jsonl file, a pickled DataFrame or datasets.Dataset (.pkl; unpickling runs code, use trusted files), or - for JSON lines on stdin")
    p.add_argument("--output", required=True, help="a .csv/.tsv/.parquet/.jsonl file, or - for JSON lines on stdout")
    p.add_argument("--id-column", help="input column carried over as the id (default: ID when present, else the row number from 0)")
    p.add_argument("--label-column", default="label", help="name of the predicted-label column (default: label)")
    p.add_argument("--labels", choices=["names", "ids"], default="names", help="write class names (default) or class ids")
    p.add_argument("--proba", action="store_true", help="add one probability column per class (proba_NAME)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], help="override the run's precision")
    p.set_defaults(fn=cmd_predict)

    p = sub.add_parser("report", help="rebuild a run's report.html and its PNGs")
    p.add_argument("run", type=Path, help="run folder written by `lorafit train`")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("compare", help="compare runs: differing config keys and results (Markdown, CSV) and a validation-loss overlay (HTML, PNG)")
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN", help="run folders, or sweep folders whose subfolders are runs")
    p.add_argument("-o", "--output", type=Path, required=True, help="folder for comparison.md/.csv/.html and val_loss.png (files there are replaced)")
    p.set_defaults(fn=cmd_compare)

    p = sub.add_parser("export", help="merge the adapter into the base model and save a plain transformers model")
    p.add_argument("run", type=Path, help="run folder written by `lorafit train`")
    p.add_argument("--merged", type=Path, required=True, metavar="DIR", help="folder for the merged model and tokenizer (loadable without peft)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("plan", help="list the adapter layouts (targets, rank, DoRA, head, layers) that fit the budget, without loading weights")
    _config_args(p)
    p.add_argument("--budget", type=int, metavar="N", help="trainable-parameter budget (default: the config's budget.max_trainable)")
    p.add_argument("--ranks", default="2,4,8,16", metavar="R,R,...", help="ranks to try (default: 2,4,8,16)")
    p.add_argument("-o", "--output", type=Path, metavar="FILE", help="write the fitting layouts as a sweep file for `lorafit sweep --plan FILE`")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("sweep", help="train a grid, a plan or an Optuna search of configs into one sweep folder; re-running resumes")
    _config_args(p)
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="sweep folder (e.g. sweeps/NAME): one run folder per point and seed, results.csv, results.md")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...", help="values of one key, parsed as YAML (repeatable: the grid is the product), e.g. --grid lora.r=2,4,8")
    p.add_argument("--grid-file", type=Path, metavar="FILE", help="a sweep file: 'grid: {key: [values]}' and/or 'points: [{key: value}]'")
    p.add_argument("--plan", type=Path, metavar="FILE", help="the points written by `lorafit plan -o FILE` (combined with any --grid)")
    p.add_argument("--dry-run", action="store_true", help="list the points, their budgets and what is finished; train nothing")
    p.add_argument("--seeds", type=int, default=1, metavar="N", help="train each point with seeds train.seed .. train.seed+N-1; tables show mean ± std")
    p.add_argument("--metric", choices=["val_loss", "val_accuracy", "val_macro_f1"], help="sort (and search) by this validation metric (default: train.early_stopping.metric)")
    p.add_argument("--search", choices=["optuna"], help="search instead of a grid: Optuna TPE with pruning on the intermediate validation metric")
    p.add_argument("--trials", type=int, metavar="N", help="search: trials in total, across every worker of the study")
    p.add_argument("--space", type=Path, metavar="FILE", help="search: YAML of key -> [choices] or {low, high, log, step}")
    p.add_argument("--storage", metavar="URL", help="search: an Optuna storage URL shared by several workers (e.g. postgresql://user:pw@host/db); default: SQLite in the sweep folder")
    p.add_argument("--study", metavar="NAME", help="search: the study name (required with --storage; default: the sweep folder's name)")
    p.add_argument("--pruner", choices=["median", "none"], default="median", help="search: prune trials whose intermediate metric is worse than the median of earlier trials at the same step (default) or never")
    p.set_defaults(fn=cmd_sweep)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    from . import distributed

    try:
        d = distributed.launched()  # torchrun / accelerate launch: this process's rank; one process: a no-op
        if d.active and args.command != "train":
            raise LorafitError(f"`lorafit {args.command}` runs in one process; only `lorafit train` runs under torchrun or accelerate launch: start it without the launcher")
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
