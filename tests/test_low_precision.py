"""Low precision (bfloat16 / float16 parameters, autocast): the clipped sum keeps its sensitivity.

Issue 25 item 1.  A clipped sum claims L2 sensitivity ``C``; in 16-bit arithmetic the claim used
to fail (a bfloat16 accumulator moved by 2.0 when one example of norm 1 was removed; ``clip``
returned bfloat16 rows of norm 1.0057 C).  Every check here is measured from outside: the
distance between two clipped sums (or a clipped row's norm) computed in float64 by
:func:`fundp.testing.tree_distance` / ``torch.linalg.vector_norm`` on float64 copies, and the
noisy output against noise drawn independently from the same key and added in float64.

The bound asked for is ``C (1 + 1e-6)``; float64 accumulation keeps the rounding of a sum of
``B`` terms of norm ``<= C`` below ``B^2 2^-53 C`` (2e-9 C at B = 4096).
"""

import math

import pytest
import torch
import torch.nn.functional as F

import fundp
from fundp.noise import noise_like
from fundp.testing import empirical_sensitivity, tree_distance

LOW = [torch.bfloat16, torch.float16]
SLACK = 1e-6
C = 1.0


def linear_loss(p, x):
    """Example i's gradient is exactly x_i (no arithmetic on it): ``d (x_i . w) / dw = x_i``."""
    return x @ p["w"]


def remove_one(fn, params, batch, rows):
    """The largest ``||S - S_{-i}||`` over the given rows (the batch is too big to try them all)."""
    size = batch.shape[0]
    full = fn(params, batch, torch.ones(size, dtype=torch.bool)).grads
    worst = 0.0
    for i in rows:
        mask = torch.ones(size, dtype=torch.bool)
        mask[i] = False
        worst = max(worst, tree_distance(full, fn(params, batch, mask).grads))
    return worst


def aligned_batch(size, dim, dtype, seed=0):
    """Every example has the same gradient, of norm ~3 C: the sum grows to ~B C."""
    g = torch.Generator().manual_seed(seed)
    row = (torch.randn(dim, generator=g, dtype=torch.float64) * 3.0 / math.sqrt(dim)).to(dtype)
    return row.expand(size, dim).contiguous()


def adversarial_batch(size, dim, dtype, seed=0):
    """A large aligned background (norms 1.5..50) plus rows pointing elsewhere, of every scale: the
    removed row's contribution lands on coordinates whose sum is ~B C."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(dim, generator=g, dtype=torch.float64)
    scales = torch.exp(torch.empty(size, dtype=torch.float64).uniform_(math.log(1.5), math.log(50.0), generator=g))
    rows = direction * scales[:, None] / direction.norm()
    odd = torch.randn(size // 4, dim, generator=g, dtype=torch.float64)
    rows[::4] = odd * torch.logspace(-3, 2, size // 4, dtype=torch.float64)[:, None]
    return rows.to(dtype)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("kind", ["aligned", "adversarial"])
@pytest.mark.parametrize("size", [1024, 4096])
def test_remove_one_vmap(dtype, kind, size):
    make = aligned_batch if kind == "aligned" else adversarial_batch
    batch = make(size, 16, dtype)
    params = {"w": torch.zeros(16, dtype=dtype)}
    fn = fundp.clipped_grad_sum(linear_loss, max_norm=C, grad_method="vmap")
    rows = [0, 1, 2, 3, size // 2, size - 1]
    assert remove_one(fn, params, batch, rows) <= C * (1 + SLACK)


@pytest.mark.parametrize("dtype", LOW)
def test_replace_and_remove_every_row_small_batch(dtype):
    batch = adversarial_batch(32, 8, dtype, seed=3)
    params = {"w": torch.zeros(8, dtype=dtype)}
    fn = fundp.clipped_grad_sum(linear_loss, max_norm=C, grad_method="vmap")
    assert empirical_sensitivity(fn, params, batch) <= C * (1 + SLACK)
    small = batch[:12]  # replace tries every pair: B (B - 1) calls
    assert empirical_sensitivity(fn, params, small, mode="replace") <= 2 * C * (1 + SLACK)


def linear_module_loss(p, x):
    """An ``F.linear`` layer: what the ghost engine handles (default ``grad_method``)."""
    return F.linear(x, p["weight"], p["bias"]).sum(dim=1)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("grad_method", ["vmap", "auto"])
def test_remove_one_linear_layer(dtype, grad_method):
    batch = aligned_batch(1024, 8, dtype, seed=1)
    g = torch.Generator().manual_seed(2)
    params = {"weight": torch.randn(3, 8, generator=g).to(dtype), "bias": torch.zeros(3, dtype=dtype)}
    fn = fundp.clipped_grad_sum(linear_module_loss, max_norm=C, grad_method=grad_method)
    assert remove_one(fn, params, batch, [0, 511, 1023]) <= C * (1 + SLACK)


def test_remove_one_under_autocast():
    """float32 parameters, bfloat16 autocast (vmap): the same bound."""
    batch = adversarial_batch(1024, 8, torch.float32, seed=4)
    g = torch.Generator().manual_seed(5)
    params = {"weight": torch.randn(3, 8, generator=g), "bias": torch.zeros(3)}
    fn = fundp.clipped_grad_sum(linear_module_loss, max_norm=C, grad_method="vmap")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        worst = remove_one(fn, params, batch, [0, 1, 2, 3, 512, 1023])
    assert worst <= C * (1 + SLACK)


@pytest.mark.parametrize("dtype", LOW)
def test_clipped_rows_in_stored_dtype_have_norm_at_most_c(dtype):
    """``fundp.clip`` returns rows in the gradients' dtype whose norm (of the stored values, in
    float64) is <= C: flat over two leaves, and per layer."""
    g = torch.Generator().manual_seed(6)
    size = 4096
    scales = torch.exp(torch.empty(size, dtype=torch.float64).uniform_(0.0, math.log(100.0), generator=g))
    a = (torch.randn(size, 7, generator=g, dtype=torch.float64) * scales[:, None]).to(dtype)
    b = (torch.randn(size, 3, 2, generator=g, dtype=torch.float64) * scales[:, None, None]).to(dtype)
    clipped = fundp.clip({"a": a, "b": b}, C)
    assert clipped["a"].dtype == dtype
    norms = torch.sqrt(clipped["a"].double().square().sum(1) + clipped["b"].double().square().sum((1, 2)))
    assert float(norms.max()) <= C * (1 + SLACK)
    per_layer = fundp.clip({"a": a, "b": b}, {"a": 0.5, "b": 2.0}, style="per_layer")
    assert float(per_layer["a"].double().norm(dim=1).max()) <= 0.5 * (1 + SLACK)
    assert float(per_layer["b"].double().flatten(1).norm(dim=1).max()) <= 2.0 * (1 + SLACK)
    automatic = fundp.clip({"a": a, "b": b}, C, style="automatic", gamma=1e-9)
    norms = torch.sqrt(automatic["a"].double().square().sum(1) + automatic["b"].double().square().sum((1, 2)))
    assert float(norms.max()) <= C * (1 + SLACK)


@pytest.mark.parametrize("dtype", LOW + [torch.float32])
def test_noise_added_to_the_wide_sum_then_rounded_once(dtype):
    """``dp_step`` output = round_to_dtype((sum + z) / B_exp) with the sum and z in float64: the
    noise is not rounded to the parameter dtype before it is added."""
    size, dim = 64, 32
    g = torch.Generator().manual_seed(7)
    batch = torch.randint(-3, 4, (size, dim), generator=g).to(dtype)  # small integers: sums exact
    params = {"w": torch.zeros(dim, dtype=dtype)}
    sigma, expected = 0.7, 64.0
    step = fundp.dp_step(linear_loss, max_norm=1000.0, noise_multiplier=sigma, expected_batch_size=expected, grad_method="vmap")
    key = fundp.random.key(11)
    out = step(params, batch, key)
    noise_key = fundp.random.split(key, 3)[0]
    z = noise_like({"w": torch.zeros(dim, dtype=torch.float64)}, noise_key, sigma * 1000.0)["w"]
    want = ((batch.double().sum(0) + z) / expected).to(dtype)
    assert out.grads["w"].dtype == dtype
    assert torch.equal(out.grads["w"], want)


@pytest.mark.parametrize("dtype", LOW)
def test_public_noise_adds_in_float64_and_rounds_once(dtype):
    tree = {"w": torch.linspace(-4, 4, 1000).to(dtype)}
    key = fundp.random.key(3)
    out = fundp.noise(tree, key, 0.3)["w"]
    z = noise_like({"w": torch.zeros(1000, dtype=torch.float64)}, key, 0.3)["w"]
    assert out.dtype == dtype
    assert torch.equal(out, (tree["w"].double() + z).to(dtype))


def test_privatize_returns_parameter_dtype():
    fn = fundp.clipped_grad_sum(linear_loss, max_norm=C, grad_method="vmap")
    clipped = fn({"w": torch.zeros(4, dtype=torch.bfloat16)}, torch.ones(8, 4, dtype=torch.bfloat16))
    out = fundp.privatize(clipped, fundp.random.key(0), noise_multiplier=1.0, expected_batch_size=8)
    assert out["w"].dtype == torch.bfloat16


# --------------------------------------------------------------------------- the ghost engine
#
# ``grad_method="ghost"`` (no fallback to vmap): the book-keeping sums of ``_norms.LeafGrads`` /
# ``RowsLeaf`` are multiplied and accumulated in float64 for 16-bit parameters and under autocast
# (float32 sums moved by up to C (1 + 7.6e-5) at B = 4096; bfloat16 ones by 7.7 C).


def sequence_loss(p, ids):
    """Embedding -> LayerNorm -> Linear over T = 5 tokens: Ids, Rows and Factor (T > 1) uses."""
    h = F.embedding(ids, p["emb"])
    h = F.layer_norm(h, (h.shape[-1],), p["ln_w"], p["ln_b"])
    out = F.linear(h, p["weight"], p["bias"])
    return (out * p["head"]).sum(dim=(1, 2))


def sequence_params(dtype, seed=8):
    g = torch.Generator().manual_seed(seed)
    params = {"emb": torch.randn(11, 8, generator=g), "ln_w": 1 + 0.1 * torch.randn(8, generator=g),
              "ln_b": 0.1 * torch.randn(8, generator=g), "weight": torch.randn(4, 8, generator=g),
              "bias": torch.randn(4, generator=g)}
    params = {k: v.to(dtype) for k, v in params.items()}
    params["head"] = torch.randn(5, 4, generator=g).to(dtype).requires_grad_(False)
    return params


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("kind", ["aligned", "adversarial"])
def test_remove_one_ghost_linear_4096(dtype, kind):
    make = aligned_batch if kind == "aligned" else adversarial_batch
    batch = make(4096, 8, dtype, seed=9)
    g = torch.Generator().manual_seed(10)
    params = {"weight": torch.randn(3, 8, generator=g).to(dtype), "bias": torch.zeros(3, dtype=dtype)}
    fn = fundp.clipped_grad_sum(linear_module_loss, max_norm=C, grad_method="ghost")
    assert remove_one(fn, params, batch, [0, 1, 2, 3, 2048, 4095]) <= C * (1 + SLACK)


@pytest.mark.parametrize("dtype", LOW)
def test_ghost_sequence_model_remove_and_replace(dtype):
    """Every example the same sequence (aligned, clipped: the sum grows to ~B C) and one example
    replaced by a different sequence: remove-one <= C, replace-one <= 2 C."""
    size = 1024
    params = sequence_params(dtype)
    row = torch.tensor([1, 4, 4, 7, 2])
    batch = row.expand(size, 5).contiguous()
    # verify=False: the first-call check compares with autograd's own bfloat16 gradient, whose
    # sum of 1024 equal rows stalls (a false alarm of the check, not of the engine's sums).
    fn = fundp.clipped_grad_sum(sequence_loss, max_norm=C, grad_method="ghost", verify=False)
    assert remove_one(fn, params, batch, [0, 511, 1023]) <= C * (1 + SLACK)
    full = fn(params, batch).grads
    worst = 0.0
    for i in (0, 1023):
        other = batch.clone()
        other[i] = torch.tensor([9, 9, 3, 0, 10])
        worst = max(worst, tree_distance(full, fn(params, other).grads))
    assert worst <= 2 * C * (1 + SLACK)


@pytest.mark.parametrize("autocast_dtype", LOW)
def test_remove_one_ghost_under_autocast(autocast_dtype):
    """float32 parameters under 16-bit autocast through the ghost engine: the same bound."""
    batch = adversarial_batch(4096, 8, torch.float32, seed=4)
    g = torch.Generator().manual_seed(5)
    params = {"weight": torch.randn(3, 8, generator=g), "bias": torch.zeros(3)}
    fn = fundp.clipped_grad_sum(linear_module_loss, max_norm=C, grad_method="ghost")
    with torch.autocast("cpu", dtype=autocast_dtype):
        worst = remove_one(fn, params, batch, [0, 1, 2, 3, 2048, 4095])
    assert worst <= C * (1 + SLACK)


def test_ghost_sums_are_not_rounded_to_the_parameter_dtype():
    """The engine's book-keeping sums of bfloat16 rows come back unrounded (float64), equal to the
    sum formed in float64 from the same rows: 4096 aligned rows sum to exactly 4096 x_0."""
    from fundp.engines.ghost._norms import RowsLeaf

    rows = aligned_batch(4096, 6, torch.bfloat16, seed=11)
    factors = torch.full((4096,), 1 / 3, dtype=torch.float64)
    got = RowsLeaf(rows).weighted_sum(factors)
    assert got.dtype == torch.float64
    want = rows.double().sum(0) / 3
    assert torch.allclose(got, want, rtol=1e-13, atol=0)
    fn = fundp.clipped_grad_sum(lambda p, x: F.linear(x, p["w"])[:, 0], max_norm=1e6, grad_method="ghost")
    out = fn({"w": torch.zeros(1, 6, dtype=torch.bfloat16)}, rows).grads["w"]
    assert torch.equal(out[0], rows.double().sum(0))
