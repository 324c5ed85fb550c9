"""Command-line entry points: ``ublkml model ...`` and ``ublkml ml ...``.

Both are entry points of ``ublkml.commands`` (:func:`register_model`,
:func:`register_ml`); errors go through the one error path of
:mod:`ublk_driver.core.cli`.  A ``ValueError`` from reading a user's data
(telemetry, labels, models) is an error of that input: one line, exit 1.
Progress of long work goes to stderr, so that ``--json`` output stays clean.
The models' modules (numpy, onnxruntime, scikit-learn) are imported by the
commands that use them, so that ``ublkml --help`` and shell completion, which
build every command's parser, stay fast.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from ublk_driver.core.cli import PROG, CliError, Handler, Subparsers, add_group
from ublk_driver.core.errors import UblkError


def _input_errors(func: Handler) -> Handler:
    """A ValueError while a command reads the user's data is an error of that data."""

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except CliError:
            raise
        except ValueError as e:
            raise CliError(str(e)) from None

    return run



def _progress(enabled: bool, what: str) -> Callable[[int, int], None] | None:
    if not enabled:
        return None

    def report(i: int, n: int) -> None:
        if i == n or i % max(n // 10, 1) == 0:
            print(f"{PROG}: {what} {i}/{n}", file=sys.stderr, flush=True)
    return report


# ---- ublkml model ---------------------------------------------------------------


def _describe(info: dict[str, Any]) -> str:
    return (f"{info['path']}\n  kind {info['kind']}, version {info['version']}, threshold "
            f"{info['threshold']:g}\n  features {','.join(info['features'])}\n"
            f"  output: {info['output']}")


def _packaged() -> list[tuple[str, str, str]]:
    """The packaged models: (name, file, what it is for); the name is the file's stem."""
    from ml.model import DRIVE_MODEL, REFERENCE_MODELS

    return [
        ("fail_slow", REFERENCE_MODELS["fail_slow"],
         "the in-server scorer: each completion path of a device against its peers "
         "(`ublkml add --score`, `ublkml model use`; the host monitor's default)"),
        ("drive_fail_slow", DRIVE_MODEL,
         "drive telemetry and the host monitor: a drive's latency against its peers' or "
         "its own latency-vs-throughput curve (`ublkml ml detect`, `ublkml monitor run "
         "--model`); not for the in-server scorer, whose summaries lack its fit_* features"),
        ("failure", REFERENCE_MODELS["failure"],
         "SMART failure risk (`ublkml ml smart`, the host monitor's SMART checks)"),
    ]


def cmd_model_list(args: argparse.Namespace) -> int:
    from ml.model import load_model
    from ml.scorer import model_file, state_dir

    models = []
    for name, path, use in _packaged():
        entry: dict[str, Any] = {"name": name, "path": path, "packaged": True, "for": use}
        try:
            entry.update(load_model(path).info.as_dict())
        except UblkError as e:
            entry["error"] = str(e)
        models.append(entry)
    devices = []
    sd = state_dir()
    if os.path.isdir(sd):
        for name in sorted(os.listdir(sd)):
            if name.endswith(".model") and name[:-6].isdigit():
                with open(model_file(int(name[:-6]), sd)) as f:
                    devices.append({"dev_id": int(name[:-6]), "model": f.read().strip()})
    if args.json:
        print(json.dumps({"models": models, "devices": devices}, indent=2))
        return 0
    for m in models:
        print(f"packaged {m['name']}: " + (_describe(m) if "error" not in m
                                           else f"{m['path']}: {m['error']}"))
        print(f"  for: {m['for']}")
    for d in devices:
        print(f"device {d['dev_id']} uses {d['model']}")
    if not devices:
        print(f"no device has a chosen model (files {sd}/<dev>.model); devices use the "
              "packaged fail_slow model")
    return 0


def cmd_model_validate(args: argparse.Namespace) -> int:
    from ml.model import load_model

    info = load_model(args.file, expect_kind=args.kind).info.as_dict()
    if args.json:
        print(json.dumps({"valid": True, **info}, indent=2))
    else:
        print(f"valid: {_describe(info)}")
    return 0


def cmd_model_use(args: argparse.Namespace) -> int:
    from ml.scorer import load_scorer_model, model_file, state_dir

    path = os.path.abspath(args.file)
    # Never hand over a model the scorer would refuse (bad, or features it lacks).
    info = load_scorer_model(path).info
    sd = state_dir()
    dev = args.number
    if dev is None:
        running = sorted(int(n[:-5]) for n in (os.listdir(sd) if os.path.isdir(sd) else [])
                         if n.endswith(".json") and n[:-5].isdigit())
        if len(running) != 1:
            raise CliError(f"{len(running)} devices in {sd}: say which one with -n DEV")
        dev = running[0]
    if not os.path.exists(os.path.join(sd, f"{dev}.json")):
        print(f"{PROG}: warning: no running device {dev} known in {sd}; its scorer picks "
              "the model up when it starts", file=sys.stderr)
    target = model_file(dev, sd)
    os.makedirs(sd, exist_ok=True)
    tmp = target + ".tmp"
    with open(tmp, "w") as f:
        f.write(path + "\n")
    os.replace(tmp, target)  # the scorer sees a new mtime and swaps
    if args.json:
        print(json.dumps({"dev_id": dev, "model": path, "version": info.version}))
    else:
        print(f"device {dev}: model {path} (version {info.version}); the scorer swaps it "
              "in within a tick")
    return 0


def register_model(sub: Subparsers) -> None:
    """``ublkml model list|validate FILE|use FILE [-n DEV]``."""
    _, sub = add_group(sub, "model", help="ONNX drive-health models: list, validate, use",
                       description="List, validate and switch the ONNX models that score a "
                       "device's completion paths (contract: docs/models.md).")
    ls = sub.add_parser("list", help="packaged models and the model each device uses",
                        description="Show the packaged models (fail_slow for the in-server "
                        "scorer, drive_fail_slow for drive telemetry and the host monitor, "
                        "failure for SMART), what each is for, and, per device, the model "
                        "chosen with `model use`.")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=_input_errors(cmd_model_list))
    v = sub.add_parser("validate", help="check a model against the plug-in contract",
                       description="Load FILE as the scorer would (onnx checker, metadata, "
                       "input/output shapes and dtypes, a trial run); exit 1 with the reason "
                       "if it is refused.")
    v.add_argument("file", metavar="FILE")
    v.add_argument("--kind", choices=["fail_slow", "failure"], help="also require this kind")
    v.add_argument("--json", action="store_true", help="machine-readable output")
    v.set_defaults(func=_input_errors(cmd_model_validate))
    u = sub.add_parser("use", help="hot-swap a running device's fail-slow model",
                       description="Validate FILE, then point the device's scorer at it "
                       "($UBLKML_STATE_DIR/<dev>.model, default /run/ublkml); the scorer "
                       "swaps within a tick and keeps its old model if the new one fails. "
                       "A model that needs features the scorer's per-path summaries lack "
                       "(fit_*, as drive_fail_slow) is refused.")
    u.add_argument("file", metavar="FILE")
    u.add_argument("-n", "--number", type=int, help="device id (default: the only device)")
    u.add_argument("--json", action="store_true", help="machine-readable output")
    u.set_defaults(func=_input_errors(cmd_model_use))


# ---- ublkml ml ----------------------------------------------------------------------


def cmd_detect(args: argparse.Namespace) -> int:
    from ml import detect
    from ml.model import load_model
    from ml.telemetry import dropped_rows, read_labels, read_tree, tree_window

    quiet = args.json or args.quiet
    if args.window is not None and not args.window > 0:
        raise CliError(f"--window must be positive, got {args.window}")
    hosts = read_tree(args.dir, progress=_progress(not quiet, "read hosts"))
    labels = read_labels(args.labels) if args.labels else None
    model = load_model(args.model, expect_kind="fail_slow") if args.model else None
    window = args.window or tree_window(args.dir) or detect.DEFAULT_WINDOW_S
    verdicts = detect.run(args.method, hosts, model, window)
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write("host,disk_id,flagged,score\n")
            f.writelines(f"{v.host},{v.disk_id},{int(v.flagged)},{v.score:.6g}\n"
                         for v in verdicts)
        os.replace(tmp, args.out)
    na = dropped_rows(hosts)
    result: dict[str, Any] = {"method": args.method, "drives": len(verdicts),
                              "flagged": sum(v.flagged for v in verdicts), "na": na}
    if labels is not None:
        result["metrics"] = detect.metrics(verdicts, labels)
    if args.json:
        result["verdicts"] = [{"host": v.host, "disk_id": v.disk_id, "flagged": v.flagged,
                               "score": v.score} for v in verdicts]
        print(json.dumps(result, indent=2))
        return 0
    if not args.out:
        print("host,disk_id,flagged,score")
        for v in verdicts:
            print(f"{v.host},{v.disk_id},{int(v.flagged)},{v.score:.6g}")
    print(f"{args.method}: {result['flagged']} of {result['drives']} drives flagged",
          file=sys.stderr if not args.out else sys.stdout)
    dropped, rows, files = na["dropped"], na["rows"], na["files_with_dropped"]
    print(f"rows: {rows} read, {dropped} dropped for NA or empty values "
          f"({100 * dropped / max(rows, 1):.2f} %, in {len(files)} of {na['files']} files"
          + ("; --json lists them" if files else "") + ")",
          file=sys.stderr if not args.out else sys.stdout)
    if labels is not None:
        m = result["metrics"]
        print(f"precision {m['precision']:.3f}  recall {m['recall']:.3f}  F1 {m['f1']:.3f}  "
              f"MCC {m['mcc']:.3f}  (tp {m['tp']} fp {m['fp']} fn {m['fn']} tn {m['tn']})",
              file=sys.stderr if not args.out else sys.stdout)
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from ml import synth

    quiet = args.json or args.quiet
    if args.what == "telemetry":
        cfg = synth.config_from(args.preset, hosts=args.hosts, days=args.days,
                                slow_fraction=args.slow_fraction)
        faults = synth.make_telemetry(args.out, args.seed, cfg,
                                      progress=_progress(not quiet, "hosts written"))
        summary = {"out": args.out, "preset": args.preset, "seed": args.seed,
                   "hosts": cfg.hosts, "slow_drives": len(faults),
                   "labels": os.path.join(args.out, "labels.csv")}
    else:
        scfg = synth.SMART_PRESETS[args.preset]
        fails = synth.make_smart(args.out, args.seed, scfg)
        summary = {"out": args.out, "preset": args.preset, "seed": args.seed,
                   "drives": scfg.drives, "days": scfg.days, "failures": len(fails)}
    print(json.dumps(summary) if args.json else
          ", ".join(f"{k} {v}" for k, v in summary.items()))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from ml.train import compare_recorded, format_comparison

    try:
        seeds = [int(x) for x in args.synthetic_seeds.split(",")]
    except ValueError:
        raise CliError(f"--synthetic-seeds {args.synthetic_seeds!r}: give seeds like 2,3,4"
                    ) from None
    rep = compare_recorded(args.train, args.heldout, seed=args.seed, synthetic_seeds=seeds,
                           save_dir=args.save, quiet=args.quiet or args.json)
    print(json.dumps(rep, indent=2) if args.json else format_comparison(rep))
    return 0


def cmd_record(args: argparse.Namespace) -> int:
    from ml.record import main

    return main(args)


def cmd_train(args: argparse.Namespace) -> int:
    from ml.train import TrainRequest, format_drive_report, train

    if args.cv < 2:
        raise CliError(f"--cv must be at least 2, got {args.cv}")
    report = train(TrainRequest(
        what=args.what, data_dir=args.dir, out=args.out, labels=args.labels, seed=args.seed,
        window_s=args.window, add=tuple(args.add), horizon_days=args.horizon,
        version=args.version, evaluate=not args.no_eval, quiet=args.quiet or args.json,
        cv=args.cv, loco=args.loco, self_baseline=args.self_baseline))
    if args.json:
        print(json.dumps(report, indent=2))
    elif args.what == "drive-fail-slow":
        print(format_drive_report(report))
        print(f"wrote {report['path']}")
    else:
        for k, v in report.items():
            print(f"{k}: {v}")
    return 0


def cmd_smart(args: argparse.Namespace) -> int:
    from ml.model import load_model, reference_model
    from ml.smart import parse_smartctl_json, read_smart

    if args.from_json:
        with open(args.from_json, "rb") as f:
            reading = parse_smartctl_json(f.read(), args.from_json)
    else:
        reading = read_smart(args.device)
    model = load_model(args.model, "failure") if args.model else reference_model("failure")
    score, flag = model.predict(reading.vector(model.features))
    out = {"device": reading.device, "model": reading.model, "serial": reading.serial,
           "smart_passed": reading.passed, "score": float(score[0]), "flagged": bool(flag[0]),
           "threshold": model.threshold, "missing": list(reading.missing),
           "features": reading.features}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{out['device']} ({out['model']} {out['serial']}): failure score "
              f"{out['score']:.3f} ({'FLAGGED' if out['flagged'] else 'ok'}, threshold "
              f"{model.threshold:g})" + (f"; not reported: {', '.join(reading.missing)}"
                                         if reading.missing else ""))
    return 0


def register_ml(sub: Subparsers) -> None:
    """``ublkml ml detect|train|synth|record|compare|smart ...``."""
    from ml.detect import DEFAULT_WINDOW_S, METHODS
    from ml.record import add_arguments
    from ml.synth import PRESETS, SMART_PRESETS
    from ml.train import DRIVE_FOLDS, HORIZON_DAYS, TRAINABLE

    _, sub = add_group(sub, "ml", help="detection and training on drive telemetry",
                       description="Drive-health models: fail-slow detection on telemetry, "
                       "training, synthetic data, SMART failure scores.")

    d = sub.add_parser("detect", help="per-drive fail-slow verdicts for a telemetry tree",
                       description="Read DIR/<host>/*.csv, or a nested tree such as "
                       "DIR/<cluster>/<host>/*.csv (a host is its directory's path; columns "
                       "ts,disk_id,throughput,latency, quoted or not, rows in any order; the "
                       "drives of a host are peers; NA or empty values drop their row and "
                       "are counted) and write one verdict per drive: host,disk_id,flagged,"
                       "score. With --labels (host,disk_id or Perseus' slow_drive_info.csv), "
                       "print precision, recall, F1 and MCC.")
    d.add_argument("dir", metavar="DIR")
    d.add_argument("--labels", metavar="CSV", help="slow drives (host,disk_id) to score "
                   "the verdicts against")
    d.add_argument("--model", metavar="FILE", help="a fail_slow ONNX model (default: the "
                   "packaged drive model, ml/models/drive_fail_slow.onnx, trained on real "
                   "fleet telemetry)")
    d.add_argument("--method", choices=METHODS, default="model",
                   help="model (default), peer2x (2x peer-median rule) or perseus "
                   "(latency-vs-throughput regression)")
    d.add_argument("--window", type=float, default=None,
                   help="window in seconds (default: DIR/recording.json's window_s for "
                   f"recorded telemetry, else {DEFAULT_WINDOW_S:g})")
    d.add_argument("--out", metavar="CSV", help="write the verdicts here instead of stdout")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.add_argument("-q", "--quiet", action="store_true", help="no progress")
    d.set_defaults(func=_input_errors(cmd_detect))

    t = sub.add_parser("train", help="train a model and export it as ONNX (extra: train)",
                       description="Seeded training. `reference` rebuilds the packaged "
                       "models from generated data; `fail-slow DIR` trains on a telemetry "
                       "tree with labels; `drive-fail-slow DIR` trains the drive model on "
                       "real fleet telemetry (DIR/<cluster>/<host>/*.csv, labels "
                       "DIR/labels.csv or DIR/slow_drive_info.csv) and cross-validates it by "
                       "host against both baselines; `failure DIR` on Backblaze-layout "
                       "SMART CSVs.", epilog="The packaged drive model: see docs/models.md, "
                       "'Fail-slow detection over telemetry', for the exact command.")
    t.add_argument("what", choices=list(TRAINABLE))
    t.add_argument("dir", nargs="?", metavar="DIR", help="training data (not for reference)")
    t.add_argument("--labels", metavar="CSV", help="fail-slow: labels (default DIR/labels.csv)")
    t.add_argument("--out", metavar="PATH", help="the model file (reference: a directory, "
                   "default the package's ml/models)")
    t.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    t.add_argument("--window", type=float, default=None,
                   help="fail-slow: window in seconds (default: DIR/recording.json's "
                   f"window_s, else {DEFAULT_WINDOW_S:g})")
    t.add_argument("--add", action="append", default=[], metavar="DIR",
                   help="fail-slow: another labelled telemetry tree to train on as well "
                   "(its own labels.csv and window); repeatable")
    t.add_argument("--horizon", type=int, default=HORIZON_DAYS,
                   help=f"failure: days ahead to predict (default {HORIZON_DAYS})")
    t.add_argument("--version", default="1", help="the model's ublkml.version (default 1)")
    t.add_argument("--no-eval", action="store_true", help="reference: skip the held-out "
                   "evaluation")
    t.add_argument("--cv", type=int, default=DRIVE_FOLDS, metavar="K",
                   help=f"drive-fail-slow: folds by host (default {DRIVE_FOLDS}); the report "
                   "has the cross-validated table of the model and both baselines")
    t.add_argument("--loco", action="store_true", help="drive-fail-slow: also leave one "
                   "cluster (first directory level) out")
    t.add_argument("--self-baseline", action="store_true", help="drive-fail-slow: also "
                   "judge each held-out drive against its own first 24 h instead of peers")
    t.add_argument("--json", action="store_true", help="machine-readable report")
    t.add_argument("-q", "--quiet", action="store_true", help="no progress")
    t.set_defaults(func=_input_errors(cmd_train))

    s = sub.add_parser("synth", help="generate labelled data (telemetry or SMART history)",
                       description="Write a Perseus-layout telemetry tree with injected "
                       "fail-slow drives (DIR/labels.csv, DIR/injected.csv) or a "
                       "Backblaze-layout SMART history, from a seed.")
    s.add_argument("what", choices=["telemetry", "smart"])
    s.add_argument("out", metavar="DIR")
    s.add_argument("--preset", default="train",
                   choices=sorted(set(PRESETS) | set(SMART_PRESETS)),
                   help="train (default), heldout or small")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--hosts", type=int, help="telemetry: number of hosts")
    s.add_argument("--days", type=int, help="telemetry: days per host")
    s.add_argument("--slow-fraction", type=float, help="telemetry: fraction of slow drives")
    s.add_argument("--json", action="store_true", help="machine-readable summary")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress")
    s.set_defaults(func=_input_errors(cmd_synth))

    r = sub.add_parser("record", help="record labelled telemetry from a mirror with "
                       "injected faults (in the test bed if needed)",
                       description="Serve a mirror (--legs legs on a RAM file system) with "
                       "completion records on, run a seeded fio mixed random load, inject "
                       "seeded fault schedules (2-20x slowdowns, bursts, ramps; healthy and "
                       "hiccup legs) and write the per-leg, per-second telemetry in the "
                       "Perseus layout (OUT_DIR/<host>/<day>.csv), OUT_DIR/labels.csv, "
                       "OUT_DIR/injected.csv and OUT_DIR/recording.json. One host per run; "
                       "natively where /dev/ublk-control exists (root), else in one boot of "
                       "the qemu test bed.", epilog="See docs/models.md, 'Recorded "
                       "telemetry'.")
    add_arguments(r)
    r.set_defaults(func=_input_errors(cmd_record))

    c = sub.add_parser("compare", help="models and baselines on held-out recorded telemetry "
                       "(extra: train)",
                       description="Train fail-slow models on the synthetic training set of "
                       "the packaged model (with --seed 1: the packaged model), on the "
                       "recording TRAIN, and on both; print precision, recall, F1 and MCC "
                       "of the three and of both baselines on the recording HELDOUT and on "
                       "synthetic held-out sets (preset heldout).")
    c.add_argument("train", metavar="TRAIN", help="a recorded telemetry tree (ml record)")
    c.add_argument("heldout", metavar="HELDOUT", help="another one, to evaluate on")
    c.add_argument("--seed", type=int, default=1, help="training seed (default 1)")
    c.add_argument("--synthetic-seeds", default="2", metavar="S[,S...]",
                   help="seeds of the synthetic held-out sets (default 2)")
    c.add_argument("--save", metavar="DIR", help="also write the trained models there")
    c.add_argument("--json", action="store_true", help="machine-readable report")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress")
    c.set_defaults(func=_input_errors(cmd_compare))

    m = sub.add_parser("smart", help="failure score of a drive from smartctl --json",
                       description="Run `smartctl --json -a DEVICE` (or read its saved "
                       "output) and score it with the failure model.")
    g = m.add_mutually_exclusive_group(required=True)
    g.add_argument("device", nargs="?", metavar="DEVICE")
    g.add_argument("--from-json", metavar="FILE", help="saved smartctl --json output")
    m.add_argument("--model", metavar="FILE", help="a failure ONNX model (default: packaged)")
    m.add_argument("--json", action="store_true", help="machine-readable output")
    m.set_defaults(func=_input_errors(cmd_smart))
