"""`python train.py CONFIG [key=value ...] [--only STAGE] [--resume RUN|latest]`: the one error boundary."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import traceback
from datetime import datetime
from pathlib import Path

from . import logs
from .errors import UserError, explain_failure

STAGES = ("preprocess", "train", "convert")

EPILOG = """examples (./train.sh or train.bat run the same with the project's venv/):
  python train.py configs/quickstart.yaml
  python train.py configs/my.yaml training.steps=10 lora.rank=8 validation.interval=null
  python train.py configs/my.yaml 'lora.target_modules=[to_q,to_k,to_v,to_out.0]'
  python train.py configs/my.yaml --only preprocess
  python train.py configs/my.yaml --resume latest
  python train.py configs/my.yaml --only convert --run-dir outputs/run_20260101_120000
Windows (cmd.exe): quote with double quotes, "lora.target_modules=[to_q,to_k]", and use backslashes in paths.
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
    p.add_argument(
        "--resume",
        metavar="RUN_DIR|latest",
        help="continue a run from its newest checkpoint (or from RUN_DIR/checkpoints/step_N, that one)",
    )
    p.add_argument("--run-dir", metavar="RUN_DIR", help="with --only convert: the run folder to convert")
    p.add_argument("--debug", action="store_true", help="show full tracebacks (also: LTXV_DEBUG=1)")
    return p


def _save_traceback() -> Path:
    """The traceback of an unexpected error: in the run's logs/ once there is a run, else the system temp folder."""
    folder = logs.run_log_dir()
    if folder is not None and folder.is_dir():
        path = folder / f"crash_{datetime.now().strftime('%Y%m%d_%H%M%S')}.txt"
        path.write_text(traceback.format_exc(), encoding="utf-8")
        return path
    fd, name = tempfile.mkstemp(prefix="ltxv_tuner_crash_", suffix=".txt")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(traceback.format_exc())
    return Path(name)


def _fail(message: str, code: int) -> int:
    """Print the final message on stderr and append it to the run's train.log (when there is a run)."""
    print(message, file=sys.stderr)
    logs.to_run_log(logging.ERROR, message.strip())
    return code


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
        return _fail(f"error: {e}", 2)
    except KeyboardInterrupt:
        return _fail("\ninterrupted: checkpoints and cache written so far are kept (resume with --resume latest)", 130)
    except BrokenPipeError:  # stdout closed early (`| head`): nothing left to tell
        sys.stdout = None  # Python would report the pipe again when it flushes stdout at exit
        return 1
    except (Exception, MemoryError) as e:  # the one place an unexpected error is turned into a short message
        if debug:
            raise
        answer = explain_failure(e)  # disk full, permission, read-only, out of memory
        if answer is not None:
            return _fail(f"error: {answer}", 2)
        path = _save_traceback()
        message = f"error: unexpected {type(e).__name__}: {str(e)[:300]}"
        return _fail(f"{message}\n(full traceback saved to {path}; rerun with --debug to show it)", 1)
    finally:
        logs.detach_run_logs()
