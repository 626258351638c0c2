"""Command line: ``teskd train | eval | export | predict | info | import-official | report | curves | sweep | bench``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from teskd.version import __version__
from teskd.errors import TeskdError, printable
from teskd.registry import load_plugins


def _cmd_train(args) -> int:
    from teskd.engine import distributed

    started = distributed.init_from_env()  # under torchrun: join its process group
    try:
        return _train(args)
    finally:
        if started:
            distributed.shutdown()


def _train(args) -> int:
    from teskd.launch import train_run

    out = args.out
    if args.resume:
        if args.config is not None and "=" in args.config:  # `teskd train --resume RUN k=v`
            args.overrides.insert(0, args.config)
            args.config = None
        if args.out is not None and Path(args.out) != Path(args.resume):
            raise TeskdError(f"--resume {args.resume} and --out {args.out} name different run directories")
        out = args.resume
    elif args.config is None:
        raise TeskdError("teskd train needs a CONFIG file (or --resume RUN_DIR)")
    train_run(args.config, args.overrides, out=out, resume=bool(args.resume), overwrite=bool(args.overwrite))
    return 0


def _cmd_eval(args) -> int:
    from teskd.evaluation import describe_data, evaluate_target

    result = evaluate_target(Path(args.target), args.overrides, which=args.checkpoint,
                             split=args.split, full=args.full)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        if result["kind"] == "deployed":
            print(f"deployed network {result['checkpoint']} ({result['format']} export, {result['arch']}, width_mult "
                  f"{result['width_mult']:g}, {result['num_classes']} classes)")
        else:
            where = f": {result['partial']}" if result.get("partial") else ""  # a mid-epoch checkpoint
            epoch = "" if where else f"epoch {result['epoch']}, "
            print(f"checkpoint {result['checkpoint']} ({epoch}{result['arch']}/{result['method']}){where}")
        print(f"evaluated on {describe_data(result)}")
        print(f"precision: {result['precision']}")
        print(f"{'branch':<20} {'top-1':>7} {'top-5':>7}")
        for name, acc in result["accuracy"].items():
            print(f"{name:<20} {acc['top1']:7.2f} {acc['top5']:7.2f}")
    return 0


def _cmd_export(args) -> int:
    from teskd.deploy.export import export

    r = export(args.target, args.format, args.out, which=args.checkpoint, opset=args.opset,
               overwrite=args.overwrite, bound=args.bound)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    if r.get("partial"):  # a mid-epoch checkpoint: "(epoch 0)" would hide that its weights are partly trained
        source = f"{r['source']}: {r['partial']}"
    else:
        source = f"{r['source']}" + (f" (epoch {r['epoch']})" if r["epoch"] is not None else "")
    print(f"exported {r['arch']} ({r['num_classes']} classes, {r['input_size']} px input) from {source}")
    print(f"wrote {r['out']} ({r['format']}, {r['bytes'] / 1e6:.2f} MB)")
    check = "identical outputs" if r["bound"] == 0 else f"bound {r['bound']:g}"
    print(f"verified: max abs difference of the logits vs PyTorch {r['max_abs_diff']:.3g} ({check})")
    return 0


def _cmd_predict(args) -> int:
    from teskd.deploy.source import NotAModel, load_deployed, model_kinds
    from teskd.deploy.predict import format_predictions, format_skipped, predict

    try:
        deployed = load_deployed(args.model, args.checkpoint)
    except NotAModel as exc:  # most often the arguments in the wrong order: say the order
        raise TeskdError(f"{exc.what}: teskd predict MODEL IMAGES..., where MODEL is {model_kinds()}") from exc
    device = "cpu"
    if args.device != "cpu" and deployed.movable:
        from teskd.engine.runtime import resolve_device

        device = resolve_device(args.device, setting="--device")
    if deployed.partial:  # stderr: --json output stays parseable
        print(f"note: {deployed.source} holds {deployed.partial}", file=sys.stderr)
    pred = predict(deployed, args.images, topk=args.topk, batch_size=args.batch_size, device=device,
                   progress=not args.json and sys.stderr.isatty())
    if args.json:
        print(json.dumps({"model": str(deployed.source), "results": pred.results,
                          "skipped": [{"file": f, "error": e} for f, e in pred.skipped]}, indent=2))
    elif pred.results:
        print(format_predictions(pred))
    for line in format_skipped(pred):
        print(line, file=sys.stderr)
    if not pred.results:
        raise TeskdError(f"none of the {len(pred.skipped)} image file(s) could be read")
    return 0


def _cmd_info(args) -> int:
    from teskd.config import load_config
    from teskd.evaluation import model_info

    info = model_info(load_config(args.config, args.overrides))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:<20} {value:,}" if isinstance(value, int) else f"{key:<20} {value}")
    return 0


def _cmd_import(args) -> int:
    from teskd.official import import_official

    out = import_official(Path(args.state_dict), args.arch, Path(args.out), args.overrides)
    print(f"imported {args.state_dict} ({args.arch}) -> {out}")
    return 0


def _cmd_bench(args) -> int:
    from teskd.bench import format_bench, run_bench
    from teskd.config import load_config

    cfg = load_config(args.config, args.overrides)
    result = run_bench(cfg, steps=args.steps, warmup=args.warmup, inference=args.inference,
                       memory=not args.no_memory)
    print(json.dumps(result, indent=2) if args.json else format_bench(result))
    return 0


def _cmd_report(args) -> int:
    from teskd.report import find_runs, format_report, plot_runs

    notes: list[str] = []
    runs = find_runs([Path(p) for p in args.runs], notes)  # run folders, or folders of run folders
    text, extra = format_report(runs, args.format, notes)
    print(text, flush=True)
    side = sys.stdout if args.format in ("table", "markdown") else sys.stderr  # csv/json: stdout stays parseable
    for note in extra:
        print(f"note: {note}", file=side)
    if args.plot:  # a path without .png gets it appended: the line says the file actually written
        print(f"curves: {printable(plot_runs(runs, Path(args.plot)))}", file=side)
    return 0


def _cmd_curves(args) -> int:
    from teskd.curves import plot_run

    if args.out is not None and len(args.runs) > 1:
        raise TeskdError(f"--out names one file: pass a single run directory with it (got {len(args.runs)})")
    if len(args.runs) == 1:
        print(printable(plot_run(Path(args.runs[0]), Path(args.out) if args.out else None)))
        return 0
    failed = 0
    for run in args.runs:  # several runs (`teskd curves runs/*`): one that cannot be drawn does not stop the rest
        try:
            print(printable(plot_run(Path(run))))  # folder names may come from an archive of runs
        except TeskdError as exc:
            failed += 1
            print(f"skipped {printable(run)}: {printable(exc)}", file=sys.stderr)
    return 2 if failed else 0


def _cmd_sweep(args) -> int:
    from teskd.sweep import LaunchOptions, sweep_command

    launch = LaunchOptions(args.launcher, args.jobs, args.gpus_per_run, tuple(args.slurm or ()))
    return sweep_command(Path(args.file), only=args.only, dry_run=args.dry_run, list_only=args.list,
                         collect_to=Path(args.collect) if args.collect else None, run=not args.no_run,
                         launch=launch, status=args.status, cancel=args.cancel)


# what `teskd --help` opens with: plain text (the module docstring's ``markup`` is for the docs)
DESCRIPTION = ("TESKD self-knowledge distillation: train image classifiers, evaluate, export and use them. "
               "Run teskd COMMAND --help for the options of each command.")
CONFIG_KEYS = "docs/configuration.md#every-key"  # the table of every config key and its default


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="teskd", description=DESCRIPTION)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"teskd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (TESKD or a baseline)",
                       epilog=f"Every config key, its default and meaning: {CONFIG_KEYS} (methods' own keys: "
                              f"docs/methods.md).")
    p.add_argument("config", nargs="?", help="YAML config, e.g. configs/cifar100/resnet18_teskd.yaml")
    p.add_argument("overrides", nargs="*",
                   help=f"key=value overrides, e.g. train.epochs=10 (valid keys: {CONFIG_KEYS})")
    p.add_argument("--out", help="run directory (default runs/<config>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue RUN_DIR from its last checkpoint (with CONFIG too: start RUN_DIR from CONFIG "
                        "if it has not started yet, so a requeued job can always pass the same command)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="per-branch top-1/top-5 of a run, a checkpoint or a deployed.safetensors")
    p.add_argument("target", help="run directory, checkpoint .pt file, or export (e.g. deployed.safetensors)")
    p.add_argument("overrides", nargs="*", help="key=value overrides (e.g. data.root=... data.dataset=...)")
    p.add_argument("--checkpoint", choices=["last", "best"], default="last",
                   help="which checkpoint of a run directory (default last)")
    p.add_argument("--split", choices=["test", "val"], default="test",
                   help="test (default), or val: the training images the run held out (data.val_per_class)")
    p.add_argument("--full", action="store_true",
                   help="the whole test split, not the run's data.test_subset_per_class subset")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_cmd_eval)

    from teskd.deploy.formats import format_names, formats_help  # the registered formats, plug-ins included

    p = sub.add_parser("export", help=f"write the deployed network alone ({', '.join(format_names())}), "
                                      "verified against PyTorch")
    p.add_argument("target", help="run directory, checkpoint .pt, or export (e.g. deployed.safetensors)")
    p.add_argument("--format", choices=format_names(), default="safetensors", help=formats_help())
    p.add_argument("--out", help="output file (default ./<run>-deployed[-best].<ext>)")
    p.add_argument("--checkpoint", choices=["last", "best"], default="last",
                   help="which checkpoint of a run directory (default last)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument("--bound", type=float,
                   help="largest accepted |logit difference| vs PyTorch for onnx/pt2 (default 1e-4)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is a teskd export")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("predict", help="classify image files with a run, checkpoint or export")
    p.add_argument("model", help="run directory, checkpoint .pt, or export (.safetensors, .onnx, .pt2)")
    p.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...) or folders (searched recursively)")
    p.add_argument("--topk", type=int, default=5, help="classes shown per image (default 5)")
    p.add_argument("--checkpoint", choices=["last", "best"], default="last",
                   help="which checkpoint of a run directory (default last)")
    p.add_argument("--batch-size", type=int, default=64, help="images classified at once (default 64)")
    p.add_argument("--device", default="cpu", help="cpu (default), auto, cuda or cuda:N (.onnx and .pt2 exports run on the CPU)")
    p.add_argument("--json", action="store_true", help="print the predictions (and skipped files) as JSON")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("info", help="parameters and multiply-adds for training and deployment")
    p.add_argument("config", help="YAML config, e.g. configs/cifar100/resnet18_teskd.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.arch=resnet34")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("import-official", help="convert a state dict saved by the official TESKD code")
    p.add_argument("state_dict", help="the official .pth file (model.state_dict())")
    p.add_argument("--arch", required=True, help="architecture, e.g. resnet18, seresnet34, vgg16")
    p.add_argument("--out", required=True,
                   help="run directory (eval/resume-able), a .pt checkpoint, or a deployed .safetensors")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (e.g. data.dataset=cifar10)")
    p.set_defaults(func=_cmd_import)

    p = sub.add_parser("bench", help="time training steps of the method against the ce baseline")
    p.add_argument("config", help="YAML config, e.g. configs/cifar100/resnet18_teskd.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.width_mult=0.25")
    p.add_argument("--steps", type=int, default=10, help="timed steps of each model (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each model first (default 3)")
    p.add_argument("--inference", action="store_true",
                   help="also time the deployed network's inference against a plain backbone")
    p.add_argument("--no-memory", action="store_true", help="skip the peak memory measurement")
    p.add_argument("--json", action="store_true", help="print the timings as JSON")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("report", help="compare runs and groups of seeds (unfinished runs from their metrics)")
    p.add_argument("runs", nargs="+", help="run directories, or folders holding run directories (1-2 levels down)")
    p.add_argument("--format", choices=["table", "markdown", "csv", "json"], default="table",
                   help="table (default): the runs, then the groups, numbered [k], in blocks that fit ~120 "
                        "columns; markdown: the groups as one wide table with every column; csv/json: the groups "
                        "(tables round to 2 decimals, csv to 4, json keeps full precision)")
    p.add_argument("--plot", metavar="PNG",
                   help="also draw the groups' and runs' curves into PNG (.png is appended if missing; the path "
                        "is printed)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("curves", help="redraw RUN/curves.png (test top-1 per branch, loss parts) from metrics.jsonl")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories")
    p.add_argument("--out", metavar="PNG", help="write here instead of RUN_DIR/curves.png (one run directory only)")
    p.set_defaults(func=_cmd_curves)

    p = sub.add_parser("sweep", help="train a grid of runs (variants x grid x seeds) from a sweep YAML file")
    p.add_argument("file", help="the sweep file (see docs/training.md#sweeps and docs/cluster.md)")
    p.add_argument("--only", metavar="PATTERN", help="only the runs whose name matches PATTERN (fnmatch: *, ?)")
    p.add_argument("--dry-run", action="store_true",
                   help="print each run's status and its teskd train command; run nothing")
    p.add_argument("--list", action="store_true", help="print the run names only")
    p.add_argument("--collect", metavar="DIR",
                   help="then copy each run's config.yaml, metrics.jsonl and summary.json into DIR/<run name>/")
    p.add_argument("--no-run", action="store_true", help="with --collect: only collect, train nothing")
    p.add_argument("--launcher", choices=["serial", "local", "slurm"], default="serial",
                   help="serial (default): one run after another in this process; local: --jobs runs at once, "
                        "each its own process; slurm: one job per run (see docs/cluster.md)")
    p.add_argument("--jobs", type=int, default=1, help="local: runs at once (CPU cores or GPUs divided)")
    p.add_argument("--gpus-per-run", type=int, help="GPUs of each run (local and slurm; default 1 where there are GPUs)")
    p.add_argument("--slurm", action="append", metavar="KEY=VALUE",
                   help="slurm: a resource, overriding the sweep file's launcher: section (partition=gpu, time=240, "
                        "account=..., qos=..., cpus_per_task=8, mem_gb=64, nodes=1, sbatch.constraint=a100)")
    p.add_argument("--status", action="store_true",
                   help="each run's state (new/queued/running/stopped/done/failed/locked), job, epoch and log")
    p.add_argument("--cancel", action="store_true", help="stop the sweep's running and queued runs (they save first)")
    p.set_defaults(func=_cmd_sweep)
    return parser


def main(argv: list[str] | None = None) -> int:
    plugin_error = None
    try:
        load_plugins()  # before the parser: a plug-in's export formats are --format choices
    except TeskdError as exc:
        plugin_error = exc  # reported below, as every error is (--debug: with its traceback)
    parser = build_parser()
    # key=value overrides may also come after options (`train CFG --out X a.b=1`): argparse
    # leaves those over, so collect them here rather than rejecting them.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*(args.overrides or []), *extra]
    try:
        if plugin_error is not None:
            raise plugin_error
        return args.func(args)
    except TeskdError as exc:
        if args.debug:
            raise
        print(f"error: {printable(exc)}", file=sys.stderr)  # names in messages may come from files
        return getattr(exc, "exit_code", 2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `teskd eval --json RUN | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
