"""masked_logprob against a float64 torch reference (interpreter on CPU, compiled on a GPU)."""

from __future__ import annotations

import os

import pytest
import torch

from megatron_rcpa.ops import masked_logprob

from ._reference import ref_logprob64, rel_err, require_tp2, tol, worker_device

pytestmark = pytest.mark.triton


def _case(seed, lead, v, dtype, device, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*lead, v, generator=g) * scale).to(dtype).to(device)
    targets = torch.randint(0, v, lead, generator=g).to(device)
    mask = (torch.rand(lead, generator=g) > 0.25).to(device)
    gl = torch.randn(lead, generator=g).to(device)
    gh = torch.randn(lead, generator=g).to(device)
    return logits, targets, mask, gl, gh


def _check(logits, targets, mask, gl, gh, *, temperature=1.0, vocab_size=None, entropy=True, impl="triton",
           inplace=False, full=None):
    """Run masked_logprob and the float64 reference; assert values and gradients within tolerance."""
    dtype = logits.dtype
    ref_x = (logits if full is None else full).detach().to(torch.float64).requires_grad_()
    r_lp, r_h = ref_logprob64(ref_x, targets, mask, temperature, vocab_size)
    ((r_lp * gl).sum() + ((r_h * gh).sum() if entropy else 0.0)).backward()
    x = logits.detach().clone().requires_grad_() if not inplace else logits.detach().clone()
    leaf = x
    if inplace:  # a non-leaf: the gradient flows to `leaf` through the identity view below
        leaf = x.requires_grad_()
        x = leaf * 1
    out = masked_logprob(x, targets, mask, temperature=temperature, vocab_size=vocab_size,
                         return_entropy=entropy, inplace_backward=inplace, impl=impl)
    lp, h = out if entropy else (out, None)
    assert lp.dtype == torch.float32 and lp.shape == targets.shape
    assert rel_err(lp, r_lp) <= 1e-5, rel_err(lp, r_lp)
    if entropy:
        assert h.dtype == torch.float32 and h.shape == targets.shape
        assert rel_err(h, r_h) <= 1e-5, rel_err(h, r_h)
    ((lp * gl).sum() + ((h * gh).sum() if entropy else 0.0)).backward()
    assert leaf.grad.dtype == dtype and leaf.grad.shape == logits.shape
    assert rel_err(leaf.grad, ref_x.grad) <= tol(dtype), rel_err(leaf.grad, ref_x.grad)
    return lp, h, leaf.grad


CASES = [  # dtype, entropy, temperature, several column blocks per row
    (torch.float32, True, 0.7, True),
    (torch.float32, False, 1.0, False),
    (torch.bfloat16, True, 1.3, False),
    (torch.bfloat16, False, 0.7, True),
    (torch.float16, True, 1.0, True),
    (torch.float16, False, 0.5, False),
]


@pytest.mark.parametrize("dtype,entropy,temperature,small", CASES,
                         ids=[f"{str(c[0])[6:]}-ent{int(c[1])}-T{c[2]}-{'blocks' if c[3] else 'row'}" for c in CASES])
def test_matches_float64_reference(dtype, entropy, temperature, small, device, monkeypatch):
    if small:
        monkeypatch.setenv("MEGATRON_RCPA_BLOCK_V", "128")
    v = 999  # odd, not a multiple of any block
    logits, targets, mask, gl, gh = _case(1, (48,), v, dtype, device)
    mask[5] = False
    targets[7] = 0
    targets[8] = v - 1
    _check(logits, targets, mask, gl, gh, temperature=temperature, entropy=entropy)


def test_padded_vocab_and_out_of_vocab_targets_are_masked(device, small_blocks):
    """Columns >= vocab_size leave the softmax; a target outside [0, vocab_size) (padded id, id >= V,
    negative ignore index) is a masked position: logp = entropy = 0 and a zero gradient row."""
    v, vs = 700, 650
    logits, targets, mask, gl, gh = _case(2, (40,), v, torch.float32, device)
    targets[0], targets[1], targets[2], targets[3], targets[4] = vs, v - 1, v + 5, -100, vs - 1
    mask[:5] = True
    lp, h, grad = _check(logits, targets, mask, gl, gh, vocab_size=vs, temperature=0.9)
    assert torch.all(lp[:4] == 0) and torch.all(h[:4] == 0) and torch.all(grad[:4] == 0)
    assert lp[4] < 0
    assert torch.all(grad[:, vs:] == 0)


def test_all_masked(device):
    logits, targets, _, gl, gh = _case(3, (6, 5), 300, torch.bfloat16, device)
    mask = torch.zeros(targets.shape, dtype=torch.bool, device=device)
    x = logits.clone().requires_grad_()
    lp, h = masked_logprob(x, targets, mask, return_entropy=True)
    assert torch.all(lp == 0) and torch.all(h == 0)
    (lp * gl + h * gh).sum().backward()
    assert torch.all(x.grad == 0)


def test_some_rows_masked_gradient_is_exactly_zero_there(device, small_blocks):
    logits, targets, mask, gl, gh = _case(4, (32,), 515, torch.float32, device)
    _, _, grad = _check(logits, targets, mask, gl, gh)
    assert torch.all(grad[~mask] == 0)


def test_noncontiguous_megatron_layout(device, small_blocks):
    """[S, B, V] as a transposed view of [B, S, V_big] sliced to V columns: two row strides, no copy."""
    b, s, v = 3, 7, 401
    g = torch.Generator().manual_seed(5)
    big = (torch.randn(b, s, v + 37, generator=g) * 2).to(device)
    logits = big[..., :v].transpose(0, 1)
    assert not logits.is_contiguous()
    targets = torch.randint(0, v, (s, b), generator=g).to(device)
    mask = (torch.rand(s, b, generator=g) > 0.2).to(device)
    gl = torch.randn(s, b, generator=g).to(device)
    gh = torch.randn(s, b, generator=g).to(device)
    _check(logits, targets, mask, gl, gh, temperature=1.1)
    _check(logits, targets, None, gl, gh, temperature=1.1, inplace=True)


def test_three_noncollapsible_leading_dims(device):
    g = torch.Generator().manual_seed(6)
    base = torch.randn(2, 3, 4, 257, generator=g).to(device)
    logits = base.permute(2, 0, 1, 3)  # [4, 2, 3, V]: leading strides do not collapse to two
    targets = torch.randint(0, 257, (4, 2, 3), generator=g).to(device)
    gl = torch.randn(4, 2, 3, generator=g).to(device)
    gh = torch.randn(4, 2, 3, generator=g).to(device)
    _check(logits, targets, None, gl, gh)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_writes_into_the_logits(dtype, device):
    logits, targets, mask, gl, gh = _case(7, (8, 4), 333, dtype, device)
    _, _, grad_ref = _check(logits, targets, mask, gl, gh)
    leaf = logits.clone().requires_grad_()
    x = leaf * 1  # the logits as a non-leaf activation, as in a model
    seen = {}
    x.register_hook(lambda grad: seen.update(ptr=grad.data_ptr()))
    lp, h = masked_logprob(x, targets, mask, return_entropy=True, inplace_backward=True)
    ptr = x.data_ptr()
    (lp * gl + h * gh).sum().backward()
    assert seen["ptr"] == ptr  # the gradient handed upstream lives in the logits storage
    assert torch.equal(x.detach(), leaf.grad)  # ... and the logits were overwritten by it
    assert torch.equal(leaf.grad, grad_ref)


def test_large_logits_with_growing_max(device, small_blocks):
    """Rows whose max grows block after block (ascending) exercise the rescaling of the running sums; logits
    of magnitude ~150 check that exponents keep their precision (fma against the running max)."""
    v = 1000
    g = torch.Generator().manual_seed(12)
    base = torch.linspace(-60.0, 90.0, v)
    rows = torch.stack([base, base.flip(0), base * 0.01, torch.randn(v, generator=g) * 40,
                        torch.randn(v, generator=g) * 40]).to(device)
    targets = torch.tensor([v - 1, v - 1, 3, 17, 500], device=device)
    gl = torch.ones(5, device=device)
    gh = torch.full((5,), 0.5, device=device)
    x64 = rows.double().requires_grad_()
    r_lp, r_h = ref_logprob64(x64, targets)
    (r_lp * gl + r_h * gh).sum().backward()
    x = rows.clone().requires_grad_()
    lp, h = masked_logprob(x, targets, return_entropy=True)
    (lp * gl + h * gh).sum().backward()
    assert rel_err(lp, r_lp) <= 1e-6
    # near-one-hot rows have entropies ~1e-5: judge those absolutely (fp32 sum-exp near 1)
    assert float((h.detach().double() - r_h.detach()).abs().max()) <= 1e-6
    assert rel_err(x.grad, x64.grad) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_impl_matches_reference(dtype, device):
    logits, targets, mask, gl, gh = _case(8, (5, 6), 611, dtype, device)
    targets[0, 0] = 605
    _check(logits, targets, mask, gl, gh, temperature=0.8, vocab_size=600, impl="torch")


def test_entropy_only_and_logp_only_gradients(device):
    logits, targets, mask, gl, gh = _case(9, (20,), 200, torch.float32, device)
    x64 = logits.detach().double().requires_grad_()
    _, r_h = ref_logprob64(x64, targets, mask)
    (r_h * gh).sum().backward()
    x = logits.clone().requires_grad_()
    _, h = masked_logprob(x, targets, mask, return_entropy=True)
    (h * gh).sum().backward()
    assert rel_err(x.grad, x64.grad) <= 1e-5


def test_no_grad_forward(device):
    logits, targets, mask, _, _ = _case(10, (16,), 300, torch.bfloat16, device)
    r_lp, _ = ref_logprob64(logits, targets, mask)
    with torch.no_grad():
        lp = masked_logprob(logits.requires_grad_(), targets, mask)
    assert lp.grad_fn is None and rel_err(lp, r_lp) <= 1e-5


def test_empty(device):
    logits = torch.zeros(0, 3, 50, device=device, requires_grad=True)
    targets = torch.zeros(0, 3, dtype=torch.long, device=device)
    lp, h = masked_logprob(logits, targets, return_entropy=True)
    assert lp.shape == (0, 3) and h.shape == (0, 3)
    (lp.sum() + h.sum()).backward()
    assert logits.grad.shape == logits.shape


def test_errors(device):
    logits = torch.randn(4, 10, device=device)
    t = torch.zeros(4, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="targets has shape"):
        masked_logprob(logits, t[:3])
    with pytest.raises(ValueError, match="mask has shape"):
        masked_logprob(logits, t, torch.ones(5, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match="temperature"):
        masked_logprob(logits, t, temperature=0.0)
    with pytest.raises(ValueError, match="vocab_size"):
        masked_logprob(logits, t, vocab_size=11)
    with pytest.raises(ValueError, match="impl"):
        masked_logprob(logits, t, impl="cuda")
    with pytest.raises(ValueError, match="integer token ids"):
        masked_logprob(logits, t.float())
    with pytest.raises(ValueError, match="not supported"):
        masked_logprob(logits.double(), t)


# ---------------------------------------------------------------------------------------------------------
# Tensor parallelism: two gloo processes, vocabulary sharded as Megatron does
# ---------------------------------------------------------------------------------------------------------


def _tp_worker(v_local, vocab_size, dtype_name):
    """Inside a worker of run_distributed(tp=2): compare sharded results with the float64 reference on the
    whole vocabulary; count the collectives. Returns a dict of relative errors and counts."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    os.environ["MEGATRON_RCPA_BLOCK_V"] = "64"
    group = ps.get_tensor_model_parallel_group()
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    dtype = getattr(torch, dtype_name)
    dev = worker_device()
    v = v_local * world
    g = torch.Generator().manual_seed(11)  # same full tensors on every rank
    s, b = 6, 4
    full = (torch.randn(s, b, v, generator=g) * 3).to(dtype)
    targets = torch.randint(0, vocab_size, (s, b), generator=g)
    # shard boundaries, the last valid id, a padded id, an ignore index
    edge = [v_local - 1, v_local, 0, vocab_size - 1, vocab_size, -100, v - 1]
    targets.view(-1)[: len(edge)] = torch.tensor(edge)
    mask = torch.rand(s, b, generator=g) > 0.2
    mask.view(-1)[: len(edge)] = True
    gl = torch.randn(s, b, generator=g)
    gh = torch.randn(s, b, generator=g)
    full, targets, mask, gl, gh = (u.to(dev) for u in (full, targets, mask, gl, gh))
    temperature = 0.8

    ref_x = full.to(torch.float64).requires_grad_()
    r_lp, r_h = ref_logprob64(ref_x, targets, mask, temperature, vocab_size)
    sl = slice(rank * v_local, (rank + 1) * v_local)
    ref_grad = torch.autograd.grad((r_lp * gl).sum() + (r_h * gh).sum(), ref_x, retain_graph=True)[0][..., sl]
    ref_grad_no_ent = torch.autograd.grad((r_lp * gl).sum(), ref_x)[0][..., sl]

    calls = {"n": 0}
    names = [n for n in ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce")
             if hasattr(dist, n)]
    originals = {n: getattr(dist, n) for n in names}

    def counting(fn):
        def wrapped(*a, **k):
            calls["n"] += 1
            return fn(*a, **k)
        return wrapped

    out = {}
    for impl, inplace, ent in (("triton", False, True), ("triton", True, True), ("triton", False, False),
                               ("torch", False, True)):
        shard = full[..., rank * v_local:(rank + 1) * v_local].clone().requires_grad_()
        x = shard * 1
        for n in names:
            setattr(dist, n, counting(originals[n]))
        calls["n"] = 0
        res = masked_logprob(x, targets, mask, temperature=temperature, tp_group=group, vocab_size=vocab_size,
                             return_entropy=ent, impl=impl, inplace_backward=inplace)
        lp, h = res if ent else (res, None)
        fwd_calls = calls["n"]
        calls["n"] = 0
        ((lp * gl).sum() + ((h * gh).sum() if ent else 0.0)).backward()
        bwd_calls = calls["n"]
        for n in names:
            setattr(dist, n, originals[n])
        out[f"{impl}-inplace{int(inplace)}-ent{int(ent)}"] = {
            "logp": rel_err(lp, r_lp), "entropy": rel_err(h, r_h) if ent else 0.0,
            "grad": rel_err(shard.grad, ref_grad if ent else ref_grad_no_ent),
            "fwd_collectives": fwd_calls, "bwd_collectives": bwd_calls,
            "masked_zero": bool(torch.all(lp[~mask] == 0)),
        }
    return out


@pytest.mark.multiproc
@pytest.mark.parametrize("v_local,vocab_size,dtype_name", [
    (251, 497, "float32"),  # odd shard width, padding on the last rank
    (128, 100, "bfloat16"),  # the last rank holds only padding
])
def test_tensor_parallel_two_ranks(v_local, vocab_size, dtype_name):
    require_tp2()
    from megatron_rcpa.testing.launcher import run_distributed

    results = run_distributed(_tp_worker, world_size=2, tp=2, args=(v_local, vocab_size, dtype_name),
                              timeout=240)
    t = tol(getattr(torch, dtype_name))
    for rank, res in enumerate(results):
        for key, r in res.items():
            assert r["logp"] <= 1e-5 and r["entropy"] <= 1e-5, (rank, key, r)
            assert r["grad"] <= t, (rank, key, r)
            assert r["masked_zero"], (rank, key, r)
            assert r["fwd_collectives"] == 1, (rank, key, r)  # ONE small collective per forward
            assert r["bwd_collectives"] == 0, (rank, key, r)


def test_impl_auto_and_clear_error_without_interpreter(device, monkeypatch):
    from megatron_rcpa.ops import TritonUnavailableError, _triton_utils

    logits, targets, mask, _, _ = _case(13, (8,), 100, torch.float32, device)
    assert torch.equal(masked_logprob(logits, targets, mask, impl="auto"), masked_logprob(logits, targets, mask))
    if device == "cpu":  # compiled Triton needs CUDA tensors: say so instead of crashing inside Triton
        monkeypatch.setattr(_triton_utils, "interpreter_active", lambda: False)
        with pytest.raises(TritonUnavailableError, match="TRITON_INTERPRET"):
            masked_logprob(logits, targets, mask)
        ref = masked_logprob(logits, targets, mask, impl="torch")
        assert torch.allclose(masked_logprob(logits, targets, mask, impl="auto"), ref)
