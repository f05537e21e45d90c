"""Decode speed: hmst's KV-cached generation vs HF transformers Mixtral `generate()`.

Matched micro config (d_model 256, 4 layers, 8 heads, 8 experts top-2, ff 1024,
vocab 8192), random weights (speed does not depend on them), greedy, prompt 32 tokens,
128 new (HF forced to full length by min_new_tokens), batch 1 and 8, 1 thread.

Peers, each timed in the same process, interleaved, median over rounds:
  hmst            fp32, `fast_logits` + small-row matmuls (`prepare_for_inference`),
                  up to 4 rows by the native kernel (`hmst.kernels.native`) if built
  hmst-mkl        the same with MKL's few-row forms only (when the kernel is built)
  hmst-reference  fp32, the model's own forward (the plain path, for comparison)
  hmst-int8       `--quantize int8` (dynamic int8 Linear layers, fp32 router)
  hmst-compile    with --compile: torch.compile(fast_logits, dynamic=True) (measured
                  slower than hmst on this CPU, so inference.py does not use it)
  hf-<impl>       MixtralForCausalLM, sdpa attention, each `experts_implementation`
                  asked for (batched_mm is left out by default: 35.6 tok/s at batch 1,
                  19 at batch 8 on the reference machine, 6-20x slower than the others)

Time-to-first-token is the prefill + first token (HF: generate() with 1 new token).
Decode tok/s = batch * (new - 1) / (total - ttft). Times are process CPU time (steadier
than wall time on a shared machine, and equal to it at 1 thread when not preempted);
`--clock wall` switches. The ratios compare hmst and hmst-int8 to the fastest HF peer.

`--drift CHECKPOINT` also measures what int8 costs in quality on a trained model:
validation loss, relative logit error, top-1 agreement (teacher-forced, on the last 10%
of data/tinyshakespeare.txt) and agreement of greedy continuations.

    python bench/bench_decode.py [--threads 1] [--rounds 5] [--quick] [--compile]
                                 [--drift checkpoints/micro/best]
"""

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import build_mixtral  # noqa: E402
from hmst.configs.model_config import ModelConfig  # noqa: E402
from hmst.generation.fast_forward import (  # noqa: E402
    fast_logits,
    prepare_for_inference,
)
from hmst.generation.generate import generate_stream  # noqa: E402
from hmst.generation.quantize import quantize_int8  # noqa: E402
from hmst.kernels import native  # noqa: E402
from hmst.generation.sampling import SamplingParams  # noqa: E402
from hmst.models.base_moe import BaseMoEModel  # noqa: E402

TARGETS = {1: 2.0, 8: 1.5}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_hf(cfg: ModelConfig, impl: str):
    return build_mixtral(cfg, impl, router_logits=False).eval()


def time_hmst(model, backend, prompt, new_tokens, clock):
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    t0 = clock()
    stream = generate_stream(model, prompt.tolist(), params, backend=backend)
    next(stream)
    ttft = clock() - t0
    n = 1 + sum(1 for _ in stream)
    return ttft, clock() - t0, n


@torch.no_grad()
def time_hf(model, prompt, new_tokens, clock):
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    t0 = clock()
    model.generate(prompt, max_new_tokens=1, min_new_tokens=1, **kw)
    ttft = clock() - t0
    t0 = clock()
    out = model.generate(
        prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw
    )
    return ttft, clock() - t0, out.shape[1] - prompt.shape[1]


@torch.no_grad()
def int8_drift(path, windows=16, width=128, new_tokens=64):
    from hmst.checkpoint import load_pretrained

    model, tok, _ = load_pretrained(path)
    model.eval()
    q = quantize_int8(model)
    with open(os.path.join(ROOT, "data", "tinyshakespeare.txt"), encoding="utf-8") as f:
        text = f.read()
    ids = torch.tensor(tok.encode(text[int(0.9 * len(text)) :]))
    width = min(width, model.config.max_seq_len)
    starts = torch.linspace(0, len(ids) - width - 2, windows).long()
    x = torch.stack([ids[s : s + width] for s in starts])
    y = torch.stack([ids[s + 1 : s + width + 1] for s in starts])
    ref, got = model(x, targets=y), q(x, targets=y)
    a, b = ref["logits"], got["logits"]
    print(f"\nint8 drift on {path} ({windows} x {width} validation tokens):")
    print(
        f"  val loss fp32 {ref['loss']:.4f}  int8 {got['loss']:.4f} nats/token | "
        f"relative logit error {(b - a).norm() / a.norm():.4f} | top-1 agreement "
        f"{(a.argmax(-1) == b.argmax(-1)).float().mean():.4f}"
    )
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    prompts = x[:8, :32].tolist()
    runs = [
        torch.stack(list(generate_stream(m, prompts, params)), 1)
        for m in (prepare_for_inference(copy.deepcopy(model)), prepare_for_inference(q))
    ]
    same = (runs[0] == runs[1]).float().mean()
    first_diff = [
        int((r0 != r1).nonzero()[0]) if (r0 != r1).any() else new_tokens
        for r0, r1 in zip(*runs)
    ]
    print(
        f"  greedy continuations (8 prompts x {new_tokens}): {same:.3f} of tokens "
        f"equal; identical prefix lengths {first_diff}"
    )


def build_peers(cfg, hf_impls, compile_):
    base = BaseMoEModel(config=cfg).eval()
    fast = prepare_for_inference(copy.deepcopy(base))
    peers = {"hmst": (fast, "fast")}
    if native.available():  # the same without the native kernel: MKL's forms only
        mkl = prepare_for_inference(copy.deepcopy(base), use_native=False)
        peers["hmst-mkl"] = (mkl, "fast")
    peers |= {
        "hmst-reference": (base, "reference"),
        "hmst-int8": (prepare_for_inference(quantize_int8(base)), "fast"),
    }
    if compile_:  # compiled during the warm-up round
        peers["hmst-compile"] = (fast, torch.compile(fast_logits, dynamic=True))
    for impl in hf_impls:
        try:
            m = build_hf(cfg, impl)
            time_hf(m, torch.randint(0, cfg.vocab_size, (1, 8)), 2, time.perf_counter)
            peers[f"hf-{impl}"] = (m, None)
        except Exception as e:  # an implementation unavailable in this install
            print(f"skip hf-{impl}: {type(e).__name__}: {str(e)[:100]}")
    return peers


def run_batch(peers, bs, args, clock):
    prompt = torch.randint(3, 8192, (bs, args.prompt_len))
    res = {k: [] for k in peers}
    for r in range(args.rounds + 1):
        for name, (m, backend) in peers.items():
            if backend is None:
                ttft, total, n = time_hf(m, prompt, args.new_tokens, clock)
            else:
                ttft, total, n = time_hmst(m, backend, prompt, args.new_tokens, clock)
            assert n == args.new_tokens, (name, n)
            if r:  # round 0 warms up
                res[name].append((ttft, bs * (n - 1) / (total - ttft)))
    print(f"\nbatch {bs}:  {'peer':<16}{'ttft ms':>9}{'decode tok/s':>14}")
    med = {}
    for name, rows in res.items():
        ttft = statistics.median(t for t, _ in rows)
        med[name] = statistics.median(s for _, s in rows)
        print(f"{'':10}{name:<16}{1000 * ttft:>9.1f}{med[name]:>14.1f}")
    best_hf = max((k for k in med if k.startswith("hf-")), key=med.get)
    target = TARGETS.get(bs)
    out = []
    for name in ("hmst", "hmst-int8"):
        ratio = med[name] / med[best_hf]
        verdict = (
            ""
            if target is None
            else f"(target >= {target}x) " + ("PASS" if ratio >= target else "FAIL")
        )
        print(f"  {name} / {best_hf} = {ratio:.2f}x {verdict}")
        out.append(f"{name} {ratio:.2f}x")
    return f"batch {bs}: " + ", ".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--hf-impls", nargs="+", default=["eager", "grouped_mm"])
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    p.add_argument("--quick", action="store_true", help="2 rounds, 32 new tokens")
    p.add_argument("--compile", action="store_true", help="add a torch.compile peer")
    p.add_argument("--drift", metavar="CHECKPOINT", help="int8 quality on a checkpoint")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.new_tokens = 2, 32
    print("command: python " + " ".join(sys.argv))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    cfg = ModelConfig(vocab_size=8192, max_seq_len=args.prompt_len + args.new_tokens)
    peers = build_peers(cfg, args.hf_impls, args.compile)
    print(
        f"torch {torch.__version__}, threads {args.threads}, clock {args.clock}, "
        f"prompt {args.prompt_len}, new {args.new_tokens}, rounds {args.rounds}, "
        f"native few-row kernel {'yes' if native.available() else 'no'}"
    )
    summary = [run_batch(peers, bs, args, clock) for bs in args.batch]
    print("\nsummary: " + "; ".join(summary))
    if args.drift:
        int8_drift(args.drift)


if __name__ == "__main__":
    main()
