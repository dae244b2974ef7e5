"""Sampling assumptions come from the sampler (issue 20 item 3): a batch whose mask a fundp sampler
yielded is refused by a step whose sample_rate / divisor / mechanism contradicts that sampler, even
one built without sampler=; import layout: no cycle among fundp's modules."""

import ast
import pathlib

import pytest
import torch

import fundp
from fundp import mf

N, D = 40, 3
X = torch.randn(N, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
PARAMS = {"w": torch.zeros(D, dtype=torch.float64)}


def loss_fn(p, b):
    return (b @ p["w"] - 1.0) ** 2


def _step(**kw):
    return fundp.dp_step(loss_fn, max_norm=1.0, noise_multiplier=1.0, grad_method="vmap", **kw)


def _run(step, batches, t=0, **kw):
    indices, mask = batches[t] if hasattr(batches, "__getitem__") else list(batches)[t]
    return step(PARAMS, X[indices], fundp.random.fold_in(fundp.random.key(123), t), mask=mask, ledger=fundp.Ledger(), **kw)


def test_sample_rate_typed_twice_must_match_the_batches():
    batches = fundp.data.poisson_batches(N, 0.25, fundp.random.key(1), steps=3, pad_to_multiple=8)
    with pytest.raises(ValueError, match="sample_rate=0.5 .* Poisson-sampled at 0.25"):
        _run(_step(sample_rate=0.5, expected_batch_size=10.0), batches)
    with pytest.raises(ValueError, match="expected_batch_size=20.0"):
        _run(_step(sample_rate=0.25, expected_batch_size=20.0), batches)
    out = _run(_step(sample_rate=0.25, expected_batch_size=10.0), batches)  # the right numbers: accepted
    assert out.ledger == fundp.Ledger([(1.0, 0.25, 1)])
    # built with sampler=, a batch of another sampler is refused
    other = fundp.data.poisson_batches(N, 0.5, fundp.random.key(2), steps=3, pad_to_multiple=8)
    with pytest.raises(ValueError, match="not from the sampler the step was built for"):
        _run(_step(sampler=batches), other, t=1)
    _run(_step(sampler=batches), batches, t=1)


def test_correlated_noise_with_plain_poisson_batches_is_refused():
    """The issue's first repro: a min-separation mechanism fed plain Poisson batches."""
    mech = mf.mechanism(mf.banded_toeplitz([1.0, 0.5], 8), mf.min_separation(2))
    batches = fundp.data.poisson_batches(N, 0.25, fundp.random.key(3), steps=3, pad_to_multiple=8)
    step = _step(expected_batch_size=10.0, noise_mechanism=mech)
    with pytest.raises(ValueError, match="the mechanism accounts only"):
        _run(step, batches, noise_state=mech.init(PARAMS))
    cyclic = mf.cyclic_poisson_batches(N, 0.5, fundp.random.key(4), num_partitions=2, steps=4, pad_to_multiple=8)
    with pytest.raises(ValueError, match="cyclic Poisson batches need"):
        _run(_step(sample_rate=0.5, expected_batch_size=10.0), cyclic)


def test_shuffled_and_truncated_batches_need_their_own_accounting():
    shuffled = fundp.sampling.shuffled_batches(N, 8, fundp.random.key(5), steps=3)
    with pytest.raises(ValueError, match="shuffled fixed-size batches"):
        _run(_step(sample_rate=0.2, expected_batch_size=8.0), shuffled)
    truncated = fundp.data.truncated_poisson_batches(N, 0.25, fundp.random.key(6), max_batch_size=16, steps=2)
    with pytest.raises(ValueError, match="truncation"):
        _run(_step(sample_rate=0.25, expected_batch_size=10.0), truncated)
    out = _run(_step(sampler=truncated), truncated)  # with its sampler the truncation is recorded
    assert out.ledger.events[0].max_batch_size == 16


def test_no_import_cycle_among_fundp_modules():
    """Every import (module level or inside a function) between fundp's modules, as a graph:
    no cycle outside the ghost engine's own package (whose rule modules import its tracer)."""
    root = pathlib.Path(fundp.__file__).parent
    modules = {}
    for path in root.rglob("*.py"):
        parts = ["fundp", *path.relative_to(root).with_suffix("").parts]
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def resolve(name):
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        return name if name in modules else None

    graph = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                target = resolve(name) if name.startswith("fundp") else None
                if target and target != module and not module.startswith(target + "."):
                    graph[module].add(target)
    ghost = "fundp.engines.ghost"

    def reaches(start, goal, seen):
        for nxt in graph[start]:
            if nxt == goal:
                return True
            if nxt not in seen:
                seen.add(nxt)
                if reaches(nxt, goal, seen):
                    return True
        return False

    cycles = [m for m in graph if not m.startswith(ghost) and reaches(m, m, set())]
    assert cycles == []


def test_a_padded_poisson_batch_without_its_mask_is_refused():
    """Issue 20: a fundp Poisson sampler's padded batch passed without its mask is refused (its
    padding rows, copies of example 0, would each count as an example); with its mask it trains."""
    batches = fundp.data.poisson_batches(N, 0.25, fundp.random.key(7), steps=2, pad_to_multiple=8)
    indices, mask = batches[0]
    table = X.clone()
    step = fundp.dp_step(lambda p, i: loss_fn(p, table[i]), max_norm=1.0, noise_multiplier=1.0, grad_method="vmap",
                         sample_rate=0.25, expected_batch_size=10.0)  # no sampler=: the tag is what refuses
    with pytest.raises(ValueError, match="mask=None with a padded batch of PoissonBatches"):
        step(PARAMS, indices, fundp.random.key(8), ledger=fundp.Ledger())
    with pytest.raises(ValueError, match="mask=None"):  # inside a batch tuple
        _step(sample_rate=0.25, expected_batch_size=10.0)(PARAMS, (indices,), fundp.random.key(8))
    out = step(PARAMS, indices, fundp.random.key(8), ledger=fundp.Ledger(), mask=mask)  # the refusal drew no key
    assert out.ledger == fundp.Ledger([(1.0, 0.25, 1)])
    # a full shuffled batch has no padding and needs no mask; the padded last one does
    shuffled = list(fundp.sampling.shuffled_batches(5, 2, fundp.random.key(9), steps=3, drop_last=False))
    plain = fundp.dp_step(lambda p, i: loss_fn(p, table[i]), max_norm=1.0, noise_multiplier=1.0, grad_method="vmap",
                          expected_batch_size=2.0)
    plain(PARAMS, shuffled[0][0], fundp.random.key(10))
    with pytest.raises(ValueError, match="mask=None with a padded batch of ShuffledBatches"):
        plain(PARAMS, shuffled[2][0], fundp.random.key(11))


def test_a_mechanism_is_refused_at_build_with_batches_that_break_its_participation():
    """With sampler=, too: plain or truncated Poisson batches for any correlated-noise mechanism, and
    cyclic Poisson batches whose partitions put an example closer or more often than the mechanism
    assumes (an example of 2 partitions joins 2 of 4 steps, 2 apart)."""
    minsep = mf.mechanism(mf.banded_toeplitz([1.0, 0.5], 4), mf.min_separation(2))
    poisson = fundp.data.poisson_batches(N, 0.25, fundp.random.key(3), steps=4, pad_to_multiple=8)
    truncated = fundp.data.truncated_poisson_batches(N, 0.25, fundp.random.key(3), max_batch_size=16, steps=4)
    for batches in (poisson, truncated):
        with pytest.raises(ValueError, match="with a noise_mechanism: the mechanism accounts only"):
            _step(sampler=batches, noise_mechanism=minsep)
    cyclic = mf.cyclic_poisson_batches(N, 0.5, fundp.random.key(4), num_partitions=2, steps=4, pad_to_multiple=8)
    _step(sampler=cyclic, noise_mechanism=minsep)  # 2 apart, at most 2 of 4: what min_separation(2) allows
    for participation in (mf.single_participation(), mf.min_separation(3), mf.min_separation(2, max_participations=1)):
        with pytest.raises(ValueError, match="num_partitions=2 put an example in up to 2"):
            _step(sampler=cyclic, noise_mechanism=mf.mechanism(mf.identity(4), participation))
