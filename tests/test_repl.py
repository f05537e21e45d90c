"""inference.py's REPL driven in a pseudo-terminal (pexpect), as a user would."""

import os
import sys

import pytest
import torch

from conftest import ROOT, tiny_config
from hmst.models.base_moe import BaseMoEModel

pexpect = pytest.importorskip("pexpect")

PROMPT = ">>> "


@pytest.fixture(scope="module")
def long_ckpt(tmp_path_factory, tokenizer):
    """Random tiny model with a long context (so a generation lasts long enough to be
    interrupted) whose greedy decoding never picks EOS: its tied embedding row is zero,
    so its logit is 0 while the best of the other 299 random logits is positive."""
    torch.manual_seed(0)
    model = BaseMoEModel(config=tiny_config(max_seq_len=4096, init_std=0.1))
    with torch.no_grad():
        model.embed.weight[tokenizer.eos_id] = 0
    path = tmp_path_factory.mktemp("ckpt") / "model"
    model.save_pretrained(str(path), tokenizer=tokenizer)
    return path


def spawn(ckpt, *args):
    child = pexpect.spawn(
        sys.executable,
        ["inference.py", str(ckpt), "--num-threads", "1", *args],
        cwd=ROOT,
        encoding="utf-8",
        timeout=60,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "TERM": "dumb"},
    )
    child.expect_exact(PROMPT)
    return child


BAD_LINES = [
    ("set warmth 3", "error: unknown parameter 'warmth'"),
    ("set temperature -1", "error: temperature must be >= 0"),
    ("set top_p 1.5", "error: top_p must be in (0, 1]"),
    ("set top_k many", "error: top_k expects an integer, got 'many'"),
    ("set max_length 0", "error: max_new_tokens must be >= 1"),
    ("set temperature", "usage: set <param> <value>"),
]


def test_repl_session(long_ckpt):
    """One session (a process start costs seconds): streamed answers, `set`, greedy
    determinism, Ctrl-C mid-generation, `stats`, bad input, `quit`; then Ctrl-D."""
    child = spawn(long_ckpt, "--max-length", "12")
    try:
        child.sendline("set temperature 0")
        child.expect_exact("temperature = 0")
        child.expect_exact(PROMPT)
        # a streamed answer, then its report line, then the prompt back
        child.sendline("First Citizen:")
        child.expect(
            r"\[12 tokens, [\d.]+ tok/s, ttft \d+ ms, latency [\d.]+ s, length\]"
        )
        answers = [child.before]
        child.expect_exact(PROMPT)
        # greedy is deterministic: the same prompt streams the same text
        child.sendline("First Citizen:")
        child.expect(r"\[12 tokens")
        answers.append(child.before)
        assert answers[0] == answers[1] and len(answers[0]) > len("First Citizen:")
        child.expect_exact(PROMPT)
        # Ctrl-C in the middle of a long generation: stops it, not the program
        child.sendline("set max_length 4000")
        child.expect_exact(PROMPT)
        child.sendline("Second Citizen:")
        child.expect(r"Second Citizen:\r?\n[\s\S]{20}")  # streamed text has arrived
        child.sendintr()
        child.expect_exact("[interrupted]")
        child.expect(r"\[(\d+) tokens, .*interrupted\]")
        assert 0 < int(child.match.group(1)) < 4000
        child.expect_exact(PROMPT)
        child.sendline("stats")
        child.expect(r"3 generations, (\d+) tokens")
        child.expect_exact(PROMPT)
        # bad input: a message and the prompt back, settings unchanged
        for line, message in BAD_LINES:
            child.sendline(line)
            child.expect_exact(message)
            child.expect_exact(PROMPT)
        child.sendline("help")
        child.expect(r"max_new_tokens=4000, temperature=0\.0, top_k=50, top_p=0\.9")
        child.expect_exact(PROMPT)
        child.sendline("   ")  # an empty prompt generates nothing
        child.expect_exact(PROMPT)
        child.sendline("set max_length 3")
        child.expect_exact(PROMPT)
        child.sendline("settle down")  # a prompt that starts like a command
        child.expect(r"\[3 tokens")
        child.expect_exact(PROMPT)
        child.sendline("quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_repl_ctrl_d_exits_in_process(tokenizer, monkeypatch, capsys):
    """Ctrl-D (EOF at the prompt) leaves the REPL, here without a process start."""
    from hmst.cli.inference import repl
    from hmst.generation import SamplingParams
    from hmst.generation.text import TextGenerator

    lines = iter(["set top_k 7", "help"])

    def fake_input(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    model = BaseMoEModel(config=tiny_config()).eval()
    repl(TextGenerator(model, tokenizer), SamplingParams())  # returns: no hang
    assert "top_k=7" in capsys.readouterr().out
