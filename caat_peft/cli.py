"""``caat-peft train | eval | compare | report | front | study | demo``: the command line.

Mistakes a user can fix end with one line on stderr and exit code 2 (see ``errors.UserError``);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from caat_peft.errors import UserError

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage; keep it to one line
        raise UserError(f"{message} (see caat-peft {self.prog.split()[-1]} --help)")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="adversarially fine-tune PEFT modules as a config says")
    p.add_argument("config", help="YAML recipe, e.g. recipes/tiny.yaml")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set combiner.gamma=0.9 (repeatable)",
    )
    p.add_argument("--output-dir", default=None, help="run directory (default runs/<recipe>)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already there")
    p.add_argument(
        "--resume", action="store_true", help="continue the run from its newest checkpoint"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="offline demo: vanilla AT vs CA-AT on bundled digits")
    p.add_argument("--output-dir", default="demo_output", help="where the runs go")
    p.add_argument("--fresh", action="store_true", help="retrain the cached stage-1 checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--seed", type=int, default=0, help="seed of both stages (default 0)")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="robustness table (attacks × ε, AutoAttack, sanity checks) of a run or a model",
    )
    p.add_argument("run_dir", nargs="?", help="a finished run directory (config.yaml, adapter/)")
    p.add_argument("--config", help="a YAML config giving the model and data (instead of a run)")
    p.add_argument("--model", help="model.name: a registry entry, timm name or hf:<repo>")
    p.add_argument("--checkpoint", help="model.checkpoint: the backbone's weights file")
    p.add_argument("--data", help="data.name: cub | dogs | folder | hf | digits")
    p.add_argument("--data-root", help="data.root: the data folder")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--adapter", help="an adapter folder to attach (default: RUN_DIR/adapter)")
    p.add_argument("--split", choices=("test", "val"), default="test", help="data split")
    p.add_argument("--attacks", default=None, help="names or presets, e.g. pgd20,autoattack")
    p.add_argument("--eps", default=None, help="ε grid, e.g. 8/255,16/255")
    p.add_argument("--norm", choices=("linf", "l2"), default="linf")
    p.add_argument("--budget", choices=("standard", "fast"), default="standard")
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="a class-stratified subset of N images (seed 0: the same images for every model)",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N"
    )
    p.add_argument("--output-dir", help="where eval.json / eval.md go (default RUN_DIR/eval)")
    p.add_argument("--no-resume", action="store_true", help="recompute finished attacks")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="caat-peft", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train(sub)
    _add_demo(sub)
    _add_eval(sub)
    from caat_peft.compare import add_compare_parser
    from caat_peft.front import add_front_parser
    from caat_peft.study import add_study_parser
    from caat_peft.table import add_report_parser

    add_compare_parser(sub)
    add_report_parser(sub)
    add_front_parser(sub)
    add_study_parser(sub)
    return parser


def _cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from caat_peft.config import load_config
    from caat_peft.training import train

    cfg = load_config(args.config, args.overrides)
    output_dir = args.output_dir or str(Path("runs") / Path(args.config).stem)
    result = train(
        cfg,
        output_dir,
        overwrite=args.overwrite,
        resume=args.resume,
        progress=not args.no_progress,
    )
    f = result.final
    if not result.is_main_process:
        return 0
    print(
        f"clean acc {f['clean_acc']:.4f} | {f['eval_attack']} acc {f['robust_acc']:.4f} | "
        f"{f['seconds']:.1f} s | run directory {result.run_dir}"
    )
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from caat_peft.config import load_config, load_run_config
    from caat_peft.data import build_splits
    from caat_peft.evaluation import run_eval, summarize
    from caat_peft.models.backbone import preprocessing_for_config
    from caat_peft.models.loading import load_trained

    shortcuts = {
        "model.name": args.model,
        "model.checkpoint": args.checkpoint,
        "data.name": args.data,
        "data.root": args.data_root,
    }
    args.overrides = [f"{k}={v}" for k, v in shortcuts.items() if v is not None] + args.overrides
    if args.run_dir is None and args.config is None and args.model is not None:
        args.config = ""  # the defaults, with --model / --data on top
    if (args.run_dir is None) == (args.config is None):
        raise UserError(
            "give either a run directory, --config or --model (see caat-peft eval --help)"
        )
    if args.run_dir is not None:
        run_dir = Path(args.run_dir)
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"{run_dir} is not a run directory (it has no config.yaml)")
        cfg = load_run_config(run_dir / "config.yaml", args.overrides)
        adapter = args.adapter or run_dir / "adapter"
        output_dir = Path(args.output_dir or run_dir / "eval")
    else:
        cfg = load_config(args.config or None, args.overrides)
        adapter = args.adapter
        if args.output_dir is None:
            raise UserError("--output-dir is required with --config or --model")
        output_dir = Path(args.output_dir)
    splits = build_splits(cfg.data, preprocessing_for_config(cfg.model))
    data = splits.test if args.split == "test" else splits.val
    if data is None:
        raise UserError("this data set has no validation split (set data.val_fraction > 0)")
    model = load_trained(cfg, cfg.model.num_classes or splits.num_classes, adapter)
    result, json_path, md_path = run_eval(
        model,
        data,
        output_dir,
        resume=not args.no_resume,
        attacks=args.attacks,
        eps_list=args.eps,
        norm=args.norm,
        budget=args.budget,
        limit=args.limit,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
    )
    print(md_path.read_text())
    print(summarize(result))
    print(f"wrote {json_path} and {md_path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from caat_peft.demo import run_demo

    run_demo(args.output_dir, fresh=args.fresh, progress=not args.no_progress, seed=args.seed)
    return 0


def _one_line(exc: UserError) -> str:
    """The message itself. A UserError raised in a DataLoader worker comes back re-raised by
    torch with the worker's traceback prepended; its last line is the original message."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(exc).__name__
    last = lines[-1]
    for prefix in ("caat_peft.errors.UserError: ", "UserError: "):
        if last.startswith(prefix):
            return last[len(prefix) :]
    return last


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        from caat_peft.compare import cmd_compare
        from caat_peft.front import cmd_front
        from caat_peft.study import cmd_study
        from caat_peft.table import cmd_report

        handlers = {
            "train": _cmd_train,
            "demo": _cmd_demo,
            "eval": _cmd_eval,
            "compare": cmd_compare,
            "report": cmd_report,
            "front": cmd_front,
            "study": cmd_study,
        }
        handler = handlers[args.command]
        return handler(args)
    except UserError as exc:
        print(f"caat-peft: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("caat-peft: interrupted", file=sys.stderr)
        return 130
