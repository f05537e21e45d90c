"""Train early-exit heads on a frozen model, tune the exit threshold, save both.

    python -m hmst.training.early_exit_train --checkpoint checkpoints/micro/best \\
        --output checkpoints/micro/early_exit [--steps 300] [--data FILE]

Splits (characters, cut at line ends, as train.py): the last `--val-split` of the
corpus is held out, as in train.py (or all of `--val-file`, the base model's own
validation text). `--tune-on heldout` (default): its windows
alternate between the tuning slice (even) and the test slice (odd), so both are text
the base model never trained on, from the same stretch of the corpus (its two halves
differ: 109 vs 213 full-model ppl on the micro model). `--tune-on train-tail`: the
tuning slice is the last `--tune-fraction` of the training split and the test slice
all of the held-out tail. Heads never train on either slice.

Phase 1, heads: self-distillation KL(p_L || p_l) from the frozen model's final
distribution plus next-token CE. Phase 2, confidences, on the frozen heads: each
probe's pre-sigmoid score z_l regresses logit(exp(-KL)) ~ -log KL by least squares
over `--conf-windows` training windows (a log scale: what separates exits is whether
KL is 0.001 or 0.01, which a BCE against exp(-KL) ~ 1 - KL barely sees; on the micro
model it took the tuned saving from 8.9% at +1.20% ppl to 12.7% at +0.82%).
Phase 3 (`--kv-fill learned`, the default): the K/V fill maps, by ridge regression
(`fit_kv_fill`; on the fact-QA LM it raised the saving at +1% ppl from 24% to 33%).
Tuning: for each `--depth-bonus` a, the threshold with the largest saving of block
evaluations whose tuning-slice perplexity is at most `--max-ppl-increase` x (1 -
`--tune-margin`) above the full model's; the (a, threshold) that saves most is kept.
The margin (default 10%) is there because a threshold tuned right at the limit lands
on either side of it on unseen text: on the fact-QA LM, tuned at +1.00% it measured
+1.07% on the test slice.

DIR gets `early_exit.json` (config incl. threshold, base-model fingerprint, results)
and `early_exit.safetensors`, written atomically (`write_dir_atomic`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time

PROG = "early_exit_train"
CONFIG_FILE = "early_exit.json"
WEIGHTS_FILE = "early_exit.safetensors"
FORMAT = "hmst-early-exit-v1"
TUNE_ON = ("heldout", "train-tail")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="model checkpoint directory")
    p.add_argument("--output", required=True, help="directory for the exit heads")
    p.add_argument("--data", default="data/tinyshakespeare.txt", help="text corpus")
    p.add_argument("--val-split", type=float, default=0.1, help="held-out test tail")
    p.add_argument("--val-file", help="held-out text instead of the --data tail "
                   "(the base model's own validation file)")  # fmt: skip
    p.add_argument("--tune-on", choices=TUNE_ON, default="heldout",
                   help="where the threshold is tuned (see above)")  # fmt: skip
    p.add_argument("--tune-fraction", type=float, default=0.05,
                   help="with --tune-on train-tail: its tail to tune on")  # fmt: skip
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--kl-weight", type=float, default=0.5, help="KL vs CE mix")
    p.add_argument("--adapter-rank", type=int, default=64)
    p.add_argument("--conf-hidden", type=int, default=0, help="0: linear probe")
    p.add_argument("--conf-windows", type=int, default=400,
                   help="training windows to fit the confidences on")  # fmt: skip
    p.add_argument("--conf-epochs", type=int, default=8)
    p.add_argument("--kv-fill", choices=("copy", "learned"), default="learned",
                   help="K/V of skipped blocks: exit state through their k/v, "
                   "or a fitted map (early_exit.py)")  # fmt: skip
    p.add_argument("--exit-layers", type=int, nargs="+", default=None,
                   help="blocks with a head (default: all intermediate)")  # fmt: skip
    p.add_argument("--max-ppl-increase", type=float, default=0.01,
                   help="the allowed ppl increase on unseen text")  # fmt: skip
    p.add_argument("--tune-margin", type=float, default=0.1,
                   help="tune at --max-ppl-increase x (1 - this)")  # fmt: skip
    p.add_argument("--retune", action="store_true",
                   help="only re-tune the heads already in --output (e.g. at "
                   "another --max-ppl-increase)")  # fmt: skip
    p.add_argument("--depth-bonus", type=float, nargs="+", default=[0.0, 1.0, 2.0],
                   help="depth bonuses to tune over (early_exit.py)")  # fmt: skip
    p.add_argument("--tune-windows", type=int, default=None, help="default: all")
    p.add_argument("--test-windows", type=int, default=None, help="default: all")
    p.add_argument("--num-threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=1337)
    return p


def fail(msg: str) -> None:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    sys.exit(2)


# -- save / load -----------------------------------------------------------------------


def model_fingerprint(model) -> str:
    """Hash of the embedding (= tied head) the heads were trained against."""
    w = model.embed.weight.detach().float().cpu().contiguous()
    return hashlib.sha256(w.numpy().tobytes()).hexdigest()[:16]


def save_heads(path: str, heads, model, meta: dict | None = None) -> None:
    from safetensors.torch import save_model

    from hmst.checkpoint import write_dir_atomic

    doc = dict(
        format=FORMAT,
        config=heads.config.to_dict(),
        base=dict(
            fingerprint=model_fingerprint(model),
            n_layers=model.config.n_layers,
            d_model=model.config.d_model,
            vocab_size=model.config.vocab_size,
        ),
        meta=meta or {},
    )

    def write(tmp):
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(doc, f, indent=2)
        save_model(heads, os.path.join(tmp, WEIGHTS_FILE))

    write_dir_atomic(path, write)


def load_heads(path: str, model):
    """Exit heads saved by `save_heads`, checked against `model` (raises ValueError
    if they were trained for another model, FileNotFoundError if absent)."""
    from safetensors.torch import load_model

    from hmst.models.early_exit import EarlyExitConfig, EarlyExitHeads

    cfg_file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"no early-exit heads ({CONFIG_FILE}) in {path}")
    with open(cfg_file) as f:
        doc = json.load(f)
    if doc.get("format") != FORMAT:
        raise ValueError(f"{cfg_file}: unknown format {doc.get('format')!r}")
    if doc["base"]["fingerprint"] != model_fingerprint(model):
        raise ValueError(f"early-exit heads in {path} were trained for another model")
    heads = EarlyExitHeads(model.config, EarlyExitConfig(**doc["config"]))
    load_model(heads, os.path.join(path, WEIGHTS_FILE), strict=True)
    return heads.to(model.embed.weight.device)


# -- data ------------------------------------------------------------------------------


def prepare_splits(
    tokenizer,
    data: str,
    seq_len: int,
    val_split: float,
    tune_fraction: float,
    tune_on: str = "heldout",
    val_file: str | None = None,
):
    """(train token ids, tuning windows, test windows); see the module docstring."""
    from hmst.data import read_documents, split_documents_tail, tokenize_documents

    if tune_on not in TUNE_ON:
        raise ValueError(f"tune_on must be one of {TUNE_ON}, got {tune_on!r}")
    if val_file:
        train, heldout = read_documents([data]), read_documents([val_file])
    else:
        train, heldout = split_documents_tail(read_documents([data]), val_split)
    if tune_on == "heldout":
        windows = windows_of(tokenize_documents(tokenizer, heldout), seq_len, None)
        return tokenize_documents(tokenizer, train), windows[0::2], windows[1::2]
    train, tune = split_documents_tail(train, tune_fraction)
    train, tune, test = (
        tokenize_documents(tokenizer, d) for d in (train, tune, heldout)
    )
    return train, windows_of(tune, seq_len, None), windows_of(test, seq_len, None)


def split_args(heads_dir: str) -> dict:
    """The split a saved set of heads was tuned with (`prepare_splits` kwargs)."""
    with open(os.path.join(heads_dir, CONFIG_FILE)) as f:
        meta = json.load(f)["meta"]
    return dict(
        val_split=meta.get("val_split", 0.1),
        val_file=meta.get("val_file"),
        tune_fraction=meta.get("tune_fraction", 0.05),
        tune_on=meta.get("tune_on", "train-tail"),  # heads saved before the option
    )


def windows_of(ids, seq_len: int, max_windows: int | None):
    from hmst.data import TokenData, eval_windows

    return eval_windows(TokenData([ids]), seq_len, max_windows or 10**9)


def window_batches(windows, batch_size: int):
    """The windows as (B, seq_len + 1) int64 tensors, `batch_size` at a time."""
    import numpy as np
    import torch

    for i in range(0, len(windows), batch_size):
        yield torch.from_numpy(np.stack(windows[i : i + batch_size]).astype(np.int64))


def exit_log_probs(model, heads, x_BT):
    """Full-model states of `x_BT` [(B, T, D)] * L, the final log-probs (B, T, V) and
    each exit head's log-probs {layer: (B, T, V)} on them (no grad)."""
    import torch
    import torch.nn.functional as F

    from hmst.models.early_exit import base_hidden_states

    with torch.no_grad():
        hs, final = base_hidden_states(model, x_BT)
        heads_lp = {
            layer: F.log_softmax(heads.logits(model, layer, hs[layer]).float(), -1)
            for layer in heads.config.exit_layers
        }
        return hs, F.log_softmax(final.float(), -1), heads_lp


def kl_to_final(p_L, logp_L, logp):
    """Per-token KL(p_L || p_l) (...) from the final probs and log-probs and a head's
    log-probs (..., V); p_L = logp_L.exp() is passed in, computed once per batch."""
    return (p_L * (logp_L - logp)).sum(-1)


def sample_windows(ids, seq_len: int, n: int, seed: int):
    """`n` of the non-overlapping windows of `ids`, drawn without replacement."""
    import numpy as np

    windows = windows_of(ids, seq_len, None)
    pick = np.random.default_rng(seed).permutation(len(windows))[:n]
    return [windows[i] for i in sorted(pick)]


# -- training --------------------------------------------------------------------------


def head_losses(model, heads, x, y, kl_weight: float):
    """Per exit layer: kl_weight * KL(p_L || p_l) + (1 - kl_weight) * CE (the heads
    only; the confidences are fitted after, by `fit_confidence`). Returns (total loss,
    {layer: mean KL})."""
    import torch.nn.functional as F

    from hmst.models.early_exit import base_hidden_states

    hs, final = base_hidden_states(model, x)
    logp_L = F.log_softmax(final.float(), -1)
    p_L = logp_L.exp()
    total, kls = 0.0, {}
    for layer in heads.config.exit_layers:
        logp = F.log_softmax(heads.logits(model, layer, hs[layer]).float(), -1)
        kl_BT = kl_to_final(p_L, logp_L, logp)
        ce = F.nll_loss(logp.flatten(0, 1), y.flatten())
        total = total + kl_weight * kl_BT.mean() + (1 - kl_weight) * ce
        kls[layer] = kl_BT.mean().item()
    return total / len(heads.config.exit_layers), kls


KL_FLOOR = 1e-4  # nats; below it every token is as safe to exit (bounds the target)


def confidence_target(kl):
    """logit(exp(-KL)) = -log(expm1(KL)): the pre-sigmoid score whose sigmoid is
    exp(-KL), ~ -log KL for small KL."""
    import torch

    return -torch.log(torch.expm1(kl.clamp_min(KL_FLOOR)))


def exit_features(model, heads, windows, batch_size: int = 8):
    """Per exit layer: the residual streams (N, D) and each token's KL(p_L || p_l)
    (N,) over `windows`, from the full model's states and the frozen heads."""
    import torch

    layers = heads.config.exit_layers
    xs, kls = {k: [] for k in layers}, {k: [] for k in layers}
    for w in window_batches(windows, batch_size):
        hs, logp_L, logps = exit_log_probs(model, heads, w[:, :-1])
        p_L = logp_L.exp()
        for layer in layers:
            kls[layer].append(kl_to_final(p_L, logp_L, logps[layer]).flatten())
            xs[layer].append(hs[layer].flatten(0, 1))
    return {k: (torch.cat(xs[k]), torch.cat(kls[k])) for k in layers}


def fit_confidence(model, heads, windows, epochs: int, seed: int, lr: float = 1e-3):
    """Phase 2: refit every confidence probe from scratch on the frozen heads, by least
    squares on `confidence_target(KL)`, minibatches of 512 tokens. Returns
    {layer: final training MSE}."""
    import torch
    import torch.nn.functional as F

    from hmst.models.early_exit import confidence_mlp

    g = torch.Generator().manual_seed(seed)
    feats, mse = exit_features(model, heads, windows), {}
    cfg, D = heads.config, model.config.d_model
    for layer, (x_ND, kl_N) in feats.items():
        torch.manual_seed(seed + layer)
        probe = confidence_mlp(D, cfg.conf_hidden).to(x_ND.device)
        heads.conf[heads.slot[layer]] = probe
        opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-4)
        target = confidence_target(kl_N)
        for _ in range(epochs):
            perm = torch.randperm(len(target), generator=g)
            for b in range(0, len(perm), 512):
                k = perm[b : b + 512]
                loss = F.mse_loss(heads.confidence_logit(layer, x_ND[k]), target[k])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        with torch.no_grad():
            mse[layer] = F.mse_loss(heads.confidence_logit(layer, x_ND), target).item()
    heads.eval().requires_grad_(False)
    return mse


def fit_kv_fill(model, heads, windows, ridge: float = 1e-3, batch_size: int = 8):
    """Phase 3 (`kv_fill="learned"`): each map (l, j) is the ridge regression, over
    `windows` of the full model's states, of block j's projected keys/values
    [k_proj, v_proj](attn_norm(h_{j-1})) on [rms_norm(h_l), 1] (float64 normal
    equations; `ridge` x the mean diagonal). Returns {"l_j": R^2 of the fit}."""
    import torch

    with torch.no_grad():
        return _fit_kv_fill(model, heads, windows, ridge, batch_size)


def _fit_kv_fill(model, heads, windows, ridge, batch_size):
    import torch
    import torch.nn.functional as F

    from hmst.models.early_exit import base_hidden_states

    eps = model.config.norm_eps
    stats = {}  # name -> [X^T X, X^T Y, sum Y, sum Y^2, n]
    for w in window_batches(windows, batch_size):
        hs, _ = base_hidden_states(model, w[:, :-1])
        hs = [h.flatten(0, 1) for h in hs]
        for name in heads.kv_maps:
            l, j = map(int, name.split("_"))
            x = F.rms_norm(hs[l], (hs[l].shape[-1],), eps=eps).double()
            x = torch.cat([x, torch.ones_like(x[:, :1])], 1)
            attn, h = model.layers[j].attn, model.layers[j].attn_norm(hs[j - 1])
            y = torch.cat([attn.k_proj(h), attn.v_proj(h)], 1).double()
            s = stats.setdefault(name, [0.0, 0.0, 0.0, 0.0, 0])
            s[0] = s[0] + x.T @ x
            s[1] = s[1] + x.T @ y
            s[2], s[3], s[4] = s[2] + y.sum(0), s[3] + (y * y).sum(0), s[4] + len(y)
    r2 = {}
    for name, (xx, xy, ys, yy, n) in stats.items():
        reg = ridge * xx.diagonal().mean() * torch.eye(len(xx), dtype=xx.dtype)
        W = torch.linalg.solve(xx + reg, xy)  # (D + 1, 2 Hkv Dh)
        lin = heads.kv_maps[name]
        lin.weight.copy_(W[:-1].T.to(lin.weight))
        lin.bias.copy_(W[-1].to(lin.bias))
        # R^2 = 1 - SSE / SST; SSE = y'y - 2 W'X'y + W'X'XW, summed over outputs.
        sse = (yy.sum() - 2 * (W * xy).sum() + (W * (xx @ W)).sum()).item()
        sst = (yy - ys * ys / n).sum().item()
        r2[name] = 1.0 - sse / max(sst, 1e-12)
    return r2


def train_heads(model, heads, train_ids, steps, batch_size, lr, kl_weight, seed):
    import torch

    from hmst.data import BatchSampler, TokenData
    from hmst.training.optim import build_scheduler

    model.eval().requires_grad_(False)
    heads.train()
    sampler = BatchSampler(TokenData([train_ids]), model.config.max_seq_len, seed)
    opt = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=0.0)
    sched = build_scheduler(opt, min(20, steps // 10 + 1), steps, 0.1)
    t0, log = time.time(), []
    for step in range(1, steps + 1):
        x, y = sampler.next_batches(batch_size, 1, 0, 1)[0]
        loss, kls = head_losses(model, heads, x, y, kl_weight)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if step % 25 == 0 or step == steps:
            kl_txt = " ".join(f"KL{k} {v:.3f}" for k, v in kls.items())
            print(f"step {step}/{steps} loss {loss.item():.4f} {kl_txt} "
                  f"({time.time() - t0:.0f}s)", flush=True)  # fmt: skip
            log.append(dict(step=step, loss=loss.item(), kl=kls))
    heads.eval()
    return log


# -- evaluation and tuning -------------------------------------------------------------


def evaluate_exit(model, heads, windows, threshold, batch_size: int = 8, rule=None):
    """Teacher-forced ppl of the emitted distributions and exact layer counts."""
    import torch
    import torch.nn.functional as F

    from hmst.models.early_exit import early_exit_forward, layer_counts

    nats, exits = 0.0, []
    for w in window_batches(windows, batch_size):
        out = early_exit_forward(model, heads, w[:, :-1], threshold, rule)
        nats += F.cross_entropy(
            out["logits"].flatten(0, 1).float(), w[:, 1:].flatten(), reduction="sum"
        ).item()
        exits.append(out["exit_layer"].flatten())
    exit_layer = torch.cat(exits)
    L = model.config.n_layers
    res = layer_counts(exit_layer, L)
    res.update(
        threshold=threshold,
        loss=nats / res["tokens"],
        ppl=math.exp(nats / res["tokens"]),
        exit_hist=torch.bincount(exit_layer, minlength=L).tolist(),
    )
    return res


ORACLE_LAMS = (0.0, 0.005, 0.01, 0.02, 0.025, 0.03, 0.05, 0.1, 0.2)


def exit_oracle(model, heads, windows, lams=ORACLE_LAMS, batch_size: int = 8):
    """What any exit rule could reach with these heads: per token, exit at the block
    minimising KL(p_L || p_l) - lam * (blocks saved), knowing every head's KL
    (computed from the full model's states, so the K/V fill is not modelled). One row
    per lam: saved fraction and the test ppl of the chosen heads' distributions. A
    learned confidence only estimates that KL, so this bounds it from above."""
    import torch

    L = model.config.n_layers
    layers = list(heads.config.exit_layers) + [L - 1]
    kls, nlls = [], []
    for w in window_batches(windows, batch_size):
        y = w[:, 1:, None]
        _, logp_L, logps = exit_log_probs(model, heads, w[:, :-1])
        p_L = logp_L.exp()
        kl = [kl_to_final(p_L, logp_L, logps[i]).flatten() for i in layers[:-1]]
        nll = [-logps[layer].gather(-1, y).flatten() for layer in layers[:-1]]
        kl.append(torch.zeros_like(kl[0]))
        nll.append(-logp_L.gather(-1, y).flatten())
        kls.append(torch.stack(kl, 1))
        nlls.append(torch.stack(nll, 1))
    kl, nll = torch.cat(kls).double(), torch.cat(nlls).double()
    saved = torch.tensor([L - 1 - layer for layer in layers], dtype=torch.float64)
    full = nll[:, -1].mean()
    rows = []
    for lam in lams:
        pick = (kl - lam * saved).argmin(1)
        loss = nll.gather(1, pick[:, None]).mean()
        rows.append(
            dict(
                lam=lam,
                saved_fraction=float(saved[pick].mean() / L),
                ppl=math.exp(float(loss)),
                d_ppl=math.exp(float(loss - full)) - 1.0,
            )
        )
    return rows


def candidate_thresholds(model, heads, windows, batch_size: int = 8):
    """Thresholds at which ~5%..98% of tokens would exit somewhere, read off the
    confidences of the full-depth states (a cheap guide; every candidate is then
    evaluated exactly)."""
    import torch

    from hmst.models.early_exit import base_hidden_states

    best = []
    with torch.no_grad():
        for w in window_batches(windows, batch_size):
            hs, _ = base_hidden_states(model, w[:, :-1])
            conf = torch.stack(
                [
                    heads.confidence(model, layer, hs[layer], "learned")[0]
                    for layer in heads.config.exit_layers
                ]
            )
            best.append(conf.amax(0).flatten())
    best = torch.cat(best).double()
    qs = torch.tensor(
        [0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.02]
    )
    taus = torch.quantile(best, qs.double()).tolist() + [0.0]  # 0: all exit
    return sorted(set(taus), reverse=True)


def tune_threshold(
    model, heads, windows, max_increase: float, refine: int = 4, full=None
):
    """Largest saving with ppl <= (1 + max_increase) * full ppl on `windows`:
    exact evaluation of the candidate grid, then bisection between the best passing
    candidate and the next lower one (which failed). `full`: the full model's row on
    `windows`, if already evaluated.
    Returns (threshold or None, full-model row, rows)."""
    from hmst.models.early_exit import NEVER

    full = full or evaluate_exit(model, heads, windows, NEVER)
    limit = full["ppl"] * (1 + max_increase)
    rows = [
        evaluate_exit(model, heads, windows, tau)
        for tau in candidate_thresholds(model, heads, windows)
    ]  # descending threshold: ascending saving
    passing = [r for r in rows if r["ppl"] <= limit]
    ok = max(passing, key=lambda r: r["saved_fraction"]) if passing else None
    lower = [r for r in rows if ok and r["threshold"] < ok["threshold"]]
    bad = next((r for r in lower if r["ppl"] > limit), None)
    for _ in range(refine if ok is not None and bad is not None else 0):
        tau = 0.5 * (ok["threshold"] + bad["threshold"])
        r = evaluate_exit(model, heads, windows, tau)
        rows.append(r)
        if r["ppl"] <= limit and r["saved_fraction"] >= ok["saved_fraction"]:
            ok = r
        else:
            bad = r
    rows.sort(key=lambda r: -r["threshold"])
    return (ok["threshold"] if ok else None), full, rows


def format_row(name, r, base_ppl) -> str:
    return (
        f"{name:<14} {r['ppl']:>9.3f} {100 * (r['ppl'] / base_ppl - 1):>+7.2f}% "
        f"{r['layers_per_token']:>7.3f} {100 * r['saved_fraction']:>6.1f}%  "
        f"{r['exit_hist']}"
    )


TABLE_HEAD = (
    f"{'threshold':<14} {'ppl':>9} {'d_ppl':>8} {'layers':>7} {'saved':>7}  exits"
)


# -- entry point -----------------------------------------------------------------------


TRAIN_META = ("steps", "batch_size", "kl_weight", "conf_windows", "conf_mse",
              "kv_fill_r2", "train_log")  # fmt: skip


def train_phases(model, heads, train, seq: int, args) -> dict:
    """Phases 1-3 (module docstring) on the training tokens; their record."""
    log = train_heads(model, heads, train, args.steps, args.batch_size, args.lr,
                      args.kl_weight, args.seed)  # fmt: skip
    conf_w = sample_windows(train, seq, args.conf_windows, args.seed)
    conf_mse = fit_confidence(model, heads, conf_w, args.conf_epochs, args.seed)
    print(f"confidence probes fitted on {len(conf_w)} windows: MSE "
          + " ".join(f"{k}: {v:.3f}" for k, v in conf_mse.items()))  # fmt: skip
    kv_r2 = fit_kv_fill(model, heads, conf_w) if heads.kv_maps else {}
    if kv_r2:
        print("learned K/V fill, R^2 per (exit, block): "
              + " ".join(f"{k}: {v:.3f}" for k, v in kv_r2.items()))  # fmt: skip
    return dict(
        steps=args.steps, batch_size=args.batch_size, kl_weight=args.kl_weight,
        conf_windows=len(conf_w), conf_mse=conf_mse, kv_fill_r2=kv_r2, train_log=log,
    )  # fmt: skip


def run(args) -> dict:
    import torch

    from hmst.checkpoint import load_pretrained, resolve
    from hmst.models.early_exit import EarlyExitConfig, EarlyExitHeads, NEVER

    torch.manual_seed(args.seed)
    ckpt = resolve(args.checkpoint)
    if os.path.abspath(args.output.rstrip("/")) == os.path.abspath(ckpt):
        raise ValueError("--output must not be the checkpoint directory itself")
    model, tok, _ = load_pretrained(ckpt)
    model.eval().requires_grad_(False)
    L, seq = model.config.n_layers, model.config.max_seq_len
    if L < 2:
        raise ValueError(f"a {L}-block model has no intermediate block to exit from")
    layers = args.exit_layers or list(range(L - 1))
    if args.retune:  # the trained heads of --output: phases 1-3 skipped
        heads = load_heads(args.output, model).eval()
        with open(os.path.join(args.output, CONFIG_FILE)) as f:
            old_meta = json.load(f)["meta"]
    else:
        cfg = EarlyExitConfig(
            layers, args.adapter_rank, args.conf_hidden, kv_fill=args.kv_fill
        )
        heads = EarlyExitHeads(model.config, cfg).init_from(model)
    train, tune, test = prepare_splits(
        tok, args.data, seq, args.val_split, args.tune_fraction, args.tune_on,
        args.val_file,
    )  # fmt: skip
    print(f"train {len(train):,} tokens | tune {len(tune)} windows | test "
          f"{len(test)} windows of {seq}; "
          f"heads {sum(p.numel() for p in heads.parameters()):,} params")  # fmt: skip
    t0 = time.time()
    if args.retune:
        train_meta = {k: old_meta.get(k) for k in TRAIN_META}
    else:
        train_meta = train_phases(model, heads, train, seq, args)
    train_s = time.time() - t0
    tune_w = tune[: args.tune_windows]
    tune_limit = args.max_ppl_increase * (1 - args.tune_margin)
    print(f"tuning at d_ppl <= {tune_limit:.2%} (--max-ppl-increase "
          f"{args.max_ppl_increase:.2%}, margin {args.tune_margin:.0%})")  # fmt: skip
    best, tune_rows = None, []  # (saved, depth bonus, threshold)
    tune_full = evaluate_exit(model, heads, tune_w, NEVER)  # the same for every a
    for a in args.depth_bonus:
        heads.config.depth_bonus = a
        tau, _, rows = tune_threshold(model, heads, tune_w, tune_limit, full=tune_full)
        print(f"\ntuning slice ({len(tune_w)} windows), depth bonus {a:g}, "
              f"full-model ppl {tune_full['ppl']:.3f}\n{TABLE_HEAD}")  # fmt: skip
        for r in rows:
            r["depth_bonus"] = a
            print(format_row(f"{r['threshold']:.6f}", r, tune_full["ppl"]))
        tune_rows += rows
        if tau is not None:
            saved = next(r for r in rows if r["threshold"] == tau)["saved_fraction"]
            if best is None or saved > best[0]:
                best = (saved, a, tau)
    if best is None:
        print(f"no threshold keeps the ppl increase <= {tune_limit:.2%}: "
              "saving heads with threshold 'never'")  # fmt: skip
    heads.config.depth_bonus = best[1] if best else 0.0
    heads.config.threshold = best[2] if best else NEVER
    print(f"\ntuned: depth bonus {heads.config.depth_bonus:g}, threshold "
          f"{heads.config.threshold:.6f}")  # fmt: skip
    test_w = test[: args.test_windows]
    test_full = evaluate_exit(model, heads, test_w, NEVER)
    test_exit = evaluate_exit(model, heads, test_w, heads.config.threshold)
    print(f"\ntest slice ({len(test_w)} windows, {test_full['tokens']:,} tokens)")
    print(TABLE_HEAD)
    print(format_row("full model", test_full, test_full["ppl"]))
    print(format_row(f"tuned {heads.config.threshold:.4f}", test_exit,
                     test_full["ppl"]))  # fmt: skip
    meta = dict(
        checkpoint=ckpt,
        **train_meta,
        val_split=args.val_split,
        val_file=args.val_file,
        tune_on=args.tune_on,
        tune_fraction=args.tune_fraction,
        train_seconds=round(train_s, 1),
        max_ppl_increase=args.max_ppl_increase,
        tune_margin=args.tune_margin,
        tune=dict(full=tune_full, rows=tune_rows),
        test=dict(full=test_full, early_exit=test_exit),
    )
    save_heads(args.output, heads, model, meta)
    print(f"wrote {args.output}/{CONFIG_FILE} and {WEIGHTS_FILE}")
    return meta


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if not os.path.exists(args.checkpoint):
        fail(f"checkpoint not found: {args.checkpoint}")
    for path in (args.data, args.val_file):
        if path and not os.path.exists(path):
            fail(f"corpus not found: {path}")
    if args.val_file and args.tune_on == "train-tail":
        fail("--val-file needs --tune-on heldout (it splits the held-out file)")
    if not (0.0 < args.val_split < 1.0 and 0.0 < args.tune_fraction < 1.0):
        fail("--val-split and --tune-fraction must be in (0, 1)")
    if not (args.max_ppl_increase > 0.0 and 0.0 <= args.tune_margin < 1.0):
        fail("--max-ppl-increase must be > 0 and --tune-margin in [0, 1)")
    if args.steps < 1 or args.batch_size < 1:
        fail("--steps and --batch-size must be >= 1")
    import torch

    torch.set_num_threads(args.num_threads)
    try:
        return run(args)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))


if __name__ == "__main__":
    main()
