"""``caat-peft train | demo``: the command line.

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
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="offline demo: vanilla AT vs CA-AT on bundled digits")
    p.add_argument("--output-dir", default="demo_output", help="where the runs go")
    p.add_argument("--fresh", action="store_true", help="retrain the cached stage-1 checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="caat-peft", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train(sub)
    _add_demo(sub)
    return parser


def _cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from caat_peft.config import load_config
    from caat_peft.training import train

    cfg = load_config(args.config, args.overrides)
    output_dir = args.output_dir or str(Path("runs") / Path(args.config).stem)
    result = train(cfg, output_dir, overwrite=args.overwrite, progress=not args.no_progress)
    f = result.final
    print(
        f"clean acc {f['clean_acc']:.4f} | {f['eval_attack']} acc {f['robust_acc']:.4f} | "
        f"{f['seconds']:.1f} s | run directory {result.run_dir}"
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from caat_peft.demo import run_demo

    run_demo(args.output_dir, fresh=args.fresh, progress=not args.no_progress)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        handler = {"train": _cmd_train, "demo": _cmd_demo}[args.command]
        return handler(args)
    except UserError as exc:
        print(f"caat-peft: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("caat-peft: interrupted", file=sys.stderr)
        return 130
