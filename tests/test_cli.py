"""Subprocess smoke tests of train.py / inference.py / scripts on tiny budgets."""

import json
import os
import subprocess
import sys

import pytest

from conftest import CORPUS, ROOT, TINY_FLAGS


def run(args, **kw):
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        **kw,
    )


def train(out, *extra, data=(CORPUS,)):
    return run(["train.py", *data, "--output-dir", str(out), *TINY_FLAGS, *extra])


def records(out, kind):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("kind") == kind]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    r = train(
        out,
        "--val-split",
        "0.1",
        "--max-steps",
        "6",
        "--eval-every",
        "3",
        "--batch-size",
        "4",
    )
    assert r.returncode == 0, r.stderr
    return out


def test_train_writes_checkpoints_and_metrics(trained):
    for name in ("best", "last"):
        files = set(os.listdir(trained / name))
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert "trainer_state.pt" in os.listdir(trained / "last")
    assert [r["step"] for r in records(trained, "train")] == list(range(1, 7))
    evals = records(trained, "eval")
    assert [e["step"] for e in evals] == [3, 6]
    assert all(0 < e["val_bpb"] < 20 and e["val_ppl"] > 1 for e in evals)


def test_inference_prompt_and_batch(trained, tmp_path):
    r = run(
        [
            "inference.py",
            str(trained / "best"),
            "--prompt",
            "ROMEO:",
            "--max-length",
            "5",
            "--temperature",
            "0",
        ]
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ROMEO:") and "tok/s" in r.stderr
    (tmp_path / "p.txt").write_text("First line\n\nSecond line\n")
    (tmp_path / "p.jsonl").write_text(
        '{"id": "a", "prompt": "Hi"}\n{"id": 7, "prompt": "Yo"}\n'
    )
    for src, ids in (("p.txt", ["1", "3"]), ("p.jsonl", ["a", 7])):
        out = tmp_path / (src + ".out.jsonl")
        r = run(
            [
                "inference.py",
                str(trained / "best"),
                "--input",
                str(tmp_path / src),
                "--output",
                str(out),
                "--max-length",
                "4",
                "--seed",
                "1",
            ]
        )
        assert r.returncode == 0, r.stderr
        recs = [json.loads(line) for line in out.read_text().splitlines()]
        assert [x["id"] for x in recs] == ids
        assert all(x["new_tokens"] <= 4 and x["finish_reason"] for x in recs)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "   "], "empty prompt"),
        (["--input", "MISSING.jsonl"], "input file not found"),
        (["--temperature", "-1", "--prompt", "x"], "temperature"),
    ],
)
def test_inference_bad_input(trained, args, message):
    r = run(["inference.py", str(trained / "best"), *args])
    assert r.returncode != 0 and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_inference_malformed_jsonl_names_line(trained, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{broken\n')
    r = run(
        ["inference.py", str(trained / "best"), "--input", str(tmp_path / "bad.jsonl")]
    )
    assert r.returncode == 2 and "bad.jsonl:2" in r.stderr


def test_inference_missing_checkpoint(tmp_path):
    r = run(["inference.py", str(tmp_path / "none"), "--prompt", "x"])
    assert r.returncode == 2 and "checkpoint not found" in r.stderr


def test_inference_corrupt_checkpoint(trained, tmp_path, capsys):
    from hmst.cli.inference import main  # in-process: a process start costs seconds

    for f in os.listdir(trained / "best"):
        data = (trained / "best" / f).read_bytes()
        cut = f == "model.safetensors"
        (tmp_path / f).write_bytes(data[: len(data) // 2] if cut else data)
    assert main([str(tmp_path), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("inference.py: error: corrupt checkpoint")
    assert len(err.strip().splitlines()) == 1


def test_inference_int8_and_prompt_longer_than_context(trained, capsys):
    from hmst.cli.inference import main

    long_prompt = "To be, or not to be, that is the question. " * 20  # >> 32 tokens
    args = ["--prompt", long_prompt, "--max-length", "6", "--temperature", "0"]
    assert main([str(trained / "best"), *args, "--quantize", "int8"]) == 0
    out, err = capsys.readouterr()
    assert "warning: prompt longer than the context; dropped its first" in err
    assert out.startswith(long_prompt) and "tok/s" in err


def _snapshot(path):
    return {f: os.path.getmtime(path / f) for f in os.listdir(path)}


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda t: ["--data", str(t / "missing.txt")], "input not found"),
        (lambda t: ["--data", str(t / "empty.txt")], "corpus is empty"),
        (
            lambda t: ["--data", str(t / "short.txt")],
            "fewer than one training sequence",
        ),
        (lambda t: ["--val-split", "0.1", "--val-file", CORPUS], "not allowed with"),
        (lambda t: ["--model-size", "gigantic"], "unknown model size"),
        (lambda t: ["--tokenizer-path", str(t / "no_tok.json")], "tokenizer not found"),
    ],
)
def test_train_bad_input(tmp_path, make_args, message, trained):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("Too short.")
    args = make_args(tmp_path)
    data = [CORPUS]
    if args[0] == "--data":
        data, args = [args[1]], args[2:]
    before = _snapshot(trained / "last")
    r = train(trained, "--max-steps", "2", *args, data=data)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr
    assert len([ln for ln in r.stderr.splitlines() if "error" in ln]) == 1
    assert _snapshot(trained / "last") == before  # nothing overwritten


def test_resume_from_truncated_checkpoint_fails_cleanly(trained, tmp_path):
    bad = tmp_path / "bad"
    os.makedirs(bad)
    for f in os.listdir(trained / "last"):
        data = (trained / "last" / f).read_bytes()
        (bad / f).write_bytes(
            data[: len(data) // 2] if f == "model.safetensors" else data
        )
    r = train(
        tmp_path / "out", "--val-split", "0.1", "--max-steps", "8", "--resume", str(bad)
    )
    assert r.returncode == 2 and "corrupt checkpoint" in r.stderr


def test_resume_with_other_vocab_tokenizer_fails(trained, tmp_path):
    from hmst.tokenizer import HMSTTokenizer

    other = HMSTTokenizer.train(["a different tiny corpus " * 50], 280)
    other.save(str(tmp_path / "tok.json"))
    r = train(
        tmp_path / "out",
        "--val-split",
        "0.1",
        "--max-steps",
        "8",
        "--resume",
        str(trained / "last"),
        "--tokenizer-path",
        str(tmp_path / "tok.json"),
    )
    assert r.returncode == 2 and "does not match" in r.stderr


def test_8bit_optimizer_trains_on_cpu(tmp_path):
    pytest.importorskip("bitsandbytes")
    r = train(
        tmp_path,
        "--val-split",
        "0.1",
        "--max-steps",
        "3",
        "--eval-every",
        "3",
        "--use-8bit-optimizer",
        "--batch-size",
        "2",
    )
    assert r.returncode == 0, r.stderr
    losses = [x["step_loss"] for x in records(tmp_path, "train")]
    assert len(losses) == 3 and all(0 < v < 10 for v in losses)


def test_preprocess_split_and_pretokenized_training(tmp_path):
    tok = tmp_path / "tok"
    r = run(
        [
            "scripts/preprocess_data.py",
            "--input",
            CORPUS,
            "--output",
            str(tok / "all"),
            "--vocab-size",
            "300",
        ]
    )
    assert r.returncode == 0, r.stderr
    r = run(
        [
            "scripts/split_dataset.py",
            "--input",
            str(tok / "all"),
            "--train-output",
            str(tok / "train"),
            "--val-output",
            str(tok / "val"),
            "--seed",
            "1",
        ]
    )
    assert r.returncode == 0, r.stderr
    a = json.load(open(tok / "train" / "manifest.json"))["num_tokens"]
    b = json.load(open(tok / "val" / "manifest.json"))["num_tokens"]
    assert a + b == json.load(open(tok / "all" / "manifest.json"))["num_tokens"]
    r = train(
        tmp_path / "out",
        "--pretokenized",
        "--val-file",
        str(tok / "val"),
        "--max-steps",
        "2",
        "--eval-every",
        "2",
        data=[str(tok / "train")],
    )
    assert r.returncode == 0, r.stderr
    assert records(tmp_path / "out", "eval")[-1]["val_tokens"] > 0
