"""Issue 20, "done when": the support matrix, enumerated (single process; a few distributed cells at the end).

Every cell of sampler (Poisson / truncated Poisson / cyclic Poisson / shuffled) x clipping (flat /
per-layer / adaptive) x noise (i.i.d. / secure / fundp.mf single participation / min-separation /
cyclic Poisson) x schedule (constant sigma / a sigma per step) x accumulation (physical_batch_size
or not) either trains STEPS steps of a tiny model and its ledger's epsilon equals an independent
computation (dp_accounting's RDP accountant on the events the cell releases, written out here from
the papers' definitions), or raises before any noise is drawn (at build, or at the first call) with
a reason that applies to the cell: a row of fundp.guards.UNSUPPORTED (a refused pair of options, the
sampler's kind among them), which the raised error names (``error.pair``) and whose reason it gives.

The expected outcome of each cell is this file's own statement of the matrix (``_refusals``), not
read from the code; the dp_accounting composition of the MF cells follows tests/test_mf.py
(min-separation / single participation: one Gaussian mechanism; cyclic Poisson: DP-SGD at (sigma,
q) over ceil(n / b) steps) and test_privatizers.py (adaptive clipping + min-separation: plus k
count releases, k = the mechanism's max participations); with a sigma schedule, the Gaussian
mechanism of the column-scaled strategy C D^-1 (D = diag(sigma_t)) and the counts, computed here
from the materialised C (tests/test_mf_schedule.py).
"""

import functools
import itertools
import math

import dp_accounting
import pytest
import scipy.optimize
import scipy.stats
import torch
from absl import logging as absl_logging
from dp_accounting.rdp import rdp_privacy_accountant

import fundp
import fundp.mf as mf
from fundp import adaptive
from fundp.accounting import rdp, truncation
from fundp.guards import UNSUPPORTED, UnsupportedCombination, forget_keys

N, D, STEPS, Q, SIGMA, SIGMA_B, MAX_BATCH = 16, 3, 3, 0.25, 1.2, 2.0, 13
absl_logging.set_verbosity(absl_logging.ERROR)  # dp_accounting's notes on orders it skips
DELTA = 1e-3  # large enough that the truncation term (1 + e^eps) T P shifts epsilon measurably
X = torch.randn(N, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
PARAMS = {"w": torch.zeros(D, dtype=torch.float64), "b": torch.zeros((), dtype=torch.float64)}

SAMPLERS = ("poisson", "truncated", "cyclic", "shuffled")
CLIPPING = ("flat", "per_layer", "adaptive")
NOISE = ("iid", "secure", "mf_single", "mf_minsep", "mf_cyclic")
MF = {"mf_single", "mf_minsep", "mf_cyclic"}


def loss_fn(p, b):
    return (b @ p["w"] + p["b"] - 1.0) ** 2


def sigma_at(t, schedule):
    return SIGMA + 0.1 * t if schedule else SIGMA


def partitions(noise):
    """Cyclic batches built for the mechanism: single participation needs one partition a step."""
    return STEPS if noise == "mf_single" else 2


def make_sampler(name, noise):
    key = fundp.random.key(1)
    if name == "poisson":
        return fundp.data.poisson_batches(N, Q, key, steps=STEPS, pad_to_multiple=4)
    if name == "truncated":
        return fundp.data.truncated_poisson_batches(N, Q, key, max_batch_size=MAX_BATCH, steps=STEPS)
    if name == "cyclic":
        return mf.cyclic_poisson_batches(N, 2 * Q, key, num_partitions=partitions(noise), steps=STEPS, pad_to_multiple=4)
    return fundp.sampling.shuffled_batches(N, 4, key, steps=STEPS)


def make_mechanism(noise):
    participation = {"mf_single": mf.single_participation(), "mf_minsep": mf.min_separation(2),
                     "mf_cyclic": mf.cyclic_poisson(2, 2 * Q)}.get(noise)
    return None if participation is None else mf.mechanism(mf.banded_toeplitz([1.0, 0.5], STEPS), participation)


SAMPLER_ROW = {"poisson": "sampler=poisson", "truncated": "sampler=truncated_poisson", "cyclic": "sampler=cyclic_poisson",
               "shuffled": "sampler=shuffled"}


def _refusals(sampler, clipping, noise, schedule):
    """This test's statement of the matrix: the rows of fundp.guards.UNSUPPORTED that refuse a cell
    (empty: accepted)."""
    rows = []
    if sampler in ("shuffled", "cyclic") and noise not in MF:  # i.i.d. noise: DP-SGD's Poisson accounting
        rows.append(("noise_mechanism=None", SAMPLER_ROW[sampler]))
    if sampler != "cyclic" and noise in MF:  # a mechanism accounts only its participation's batches
        rows.append(("noise_mechanism", SAMPLER_ROW[sampler]))
    if clipping == "adaptive" and noise == "secure":
        rows.append(("adaptive_clipping", "secure_mode"))
    if clipping == "adaptive" and noise == "mf_cyclic":  # amplification does not cover the count
        rows.append(("adaptive_clipping", "noise_mechanism"))
    if schedule and noise == "mf_cyclic":  # single / banded min-sep mechanisms account a schedule
        rows.append(("noise_mechanism", "noise_multiplier (per call)"))
    return rows


def _gaussian_steps(sampler, clipping, schedule):
    """The Poisson-sampled Gaussian each step releases: (z, q); with adaptive clipping the gradient
    sum and the unclipped count on one sample are one Gaussian with z^-2 = sigma^-2 + sigma_b^-2."""
    out = []
    for t in range(STEPS):
        z = sigma_at(t, schedule)
        if clipping == "adaptive":
            z = (z**-2 + SIGMA_B**-2) ** -0.5
        out.append((z, Q))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def _rdp_accountant(events):
    accountant = rdp_privacy_accountant.RdpAccountant(orders=list(rdp.DEFAULT_ORDERS))
    for event in events:
        accountant.compose(event)
    return accountant


def scheduled_mu(mech, counts):
    """``mu`` of an MF run with the schedule sigma_at(t, True): from the materialised strategy C,
    columns scaled by 1 / sigma_t, the largest ||C D^-1 u|| over the allowed 0/1 participations u
    (enumerated; C >= 0 so all-equal gradients are the worst case) over the same at D = I, plus
    |S| / sigma_b^2 for the counts."""
    c = mech.strategy.matrix()
    if isinstance(mech.participation, mf.MinSeparation):
        b, k = mech.participation.min_sep, math.ceil(STEPS / mech.participation.min_sep)
    else:
        b, k = 1, 1
    allowed = [s for size in range(1, k + 1) for s in itertools.combinations(range(STEPS), size)
               if all(j - i >= b for i, j in zip(s, s[1:]))]
    sens2 = max(float(((c[:, list(s)].sum(axis=1)) ** 2).sum()) for s in allowed)
    scaled = c / [sigma_at(t, True) for t in range(STEPS)]
    return math.sqrt(max(float(((scaled[:, list(s)].sum(axis=1)) ** 2).sum()) / sens2 + (len(s) / SIGMA_B**2 if counts else 0)
                         for s in allowed))


def reference_epsilon(sampler, clipping, noise, schedule):
    """Epsilon from dp_accounting's RDP accountant (fundp's order grid), composed here."""
    if noise in MF:
        mech = make_mechanism(noise)
        if noise == "mf_cyclic":  # DP-SGD at (sigma, q) over ceil(n / b) charged steps
            events = (dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(2 * Q, dp_accounting.GaussianDpEvent(SIGMA)), math.ceil(STEPS / 2)),)
        elif schedule:  # the Gaussian mechanism C D^-1 X + Z (and the counts), D = diag(sigma_t)
            events = (dp_accounting.GaussianDpEvent(1 / scheduled_mu(mech, clipping == "adaptive")),)
        else:  # one Gaussian release of the whole run, plus k count releases (k: most participations)
            events = (dp_accounting.GaussianDpEvent(SIGMA),)
            if clipping == "adaptive":
                events += (dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(SIGMA_B), mech.max_participations()),)
        return _rdp_accountant(events).get_epsilon(DELTA)
    events = tuple(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
                   for z, q in _gaussian_steps(sampler, clipping, schedule))
    accountant = _rdp_accountant(events)
    if sampler != "truncated":
        return accountant.get_epsilon(DELTA)
    # Truncation at MAX_BATCH: the least eps with delta(eps) + (1 + e^eps) T P <= DELTA, where
    # P = Pr[B > MAX_BATCH] on the larger neighbour (N + 1 examples). The left side first falls with
    # eps, then rises: scan up from the untruncated epsilon to the first eps that fits, then bisect.
    p = scipy.stats.binom.sf(MAX_BATCH, N + 1, Q)
    excess = lambda eps: accountant.get_delta(eps) + (1 + math.exp(eps)) * STEPS * p - DELTA  # noqa: E731
    low = accountant.get_epsilon(DELTA)
    k = next(k for k in range(1, 500) if excess(low * (1 + k / 500)) <= 0)
    assert k > 1  # the truncation term moves epsilon by more than the test's tolerance
    return scipy.optimize.brentq(excess, low * (1 + (k - 1) / 500), low * (1 + k / 500), xtol=1e-12)


def run_cell(sampler, clipping, noise, schedule, accumulate, shard=None):
    """Trains the cell STEPS steps; ``shard=(rank, world_size)``: this rank's share of a
    ``distributed=True`` run (its rows of each batch, fundp.distributed.shard).  Returns
    ``(ledger, batches, params)``."""
    forget_keys()
    batches, mech = make_sampler(sampler, noise), make_mechanism(noise)
    cfg = adaptive.quantile_clipping(count_noise_multiplier=SIGMA_B) if clipping == "adaptive" else None
    step = fundp.dp_step(
        loss_fn, max_norm=1.0, noise_multiplier=SIGMA, sampler=batches, grad_method="vmap",
        clip_style="per_layer" if clipping == "per_layer" else "flat", adaptive_clipping=cfg,
        noise_mechanism=mech, secure_mode=noise == "secure", physical_batch_size=4 if accumulate else None,
        distributed=shard is not None)
    params, ledger = PARAMS, fundp.Ledger()
    clip_state, noise_state = (cfg.init(1.0) if cfg else None), (mech.init(PARAMS) if mech else None)
    for t, (indices, mask) in zip(range(STEPS), batches):
        if shard is not None:
            indices, mask = fundp.distributed.shard(indices, mask, *shard)
        per_call = {"noise_multiplier": sigma_at(t, True)} if schedule else {}
        out = step(params, X[indices], fundp.random.fold_in(fundp.random.key(7), t), mask=mask, ledger=ledger,
                   clip_state=clip_state, noise_state=noise_state, **per_call)
        ledger, clip_state, noise_state = out.ledger, out.clip_state, out.noise_state
        params = {k: v - 0.1 * out.grads[k] for k, v in params.items()}
    assert all(bool(torch.isfinite(v).all()) for v in params.values()) and not torch.equal(params["w"], PARAMS["w"])
    assert ledger.steps == STEPS
    return ledger, batches, params


CELLS = list(itertools.product(SAMPLERS, CLIPPING, NOISE, (False, True)))


@pytest.mark.filterwarnings("ignore::UserWarning")  # truncation / secure-mode notices
@pytest.mark.parametrize("sampler,clipping,noise,schedule", CELLS, ids=["-".join(map(str, c)) for c in CELLS])
def test_cell_is_accounted_exactly_or_refused_with_its_reason(sampler, clipping, noise, schedule):
    refusals = _refusals(sampler, clipping, noise, schedule)
    for accumulate in (False, True):
        if refusals:
            with pytest.raises(UnsupportedCombination) as caught:
                run_cell(sampler, clipping, noise, schedule, accumulate)
            assert caught.value.pair in refusals, (caught.value.pair, refusals)
            error, reason = UNSUPPORTED[caught.value.pair]
            assert isinstance(caught.value, error) and str(caught.value).startswith(reason)
            continue
        ledger, batches, _ = run_cell(sampler, clipping, noise, schedule, accumulate)
        check_epsilon(ledger, batches, sampler, clipping, noise, schedule)


def check_epsilon(ledger, batches, sampler, clipping, noise, schedule):
    if sampler == "truncated":
        ours = truncation.epsilon(ledger, DELTA, batches, accountant="rdp")
    else:
        ours = fundp.epsilon(ledger, DELTA, accountant="rdp")
    reference = reference_epsilon(sampler, clipping, noise, schedule)
    # fundp refines fractional orders between grid points (and keeps the low fractional orders
    # at which dp_accounting's series does not converge at q = 0.25): never above, within 1e-3.
    assert reference * (1 - 1e-3) <= ours <= reference * (1 + 1e-6), (ours, reference)


def test_the_matrix_refuses_and_accepts_cells_of_every_kind():
    """The enumeration is not vacuous: each refusal reason and each accounting kind occurs."""
    accepted = [c for c in CELLS if not _refusals(*c)]
    kinds = {(s, n in MF, cl == "adaptive", sch) for s, cl, n, sch in accepted}
    assert {("poisson", False, True, True), ("truncated", False, False, True), ("cyclic", True, True, False),
            ("cyclic", True, False, False), ("cyclic", True, True, True), ("cyclic", True, False, True)} <= kinds
    assert {n for s, cl, n, sch in accepted if sch and n in MF} == {"mf_single", "mf_minsep"}  # a schedule with MF
    assert len(accepted) >= 20 and len(CELLS) - len(accepted) >= 60
    rows = {row for cell in CELLS for row in _refusals(*cell)}
    assert rows <= set(UNSUPPORTED) and len(rows) == 8, rows  # every refusal is a row of the table


def test_adaptive_with_per_layer_clipping_is_refused_with_the_tables_reason():
    error, reason = UNSUPPORTED[("adaptive_clipping", "clip_style=per_layer")]
    with pytest.raises(error) as caught:
        fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=SIGMA, sampler=make_sampler("poisson", "iid"),
                      clip_style="per_layer", adaptive_clipping=adaptive.quantile_clipping(count_noise_multiplier=SIGMA_B))
    assert str(caught.value) == reason


# Distributed (replicated params, 2 gloo ranks): representative accepted cells, each rank on its
# shard of every batch (cell = sampler, clipping, noise, schedule, accumulation). Truncated batches
# (13 rows) do not split into equal shards of a multiple of 13 over 2 ranks, so they are left out.
DISTRIBUTED_CELLS = (("poisson", "flat", "iid", True, False), ("poisson", "per_layer", "iid", False, True),
                     ("poisson", "adaptive", "iid", True, False), ("cyclic", "flat", "mf_cyclic", False, False),
                     ("cyclic", "per_layer", "mf_minsep", True, True), ("cyclic", "adaptive", "mf_minsep", False, False))


def distributed_cells(shard=None):
    """``{cell: (params, ledger)}`` of DISTRIBUTED_CELLS (``shard=(rank, world_size)``: one rank's run)."""
    out = {}
    for cell in DISTRIBUTED_CELLS:
        ledger, _, params = run_cell(*cell, shard=shard)
        out[cell] = (params, ledger)
    return out


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_distributed_cells_equal_one_process_and_are_accounted_as_it(tmp_path):
    """Two ranks (one launch, tests/dist_workers.py "matrix"): the trained params equal one process
    on the whole batches (the same noise, added once after the all-reduce), each rank's ledger
    equals the single process's, and its epsilon is dp_accounting's."""
    from test_distributed import launch

    processes, alive, _ = launch(tmp_path, "matrix")
    errors = {r: (tmp_path / f"rank{r}.err").read_text() for r in range(2) if (tmp_path / f"rank{r}.err").exists()}
    assert not alive and not errors, errors
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    single = distributed_cells()
    for cell in DISTRIBUTED_CELLS:
        (params, ledger), (params_1, ledger_1), (expected, expected_ledger) = ranks[0][cell], ranks[1][cell], single[cell]
        for name in expected:
            assert torch.equal(params[name], params_1[name])  # the ranks agree bit for bit
            torch.testing.assert_close(params[name], expected[name], rtol=1e-12, atol=1e-14)
        assert ledger == ledger_1 == expected_ledger
        check_epsilon(ledger, make_sampler(cell[0], cell[2]), *cell[:4])
