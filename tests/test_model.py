import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from hmst.configs import get_config
from hmst.generation import SamplingParams, generate_stream
from hmst.models.base_moe import BaseMoEModel
from hmst.models.loss import linear_cross_entropy
from hmst.models.moe import MoE, grouped_experts, load_balance_loss, reference_experts


def test_causality():
    model = BaseMoEModel(config=tiny_config()).eval()
    x = torch.randint(0, 300, (2, 24))
    y = x.clone()
    y[:, 15:] = torch.randint(0, 300, (2, 9))
    a, b = model(x)["logits"], model(y)["logits"]
    assert torch.equal(a[:, :15], b[:, :15])
    assert not torch.allclose(a[:, 15:], b[:, 15:])


@pytest.mark.parametrize("force_idle", [False, True])
def test_grouped_dispatch_matches_reference(force_idle):
    moe = MoE(tiny_config(n_experts=6))
    x = torch.randn(20, 32, requires_grad=True)
    idx = moe.router(x).topk_idx_TK
    if force_idle:  # route to experts 0..3 only: experts 4 and 5 get no tokens
        idx = torch.stack([torch.arange(20) % 4, (torch.arange(20) + 1) % 4], 1)
    counts = torch.bincount(idx.flatten(), minlength=6)
    assert bool((counts[4:] == 0).all()) == force_idle
    params = [x, moe.router.gate.weight] + list(moe.experts.parameters())
    outs, grads = [], []
    for fn in (grouped_experts, reference_experts):
        probs = torch.softmax(x @ moe.router.gate.weight.T, -1)
        gates = probs.gather(1, idx)
        gates = gates / gates.sum(-1, keepdim=True)
        y = fn(x, idx, gates, counts, moe.experts)
        loss = (y * torch.linspace(-1, 1, 32)).sum()
        g = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
        outs.append(y.detach())
        grads.append(g)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # the grouped path keeps idle experts in the graph (DDP needs every parameter)
    y = grouped_experts(x, idx, torch.ones(20, 2) / 2, counts, moe.experts)
    idle = list(moe.experts[5].parameters())
    assert all(
        g is not None for g in torch.autograd.grad(y.sum(), idle, allow_unused=True)
    )


def test_gate_scale_scales_the_routed_output():
    """gate_scale multiplies the renormalised top-k gates (they sum to it), so the
    routed output scales by it and the choice of experts does not change."""
    torch.manual_seed(0)
    one = MoE(tiny_config(n_experts=6))
    two = MoE(tiny_config(n_experts=6, gate_scale=2.0))
    two.load_state_dict(one.state_dict())
    x = torch.randn(2, 10, 32)
    (y1, r1), (y2, r2) = one(x), two(x)
    assert torch.equal(r1.topk_idx_TK, r2.topk_idx_TK)
    torch.testing.assert_close(r2.gates_TK.sum(-1), torch.full((20,), 2.0))
    torch.testing.assert_close(y2, 2 * y1)
    with pytest.raises(ValueError, match="gate_scale"):
        tiny_config(gate_scale=0.0)


def test_load_balance_loss_formula():
    # 4 assignments: expert 0 gets 3, expert 1 gets 1; mean router probs (0.7, 0.3)
    counts = torch.tensor([3, 1])
    probs = torch.tensor([0.7, 0.3])
    expected = 2 * (0.75 * 0.7 + 0.25 * 0.3)  # E * sum f_e P_e = 1.2
    assert load_balance_loss(counts, probs).item() == pytest.approx(expected)
    balanced = load_balance_loss(torch.tensor([5, 5, 5, 5]), torch.full((4,), 0.25))
    assert balanced.item() == pytest.approx(1.0)


@pytest.mark.parametrize("size", ["micro", "tiny", "small", "base", "large"])
def test_preset_param_counts(size):
    cfg = get_config(size).model
    with torch.device("meta"):
        model = BaseMoEModel(config=cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()
    d, f, hd = cfg.d_model, cfg.d_ff, cfg.head_dim
    attn = 2 * d * cfg.n_heads * hd + 2 * d * cfg.kv_heads * hd
    per_layer = attn + d * cfg.n_experts + cfg.num_experts_per_tok * 3 * d * f + 2 * d
    active = cfg.vocab_size * d + cfg.n_layers * per_layer + d
    assert cfg.num_params(active=True) == active


def test_kv_cache_matches_full_forward():
    model = BaseMoEModel(config=tiny_config()).eval()
    x = torch.randint(0, 300, (2, 20))
    full = model(x)["logits"]
    caches = model.allocate_kv_cache(2, 20)
    parts = [model(x[:, :12], kv_caches=caches, pos=0)["logits"]]
    parts += [
        model(x[:, i : i + 1], kv_caches=caches, pos=i)["logits"] for i in range(12, 20)
    ]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=1e-4)


def test_greedy_is_deterministic_and_batch_matches_single():
    model = BaseMoEModel(config=tiny_config()).eval()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    batch = torch.stack(list(generate_stream(model, prompts, params)), 1)
    for i, p in enumerate(prompts):
        alone = torch.stack(list(generate_stream(model, [p], params)), 1)
        assert torch.equal(batch[i], alone[0])
    again = torch.stack(list(generate_stream(model, prompts, params)), 1)
    assert torch.equal(batch, again)


def _losses_and_grads(model, x, **kw):
    """(loss, exit loss or None, every parameter's gradient) of one forward/backward of
    loss + exit loss + aux loss, from zeroed gradients."""
    model.zero_grad()
    out = model(x, targets=x, **kw)
    exit_loss = out.get("exit_loss")
    (out["loss"] + out["aux_loss"] + (0 if exit_loss is None else exit_loss)).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    return out["loss"].detach(), exit_loss, grads, out


def _assert_same(a, b, loss_tol=1e-6, grad_rtol=1e-5):
    for la, lb in zip(a[:2], b[:2]):
        if la is not None:
            torch.testing.assert_close(
                la.detach(), lb.detach(), atol=loss_tol, rtol=1e-5
            )
    for ga, gb in zip(a[2], b[2]):
        torch.testing.assert_close(ga, gb, atol=1e-6, rtol=grad_rtol)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradient_checkpointing_same_grads(dropout):
    """With dropout the recomputed blocks must replay the same masks."""
    model = BaseMoEModel(config=tiny_config(dropout=dropout))
    x = torch.randint(0, 300, (2, 16))
    runs = []
    for flag in (False, True):
        model.gradient_checkpointing_enable(flag)
        torch.manual_seed(1)
        runs.append(_losses_and_grads(model, x))
    _assert_same(*runs)


@pytest.mark.parametrize("vocab", [300, 100_000])  # one chunk / many chunks
def test_fused_linear_cross_entropy_equals_unfused(vocab):
    torch.manual_seed(0)
    h = torch.randn(2, 45, 16, requires_grad=True)
    w = (0.3 * torch.randn(vocab, 16)).requires_grad_()
    t = torch.randint(0, vocab, (2, 45))
    t[0, :7] = -100  # ignored rows (prompt tokens in QA fine-tuning)
    ref = F.cross_entropy(F.linear(h, w).flatten(0, 1), t.flatten(), ignore_index=-100)
    got = linear_cross_entropy(h, w, t)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    g_ref_h, g_ref_w = torch.autograd.grad(3 * ref, (h, w))
    g_h, g_w = torch.autograd.grad(3 * got, (h, w))  # upstream gradient scales
    torch.testing.assert_close(g_h, g_ref_h, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(g_w, g_ref_w, atol=1e-6, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, t), ref.detach())


def test_fused_linear_cross_entropy_under_autocast():
    """bf16 autocast (as `--mixed-precision` runs on GPUs; CPU autocast here): fp32
    loss and gradients of the input dtypes, close to the unfused pair's at bf16
    precision."""
    torch.manual_seed(0)
    h = torch.randn(40, 16, requires_grad=True)
    w = (0.3 * torch.randn(300, 16)).requires_grad_()
    t = torch.randint(0, 300, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(h, w).float(), t)
        got = linear_cross_entropy(h, w, t)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-3)
    for a, b in zip(torch.autograd.grad(got, (h, w)), torch.autograd.grad(ref, (h, w))):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=2e-3, rtol=5e-2)


def test_model_fused_loss_equals_logits_loss():
    model = BaseMoEModel(config=tiny_config())
    x = torch.randint(0, 300, (2, 16))
    runs = [
        _losses_and_grads(model, x, exit_layer=0, return_logits=not fused)
        for fused in (False, True)
    ]
    assert "logits" in runs[0][3] and "logits" not in runs[1][3]
    _assert_same(*runs, loss_tol=1e-5, grad_rtol=1e-4)


def test_expert_bias_changes_routing():
    model = BaseMoEModel(config=tiny_config()).eval()
    x = torch.randint(0, 300, (1, 16))
    bias = torch.tensor([0.0, 0.0, 0.0, 100.0])
    counts = model(x, expert_bias=bias)["expert_counts"]
    assert (counts[:, 3] == 16).all()  # every token picks the favoured expert


def test_balance_bias_update_and_routing(tmp_path):
    """Aux-loss-free balancing: the update follows the sign rule and stays centred;
    the bias picks experts (fast path == forward) but never weighs them; it is saved
    only when the model uses it."""
    from hmst.generation.fast_forward import fast_logits

    model = BaseMoEModel(config=tiny_config(balance_bias_rate=0.1)).eval()
    counts = torch.tensor([[10, 0, 5, 5], [4, 4, 4, 4]])
    model.update_balance_bias(counts)
    b0, b1 = (layer.moe.router.balance_bias for layer in model.layers)
    torch.testing.assert_close(b0, torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    torch.testing.assert_close(b1, torch.zeros(4))  # balanced: unchanged
    x = torch.randint(0, 300, (1, 16))
    plain = model(x)
    b1.copy_(torch.tensor([0.0, 0.0, 50.0, 0.0]))
    out = model(x)
    assert (out["expert_counts"][1, 2] == 16).all()  # every token picks expert 2
    assert not torch.equal(out["logits"], plain["logits"])
    torch.testing.assert_close(out["router_probs"][0], plain["router_probs"][0])
    caches = model.allocate_kv_cache(1, 16)
    torch.testing.assert_close(
        fast_logits(model, x, caches, 0), out["logits"][:, -1], atol=1e-5, rtol=1e-5
    )
    assert "layers.1.moe.router.balance_bias" in model.state_dict()
    model.save_pretrained(str(tmp_path))
    loaded = BaseMoEModel.from_pretrained(str(tmp_path))
    torch.testing.assert_close(loaded.layers[1].moe.router.balance_bias, b1)
    off = BaseMoEModel(config=tiny_config())
    assert not any("balance_bias" in k for k in off.state_dict())
    off.update_balance_bias(counts)  # rate 0: a no-op
    assert not off.layers[0].moe.router.balance_bias.any()


def test_optimizer_is_fused_and_equals_the_loop():
    """build_optimizer takes torch's fused AdamW on CPU; a few steps equal the plain
    per-tensor AdamW (the capability fallback) to float rounding."""
    import copy

    from hmst.training.optim import build_optimizer, param_groups

    torch.manual_seed(0)
    a = BaseMoEModel(config=tiny_config())
    b = copy.deepcopy(a)
    fused = build_optimizer(a, 1e-2, 0.1, (0.9, 0.95))
    loop = torch.optim.AdamW(param_groups(b, 0.1), lr=1e-2, betas=(0.9, 0.95))
    assert fused.defaults["fused"] and not loop.defaults["fused"]
    x = torch.randint(0, 300, (2, 16))
    for _ in range(3):
        for model, opt in ((a, fused), (b, loop)):
            model(x, targets=x)["loss"].backward()
            opt.step()
            opt.zero_grad()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5)


def test_bad_config_raises():
    with pytest.raises(ValueError, match="divisible"):
        tiny_config(d_model=30)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        tiny_config(num_experts_per_tok=5)
    with pytest.raises(ValueError, match="balance_bias_rate"):
        tiny_config(balance_bias_rate=-1.0)
    with pytest.raises(ValueError, match="unknown model size"):
        get_config("huge")


def test_residual_dropout_only_in_training():
    import dataclasses

    from hmst.models.base_moe import Block

    cfg = dataclasses.replace(tiny_config(), dropout=0.5)
    block = Block(cfg)

    class Const(torch.nn.Module):  # sublayer outputs 1 (attention) and 2 (experts)
        def __init__(self, c, pair):
            super().__init__()
            self.c, self.pair = c, pair

        def forward(self, x, *args):
            y = torch.full_like(x, self.c)
            return (y, None) if self.pair else y

    block.attn, block.moe = Const(1.0, False), Const(2.0, True)
    x = torch.randn(2, 64, cfg.d_model)
    torch.manual_seed(0)
    delta = block(x, None, None)[0] - x
    # each output is zeroed or scaled by 1 / (1 - p) = 2, independently
    assert set(delta.round().unique().tolist()) == {0.0, 2.0, 4.0, 6.0}
    block.eval()
    assert torch.allclose(block(x, None, None)[0], x + 3)
