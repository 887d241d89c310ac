"""Command line: ``userlab {demo,extract,train,eval,diagnose,ablate,lab}`` (also ``python -m userlab``).

Every command validates its inputs before work starts and exits with status 2 and a one-line
message naming the file or field on bad input (``--debug`` shows the traceback).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

from .config import ExperimentConfig, preset, set_dotted
from .errors import ConfigError, UserlabError, one_line_warning


def parse_value(text: str) -> Any:
    """``--set`` values: JSON when it parses (numbers, true/false, null), else the string."""
    try:
        return json.loads(text)
    except ValueError:  # not JSON (or a number too long for Python to parse): the string itself
        return text


def build_config(args: argparse.Namespace) -> ExperimentConfig:
    """Preset or JSON file, then ``--data``/``--run-dir`` and ``--set a.b=value`` overrides."""
    cfg = ExperimentConfig.from_json(args.config) if args.config else preset(args.preset)
    data = cfg.to_dict()
    if getattr(args, "data", None):
        data["data"]["root"] = args.data
    if getattr(args, "run_dir", None):
        data["run_dir"] = args.run_dir
    for item in args.set or []:
        if "=" not in item:
            raise ConfigError(item, "--set expects KEY=VALUE, e.g. --set optim.lr=0.001")
        key, value = item.split("=", 1)
        set_dotted(data, key.strip(), parse_value(value))
    return ExperimentConfig.from_dict(data)


def _add_config_args(p: argparse.ArgumentParser, default_preset: str = "demo") -> None:
    p.add_argument("--preset", default=default_preset, help="f30k, coco, demo, vsepp, f8k-cpu or f8k-cpu-vsepp (default: %(default)s)")
    p.add_argument("--config", help="an ExperimentConfig JSON file (instead of --preset)")
    p.add_argument("--data", help="data root holding the precomputed features")
    p.add_argument("--run-dir", help="where logs and checkpoints go")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.epochs=5 (repeatable)")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="userlab", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="build the demo scenes, train USER and VSE++, evaluate, draw figures")
    p.add_argument("--out", default="data/demo", help="demo data folder (default: %(default)s)")
    p.add_argument("--runs", default="runs", help="folder for the two runs (default: %(default)s)")
    p.add_argument("--figures", default="figures", help="folder for figures (default: %(default)s)")
    p.add_argument("--data-only", action="store_true", help="stop after building the data")
    p.add_argument("--epochs", type=int, help="override the demo preset's epochs")
    p.add_argument("--smoke", action="store_true", help="tiny data and a few steps (seconds)")

    p = sub.add_parser("extract", help="region + guide features for your own images (SCAN layout)")
    p.add_argument("--format", choices=["folder", "karpathy", "flickr", "kaggle", "coco"], default="folder",
                   help="folder: your own '<image>\\t<caption>' file; karpathy/flickr/coco: public "
                        "datasets; kaggle: Kaggle's Flickr8k captions.txt ('image,caption' CSV, also "
                        "read by --format flickr) with the official split lists")
    p.add_argument("--images", required=True, help="image folder")
    p.add_argument("--captions", required=True, nargs="+",
                   help="caption file(s); COCO takes captions_train2014.json captions_val2014.json")
    p.add_argument("--out", required=True, help="output folder (precomputed layout)")
    p.add_argument("--split", default="train", help="--format folder: the split to write")
    p.add_argument("--karpathy", help="Karpathy dataset_*.json giving the split (flickr, coco)")
    p.add_argument("--train-list", help="flickr: official train image list")
    p.add_argument("--dev-list", help="flickr: official dev image list")
    p.add_argument("--test-list", help="flickr: official test image list")
    p.add_argument("--regions", choices=["grid", "boxes"], default="grid")
    p.add_argument("--boxes", help="boxes file for --regions boxes")
    p.add_argument("--guide", choices=["backbone", "open_clip", "hf_clip"], default="backbone")
    p.add_argument("--guide-model", default="ViT-B-32", help="open_clip architecture name")
    p.add_argument("--guide-path", help="local checkpoint file (open_clip) or folder (hf_clip)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="image-loading processes")
    p.add_argument("--chunk-size", type=int, default=1000, help="images per resumable chunk")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--skip-missing", action="store_true", help="skip images that are missing or unreadable")
    p.add_argument("--max-images", type=int)
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    p.add_argument("--restval", choices=["train", "separate"], default="train")
    p.add_argument("--coco-val-split", choices=["dev", "test", "train"], default="dev",
                   help="COCO without --karpathy: the split of the val2014 images; without a dev "
                        "split the last images of train become dev (a warning says how many)")
    p.add_argument("--splits", nargs="+", help="only these splits")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--device", default=None)

    from .ablation import add_ablate_arguments
    p = sub.add_parser("ablate", help="grid of backbones x training strategies x seeds (DBL ablation)")
    add_ablate_arguments(p)

    from .diagnostics import add_arguments as add_diagnose_arguments
    p = sub.add_parser("diagnose", help="hubness, modality gap, collapse, attention entropy, recall by "
                                        "caption kind, twin confusion of a trained run")
    add_diagnose_arguments(p)

    from .lab import add_arguments as add_lab_arguments
    p = sub.add_parser("lab", help="start JupyterLab on 127.0.0.1 with a token")
    add_lab_arguments(p)

    p = sub.add_parser("train", help="train a model from a preset or config file")
    _add_config_args(p)
    p.add_argument("--no-resume", action="store_true",
                   help="start afresh even if run-dir has a checkpoint (the old run is moved to "
                        "<run-dir>.old-<time>, not deleted)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="on resume, apply config values that differ from the checkpoint's (recorded in "
                        "config_changes.jsonl) instead of refusing")
    p.add_argument("--allow-data-mismatch", action="store_true",
                   help="on resume, continue although the data or vocabulary differ from the checkpoint's")
    p.add_argument("--max-steps", type=int, help="stop after this many steps")
    p.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--tensorboard", action="store_true")
    p.add_argument("--boost-schedule", choices=["none", "offline", "online", "momentum"],
                   help="Deep Boosting Learning schedule (same as --set boost.schedule=...)")
    p.add_argument("--boost-strategy", help="relative, absolute, score_matching, similarity_preserving, "
                                            "mutual, dino, ... (same as --set boost.strategy=...)")

    p = sub.add_parser("eval", help="evaluate one run, or an ensemble of several")
    p.add_argument("runs", nargs="+", help="run or checkpoint folders (several: ensemble)")
    p.add_argument("--data", help="data root (default: the run's own)")
    p.add_argument("--split", default="test")
    p.add_argument("--protocol", default="full", help="full, f30k_1k, coco_1k_5fold or coco_5k")
    p.add_argument("--tag", default="best", help="best or last checkpoint")
    p.add_argument("--save-sims", help="write the similarity matrix (.npy) for later ensembles")
    p.add_argument("--csv", help="also write the metrics table here")
    p.add_argument("--allow-data-mismatch", action="store_true",
                   help="evaluate although the split differs from the one recorded at training, or the "
                        "runs of an ensemble read different data")
    return parser


def _check_writable(path: Optional[str], option: str) -> None:
    """Fail before hours of work when an output file cannot be written (DataError naming it)."""
    if not path:
        return
    import os
    from .errors import DataError
    target = Path(path)
    if target.is_dir():
        raise DataError(target, f"{option} names a folder; give a file name")
    parent = target.parent if str(target.parent) else Path(".")
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise DataError(target, f"{option}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise DataError(target, f"{option}: not writable (no write permission in {existing})")


def _check_positive(value: Optional[int], option: str, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise ConfigError(option, f"must be {'>= 0' if allow_zero else '>= 1'}, got {value}")




def cmd_train(args: argparse.Namespace) -> int:
    import pandas as pd
    from .experiment import fit_experiment
    _check_positive(args.max_steps, "--max-steps")
    _check_positive(args.checkpoint_every, "--checkpoint-every", allow_zero=True)
    from .interrupt import graceful_stop
    cfg = build_config(args)
    if args.boost_schedule:
        cfg = cfg.replace(**{"boost.schedule": args.boost_schedule})
    if args.boost_strategy:
        cfg = cfg.replace(**{"boost.strategy": args.boost_strategy})
    import os
    # Under torchrun every rank gets the signal; ranks stopping at different steps would hang
    # in the gradient all-reduce, so there the default (immediate) interrupt stays.
    stop = graceful_stop() if int(os.environ.get("WORLD_SIZE", "1")) <= 1 else contextlib.nullcontext()
    with stop:
        from .train import PrintDevMetrics
        trainer = fit_experiment(cfg, callbacks=[PrintDevMetrics()], resume=not args.no_resume,
                                 progress=not args.no_progress, max_steps=args.max_steps,
                                 checkpoint_every=args.checkpoint_every, tensorboard=args.tensorboard,
                                 allow_config_change=args.allow_config_change,
                                 allow_data_mismatch=args.allow_data_mismatch)
    history = pd.DataFrame(trainer.history)
    if trainer.rank == 0 and len(history):
        print(history.tail(1).to_string(index=False))
        print(f"best dev rSum {trainer.best_rsum:.2f}; checkpoints in {Path(cfg.run_dir) / 'checkpoints'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_ensemble, format_table, save_sims
    from .evaluate import PROTOCOLS
    from .runs import check_same_data, similarity_for_run
    if args.protocol not in PROTOCOLS:
        raise ConfigError("--protocol", f"{args.protocol!r} is not one of {', '.join(PROTOCOLS)}")
    _check_writable(args.csv, "--csv")
    _check_writable(args.save_sims, "--save-sims")
    fingerprints: dict = {}
    sims = [similarity_for_run(run, split=args.split, data_root=args.data, tag=args.tag,
                               allow_data_mismatch=args.allow_data_mismatch, fingerprints=fingerprints)
            for run in args.runs]
    if len(fingerprints) > 1:
        check_same_data(fingerprints, args.split, allow=args.allow_data_mismatch)
    df = evaluate_ensemble(sims, protocol=args.protocol) if len(sims) > 1 else None
    if df is None:
        from .evaluate import evaluate_sims
        df = evaluate_sims(sims[0], protocol=args.protocol)
    df.insert(0, "model", "ensemble" if len(sims) > 1 else Path(args.runs[0]).name)
    print(format_table(df))
    if args.save_sims:
        import torch
        save_sims(args.save_sims, torch.stack([torch.as_tensor(s) for s in sims]).mean(0))
    if args.csv:
        from .io import atomic_write_text
        try:
            atomic_write_text(args.csv, df.to_csv(index=False))
        except OSError as exc:
            from .errors import DataError
            raise DataError(args.csv, f"--csv: cannot write ({exc.strerror or exc})") from None
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    if args.format == "folder":
        from .data.features import extract_folder
        out = extract_folder(args.images, args.captions[0], args.out, split=args.split, regions=args.regions,
                             boxes_file=args.boxes, guide=args.guide, guide_model=args.guide_model,
                             guide_path=args.guide_path, batch_size=args.batch_size, device=args.device,
                             progress=not args.no_progress, input_size=args.input_size)
    else:
        from .data.extract import extract_dataset
        split_files = args.karpathy
        if args.format == "kaggle":
            args.format = "flickr"  # the flickr reader recognises the CSV by its header
        if args.format == "flickr" and not split_files:
            split_files = {s: f for s, f in (("train", args.train_list), ("dev", args.dev_list),
                                             ("test", args.test_list)) if f}
        captions = args.captions if args.format == "coco" else args.captions[0]
        out = extract_dataset(args.format, captions, args.images, args.out, split_files=split_files,
                              regions=args.regions, boxes_file=args.boxes, guide=args.guide,
                              guide_model=args.guide_model, guide_path=args.guide_path,
                              batch_size=args.batch_size, num_workers=args.workers, device=args.device,
                              chunk_size=args.chunk_size, skip_missing=args.skip_missing,
                              progress=not args.no_progress, max_images=args.max_images,
                              input_size=args.input_size, dtype=args.dtype, restval=args.restval,
                              coco_val_split=args.coco_val_split, splits=args.splits)
    print(f"wrote {out}")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from .ablation import cmd_ablate as run
    return run(args)


def cmd_lab(args: argparse.Namespace) -> int:
    from .lab import serve
    return serve(args.root, port=args.port)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    run_demo(out=args.out, runs=args.runs, figures=args.figures, data_only=args.data_only,
             epochs=args.epochs, smoke=args.smoke)
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from .diagnostics import cmd_diagnose as run
    return run(args)


COMMANDS = {"diagnose": cmd_diagnose, "train": cmd_train, "eval": cmd_eval, "extract": cmd_extract, "demo": cmd_demo,
            "ablate": cmd_ablate, "lab": cmd_lab}


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .interrupt import TrainingInterrupted
    parser = make_parser()
    args = parser.parse_args(argv)
    previous_format = warnings.formatwarning
    if not args.debug:
        warnings.formatwarning = one_line_warning
    try:
        return COMMANDS[args.command](args)
    except TrainingInterrupted as exc:
        print(f"userlab {args.command}: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"userlab {args.command}: interrupted; files are written atomically, so rerunning "
              f"the same command resumes from the last completed checkpoint or chunk", file=sys.stderr)
        return 130
    except UserlabError as exc:
        if args.debug:
            raise
        print(f"userlab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = previous_format


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
