"""`python train.py CONFIG [key=value ...] [--only STAGE] [--resume RUN|latest]`: the one error boundary."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
from pathlib import Path

from .errors import UserError, explain_failure

STAGES = ("preprocess", "train", "convert")

EPILOG = """examples:
  python train.py configs/quickstart.yaml
  python train.py configs/my.yaml training.steps=10 lora.rank=8 validation.interval=null
  python train.py configs/my.yaml 'lora.target_modules=[to_q,to_k,to_v,to_out.0]'
  python train.py configs/my.yaml --only preprocess
  python train.py configs/my.yaml --resume latest
  python train.py configs/my.yaml --only convert --run-dir outputs/run_20260101_120000
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Preprocess -> train -> convert an LTX-Video LoRA or full fine-tune from one YAML config.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="the YAML config (e.g. configs/quickstart.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, values read as YAML")
    p.add_argument("--only", choices=STAGES, help="run one stage only")
    p.add_argument("--resume", metavar="RUN_DIR|latest", help="continue a run from its newest checkpoint")
    p.add_argument("--run-dir", metavar="RUN_DIR", help="with --only convert: the run folder to convert")
    p.add_argument("--debug", action="store_true", help="show full tracebacks (also: LTXV_DEBUG=1)")
    return p


def _save_traceback() -> Path:
    fd, path = tempfile.mkstemp(prefix="ltxv_tuner_crash_", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.write(traceback.format_exc())
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    debug = args.debug or os.environ.get("LTXV_DEBUG", "") not in ("", "0")
    try:
        from .config import load_config
        from .pipeline import run

        cfg = load_config(args.config, args.overrides)
        run(cfg, config_path=Path(args.config), only=args.only, resume=args.resume, run_dir=args.run_dir)
        return 0
    except UserError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "\ninterrupted: checkpoints and cache written so far are kept (resume with --resume latest)",
            file=sys.stderr,
        )
        return 130
    except BrokenPipeError:  # stdout closed early (`| head`): nothing left to tell
        sys.stdout = None  # Python would report the pipe again when it flushes stdout at exit
        return 1
    except (Exception, MemoryError) as e:  # the one place an unexpected error is turned into a short message
        if debug:
            raise
        answer = explain_failure(e)  # disk full, permission, read-only, out of memory
        if answer is not None:
            print(f"error: {answer}", file=sys.stderr)
            return 2
        path = _save_traceback()
        print(
            f"error: unexpected {type(e).__name__}: {str(e)[:300]}\n"
            f"(full traceback saved to {path}; rerun with --debug to show it)",
            file=sys.stderr,
        )
        return 1
