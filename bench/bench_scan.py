"""Selective scan forward+backward: chunked (CPU default) vs the sequential reference.

Shapes as in the issue: batch 1, d_inner 512, fp32, 1 thread, process CPU time.
1. L=4096, d_state 16: ref and chunked timed in interleaved rounds in this process;
   outputs, final state and every gradient compared.
2. Peak memory, one fresh subprocess per (backend, L, d_state): the rise of peak RSS
   (VmHWM) over the RSS just before the forward (tracemalloc cannot see torch's
   allocations), and the largest tensor any op produced (a TorchDispatchMode pass,
   untimed) against the size of a (B, L, d_inner, d_state) tensor.
3. d_state 256 (the design's): chunked at L=4096 and 8192; the reference only at
   L=512, because autograd through its time loop keeps ~5 (B, d_inner, d_state)
   tensors per token (1.3 GB measured at L=512: ~10 GB at L=4096) on a shared 23 GB
   machine.

    python bench/bench_scan.py [--rounds 3] [--out bench/results/scan.txt]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hmst.kernels.scan import (  # noqa: E402
    LargestTensor,
    chunk_plan,
    selective_scan_chunked,
    selective_scan_ref,
)

FNS = {"ref": selective_scan_ref, "chunked": selective_scan_chunked}
D_INNER = 512


def make_inputs(L, n, seed=0):
    """Mamba-like inputs: delta = softplus(...) in ~[1e-3, 1e-1], A = -(1..N)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(1, L, D_INNER, generator=g)
    delta = torch.exp(torch.rand(1, L, D_INNER, generator=g) * 4.6 - 6.9)
    A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(D_INNER, 1)
    B = torch.randn(1, L, n, generator=g)
    C = torch.randn(1, L, n, generator=g)
    D = torch.ones(D_INNER)
    h0 = torch.randn(1, D_INNER, n, generator=g) * 0.1
    return [t.requires_grad_() for t in (u, delta, A, B, C, D, h0)]


def fwd_bwd(backend, args):
    """Returns (fwd s, bwd s, y, h, grads); the loss weights y and the final state."""
    for a in args:
        a.grad = None
    t0 = time.process_time()
    y, h = FNS[backend](*args)
    t1 = time.process_time()
    (y.sum() + h.square().sum()).backward()
    t2 = time.process_time()
    return t1 - t0, t2 - t1, y.detach(), h.detach(), [a.grad for a in args]


def proc_status_mb(field):
    """VmRSS (now) or VmHWM (peak) of this process. Not ru_maxrss: Linux carries it
    across fork + exec, so a child would report its parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(backend, L, n):
    """One measurement in a fresh process: prints a JSON line."""
    torch.set_num_threads(1)
    args = make_inputs(L, n)
    fwd_bwd(backend, make_inputs(8, n))  # warm up kernels outside the measurement
    before = proc_status_mb("VmRSS")
    fwd_s, bwd_s, *_ = fwd_bwd(backend, args)
    peak = proc_status_mb("VmHWM")
    with LargestTensor() as mode:
        fwd_bwd(backend, args)
    print(
        json.dumps(
            dict(
                backend=backend,
                L=L,
                d_state=n,
                fwd_s=fwd_s,
                bwd_s=bwd_s,
                rss_before_mb=before,
                peak_rise_mb=peak - before,
                largest_numel=mode.largest,
                full_numel=L * D_INNER * n,
            )
        )
    )


def measure_in_subprocess(backend, L, n):
    cmd = [sys.executable, __file__, "--worker", backend, str(L), str(n)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def max_err(a, b):
    return (a - b).abs().max().item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="bench/results/scan.txt")
    ap.add_argument("--worker", nargs=3, metavar=("BACKEND", "L", "N"))
    a = ap.parse_args()
    if a.worker:
        worker(a.worker[0], int(a.worker[1]), int(a.worker[2]))
        return
    torch.set_num_threads(1)
    lines = []

    def out(s=""):
        print(s, flush=True)
        lines.append(s)

    L, n = 4096, 16
    T, nc = chunk_plan(L)
    out(f"# selective scan fwd+bwd, batch 1, d_inner {D_INNER}, fp32, 1 thread")
    out(f"torch {torch.__version__}; chunk T={T}, {nc} chunks at L={L}")
    out()
    out(f"## 1. L={L}, d_state {n}: interleaved rounds (process CPU seconds)")
    args = make_inputs(L, n)
    fwd_bwd("chunked", make_inputs(8, n))
    times = {"ref": [], "chunked": []}
    results = {}
    for r in range(a.rounds):
        for backend in ("ref", "chunked"):
            f, b, y, h, grads = fwd_bwd(backend, args)
            times[backend].append((f, b))
            results[backend] = (y, h, grads)
            out(
                f"round {r} {backend:8s} fwd {f:7.3f}  bwd {b:7.3f}  total {f + b:7.3f}"
            )
    med = {k: statistics.median(f + b for f, b in v) for k, v in times.items()}
    out(
        f"median total: ref {med['ref']:.3f} s, chunked {med['chunked']:.3f} s "
        f"-> speed-up {med['ref'] / med['chunked']:.1f}x"
    )
    (y_r, h_r, g_r), (y_c, h_c, g_c) = results["ref"], results["chunked"]
    names = ("u", "delta", "A", "B", "C", "D", "h0")
    errs = {"y": max_err(y_c, y_r), "h_L": max_err(h_c, h_r)}
    errs.update({f"d{k}": max_err(gc, gr) for k, gc, gr in zip(names, g_c, g_r)})
    out("max |chunked - ref|: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    rel = {
        f"d{k}": max_err(gc, gr) / gr.abs().max().item()
        for k, gc, gr in zip(names, g_c, g_r)
    }
    out("relative to max |ref|: " + ", ".join(f"{k} {v:.1e}" for k, v in rel.items()))
    del args, results

    out()
    out("## 2. peak memory, one subprocess each (MB; full = B*L*d_inner*d_state fp32)")
    header = "backend  L     d_state  fwd_s   bwd_s   RSS rise  largest tensor  full"
    out(header)
    for backend, L_, n_ in (
        ("ref", 4096, 16),
        ("chunked", 4096, 16),
        ("ref", 512, 256),
        ("chunked", 512, 256),
        ("chunked", 4096, 256),
        ("chunked", 8192, 256),
    ):
        m = measure_in_subprocess(backend, L_, n_)
        out(
            f"{backend:8s} {L_:5d} {n_:7d}  {m['fwd_s']:6.2f}  {m['bwd_s']:6.2f}  "
            f"{m['peak_rise_mb']:8.0f}  {m['largest_numel'] * 4 / 2**20:12.1f}  "
            f"{m['full_numel'] * 4 / 2**20:8.0f}"
        )
    out()
    out(
        "design scale for reference: (1, 8192, 2048, 256) fp32 = "
        f"{8192 * 2048 * 256 * 4 / 2**30:.1f} GiB"
    )
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        f.write("$ python bench/bench_scan.py " + " ".join(sys.argv[1:]) + "\n")
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
