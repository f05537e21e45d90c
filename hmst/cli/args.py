"""Shared pieces of the command lines: one-line errors with exit code 2, FIELD=VALUE."""

from __future__ import annotations

import argparse
import json
import signal
import sys


def fail(prog: str, msg: str) -> None:
    """`<prog>: error: <msg>` on stderr, exit 2."""
    print(f"{prog}: error: {msg}", file=sys.stderr)
    sys.exit(2)


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (no usage dump), exit 2."""

    def error(self, message):
        fail(self.prog, message)


def field_value(text: str) -> tuple[str, object]:
    """`FIELD=VALUE` -> (field, JSON value, or the raw string if it is not JSON)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    try:
        return k, json.loads(v)
    except json.JSONDecodeError:
        return k, v


def restore_ctrl_c() -> None:
    """Make Ctrl-C raise KeyboardInterrupt (what the REPLs catch), even when the
    process started with SIGINT ignored, as a shell without job control leaves a
    background command and Python then keeps it."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


def run_main(prog: str, run, args):
    """The body of a training command's `main`: `args.num_threads` threads, then
    `run(args, log=...)` with its expected errors (bad path, corrupt file, bad value)
    turned into one line and exit 2."""
    import torch

    torch.set_num_threads(args.num_threads)
    try:
        return run(args, log=lambda s: print(s, flush=True))
    except (ValueError, OSError) as e:
        fail(prog, str(e))
