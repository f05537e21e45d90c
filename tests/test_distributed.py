"""Exact resume after kill -9, and 2-process (gloo) training equal to 1 process."""

import json
import os
import glob
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import CORPUS, ROOT, TINY_FLAGS

pytestmark = pytest.mark.slow
# balance bias on: its updates must resume exactly and agree across ranks too
STEPS = ["--val-split", "0.1", "--max-steps", "8", "--eval-every", "4"]
STEPS += ["--set", "model.balance_bias_rate=0.05"]
TORCHRUN = [
    sys.executable,
    "-m",
    "torch.distributed.run",
    "--nproc_per_node",
    "2",
    "--standalone",
]


def cmd(out, procs, *extra):
    launcher = TORCHRUN if procs == 2 else [sys.executable]
    batch = "4" if procs == 2 else "8"  # same global batch
    return [
        *launcher,
        "train.py",
        CORPUS,
        "--output-dir",
        str(out),
        *TINY_FLAGS,
        "--batch-size",
        batch,
        *STEPS,
        *extra,
    ]


def run(c):
    """Run `c`; on failure show the launcher's stderr and, for torchrun, each rank's
    own stderr (torchrun's summary alone hides which rank failed and why)."""
    with tempfile.TemporaryDirectory() as logs:
        if c[: len(TORCHRUN)] == TORCHRUN:  # per-rank files under logs/
            c = [*TORCHRUN, "--log-dir", logs, "--redirects", "2", *c[len(TORCHRUN) :]]
        r = subprocess.run(c, cwd=ROOT, capture_output=True, text=True, timeout=240)
        if r.returncode != 0:
            ranks = sorted(
                glob.glob(os.path.join(logs, "**", "stderr.log"), recursive=True)
            )
            tails = [
                f"--- {os.path.relpath(f, logs)}\n{open(f).read()[-3000:]}"
                for f in ranks
            ]
            pytest.fail("\n".join([f"exit {r.returncode}", r.stderr[-2000:], *tails]))
    return r


def step_losses(out):
    losses = {}
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for rec in map(json.loads, f):
            if rec.get("kind") == "train":
                losses[rec["step"]] = rec["step_loss"]  # a resumed run overwrites
    return losses


def kill_after_checkpoint(c, out, step):
    p = subprocess.Popen(
        c,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    state = os.path.join(out, "last", "trainer_state.json")
    deadline = time.time() + 180
    while time.time() < deadline and p.poll() is None:
        try:
            if json.load(open(state))["step"] >= step:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = {n: tmp_path_factory.mktemp(f"straight{n}") for n in (1, 2)}
    for n in (1, 2):
        run(cmd(out[n], n))
    return {n: step_losses(out[n]) for n in (1, 2)}, out


@pytest.mark.parametrize("procs", [1, 2])
def test_resume_after_kill_is_exact(straight, tmp_path, procs):
    kill_after_checkpoint(cmd(tmp_path, procs), tmp_path, 4)
    run(cmd(tmp_path, procs, "--resume", "auto"))
    resumed, reference = step_losses(tmp_path), straight[0][procs]
    assert sorted(resumed) == list(range(1, 9))
    for s in range(5, 9):
        assert resumed[s] == reference[s], (s, resumed[s], reference[s])


def test_two_processes_match_one(straight):
    (one, two), out = (straight[0][1], straight[0][2]), straight[1]
    assert sorted(one) == sorted(two) == list(range(1, 9))
    for s in one:
        assert abs(one[s] - two[s]) < 1e-5, (s, one[s], two[s])
    with open(os.path.join(out[2], "metrics.jsonl")) as f:
        steps = [r["step"] for r in map(json.loads, f) if r.get("kind") == "train"]
    assert steps == list(range(1, 9))  # rank 0 alone writes: no duplicate records
    biases = [
        load_file(os.path.join(out[n], "last", "model.safetensors")) for n in (1, 2)
    ]
    keys = [k for k in biases[0] if k.endswith("balance_bias")]
    assert len(keys) == 2 and any(biases[0][k].abs().max() > 0.01 for k in keys)
    for key in keys:  # moved by the step's loads, alike on 1 and 2 processes
        torch.testing.assert_close(biases[0][key], biases[1][key])


def test_idle_experts_do_not_hang_ddp(tmp_path):
    # 8 tokens per rank, top-1 of 32 experts: at least 24 experts get no tokens.
    c = cmd(
        tmp_path,
        2,
        "--seq-len",
        "8",
        "--set",
        "model.n_experts=32",
        "--set",
        "model.num_experts_per_tok=1",
        "--max-steps",
        "3",
    )
    c[c.index("--batch-size") + 1] = "1"
    run(c)
    assert sorted(step_losses(tmp_path)) == [1, 2, 3]
