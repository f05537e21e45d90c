"""Plot a training run's metrics.jsonl as PNG charts (loss curves, expert-load heatmap,
routing health, audit).

    python scripts/plot_metrics.py checkpoints/micro [--output checkpoints/micro/plots]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hmst.observe.plot import plot_run  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "run", help="training output dir (holding metrics.jsonl) or the file"
    )
    p.add_argument("--output", help="where the PNGs go (default: RUN/plots)")
    args = p.parse_args(argv)
    path = args.run
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    out = args.output or os.path.join(os.path.dirname(path) or ".", "plots")
    try:
        for f in plot_run(path, out):
            print(f)
    except (ValueError, OSError) as e:
        print(f"plot_metrics.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
