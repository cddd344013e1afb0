"""Property tests of the allocators: exact totals, bounds, determinism, and each method's own rule."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fcpts_onnx.allocation import ALLOCATORS, AllocationProblem, allocate, get_allocator, register
from fcpts_onnx.errors import OptionError
from fcpts_onnx.masks import magnitude, zero_smallest

METHODS = ("uniform", "global", "erk", "lamp")
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ---------------------------------------------------------------------------------------------
# Strategies: layers as signed weight arrays (float32, float16 or bfloat16) with zeros and ties.
# ---------------------------------------------------------------------------------------------

VALUE_MODES = ("normal", "ties", "fp16", "bf16", "tiny", "allzero", "constant")


def _values(rng: np.random.Generator, shape: tuple[int, ...], mode: str, zero_fraction: float) -> np.ndarray:
    n = int(np.prod(shape))
    if mode == "normal":
        w = rng.standard_normal(n).astype(np.float32)
    elif mode == "ties":  # a handful of distinct magnitudes, both signs
        w = (rng.integers(-3, 4, n) * 0.25).astype(np.float32)
    elif mode == "fp16":  # small fp16 values: many exact duplicates after the cast
        w = (rng.standard_normal(n) * 1e-3).astype(np.float16)
    elif mode == "bf16":
        w = rng.standard_normal(n).astype(ml_dtypes.bfloat16)
    elif mode == "tiny":  # float32 subnormals and near-subnormals
        w = (rng.standard_normal(n) * 1e-39).astype(np.float32)
    elif mode == "allzero":
        w = np.zeros(n, dtype=np.float32)
    else:  # "constant": one magnitude for the whole layer
        w = (np.where(rng.random(n) < 0.5, -1.0, 1.0) * 0.5).astype(np.float32)
    if zero_fraction > 0:
        w[rng.random(n) < zero_fraction] = 0
    return w.reshape(shape)


@st.composite
def shapes(draw, max_2d: int = 64, max_out: int = 16, max_in: int = 16) -> tuple[int, ...]:
    if draw(st.booleans()):
        return (draw(st.integers(1, max_2d)), draw(st.integers(1, max_2d)))
    k = draw(st.integers(1, 3))
    return (draw(st.integers(1, max_out)), draw(st.integers(1, max_in)), k, k)


@st.composite
def layer_sets(draw, max_layers: int = 6, modes=VALUE_MODES, zero_fractions=(0.0, 0.0, 0.05, 0.5, 0.95),
               shape_strategy=None) -> list[np.ndarray]:
    n_layers = draw(st.integers(1, max_layers))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    layers = []
    for _ in range(n_layers):
        shape = draw(shape_strategy if shape_strategy is not None else shapes())
        mode = draw(st.sampled_from(modes))
        zero_fraction = draw(st.sampled_from(zero_fractions))
        layers.append(_values(rng, shape, mode, zero_fraction))
    return layers


targets = st.one_of(
    st.floats(0.0, 1.0, exclude_min=True, exclude_max=True, allow_nan=False),
    st.sampled_from([1e-6, 0.5, 0.8, 0.9, 0.95, 0.98, 0.999999]),
)
max_layer = st.one_of(
    st.floats(0.5, 1.0, exclude_min=True, allow_nan=False),
    st.sampled_from([1.0, 0.98, 0.9, 0.75, 0.500001]),
)


def make_problem(layers: list[np.ndarray], target: float, cap: float) -> AllocationProblem:
    return AllocationProblem(
        magnitudes=[magnitude(w) for w in layers],
        shapes=[tuple(w.shape) for w in layers],
        target=target,
        max_layer_sparsity=cap,
    )


# Independent restatement of the problem's numbers (not read from AllocationProblem).
def required_zeros(layers, target: float) -> int:
    total = sum(w.size for w in layers)
    return math.floor(target * total + 0.5)


def existing_zeros(layers) -> list[int]:
    return [int(np.count_nonzero(w.astype(np.float32) == 0)) for w in layers]


def layer_caps(layers, cap: float) -> list[int]:
    # floor(cap * N_l) (1e-9 absorbs 0.98 * 100 = 97.99999...), never below the existing zeros
    return [max(math.floor(cap * w.size + 1e-9), z) for w, z in zip(layers, existing_zeros(layers))]


def run_allocation(method: str, layers, target: float, cap: float) -> np.ndarray | None:
    """Allocate; on OptionError check the target really is infeasible and return None."""
    n = required_zeros(layers, target)
    zeros, caps = existing_zeros(layers), layer_caps(layers, cap)
    infeasible = sum(zeros) > n or sum(caps) < n
    try:
        counts = allocate(method, make_problem(layers, target, cap))
    except OptionError as exc:
        assert infeasible, f"{method} refused a feasible target: {exc}"
        return None
    assert not infeasible, f"{method} accepted an infeasible target (zeros {sum(zeros)}, caps {sum(caps)}, n {n})"
    return np.asarray(counts)


def check_counts(method: str, layers, target: float, cap: float, counts: np.ndarray) -> None:
    n = required_zeros(layers, target)
    zeros, caps = existing_zeros(layers), layer_caps(layers, cap)
    assert counts.shape == (len(layers),), method
    assert np.issubdtype(counts.dtype, np.integer), method
    assert int(counts.sum()) == n, f"{method}: {int(counts.sum())} zeros, {n} required"
    for k, z, c in zip(counts.tolist(), zeros, caps):
        assert z <= k <= c, f"{method}: count {k} outside [{z}, {c}]"

    # Applying the counts zeroes exactly that many weights, the k smallest of each layer,
    # keeps every existing zero and leaves the other values untouched.
    total = 0
    for w, k in zip(layers, counts.tolist()):
        before = w.copy()
        out = zero_smallest(w, k)
        np.testing.assert_array_equal(w.astype(np.float32), before.astype(np.float32))  # input not mutated
        assert out.dtype == w.dtype and out.shape == w.shape
        o, b = out.astype(np.float32).reshape(-1), w.astype(np.float32).reshape(-1)
        zeroed = o == 0
        assert int(zeroed.sum()) == k
        assert np.all(zeroed[b == 0])
        np.testing.assert_array_equal(o[~zeroed], b[~zeroed])
        if 0 < k < w.size:
            assert np.abs(b[zeroed]).max() <= np.abs(b[~zeroed]).min()
        total += int(zeroed.sum())
    assert total == n


# ---------------------------------------------------------------------------------------------
# Properties shared by every method
# ---------------------------------------------------------------------------------------------


@settings(max_examples=250, **SETTINGS)
@given(layers=layer_sets(), target=targets, cap=max_layer)
def test_every_method_exact_and_in_bounds(layers, target, cap):
    for method in METHODS:
        counts = run_allocation(method, layers, target, cap)
        if counts is None:
            continue
        check_counts(method, layers, target, cap, counts)
        # deterministic: a fresh problem built from copies gives the same counts
        again = allocate(method, make_problem([w.copy() for w in layers], target, cap))
        np.testing.assert_array_equal(counts, again)


@settings(max_examples=80, **SETTINGS)
@given(layers=layer_sets(modes=("normal", "ties"), zero_fractions=(0.3, 0.6, 0.9)),
       cap=max_layer, slack=st.integers(-3, 3))
def test_targets_at_the_feasibility_edge(layers, cap, slack):
    """Targets a few zeros either side of the existing zeros and of the sum of caps."""
    total = sum(w.size for w in layers)
    for edge in (sum(existing_zeros(layers)), sum(layer_caps(layers, cap))):
        n = edge + slack
        if not 0 < n < total:
            continue
        target = n / total
        assume(required_zeros(layers, target) == n)
        for method in METHODS:
            counts = run_allocation(method, layers, target, cap)
            if counts is not None:
                check_counts(method, layers, target, cap, counts)


def test_every_method_is_tested():
    assert set(METHODS) == set(ALLOCATORS)


# ---------------------------------------------------------------------------------------------
# uniform
# ---------------------------------------------------------------------------------------------


@settings(max_examples=150, **SETTINGS)
@given(n_layers=st.integers(1, 6), shape=shapes(), seed=st.integers(0, 2**32 - 1), target=targets)
def test_uniform_equal_layers_hit_the_target_each(n_layers, shape, seed, target):
    rng = np.random.default_rng(seed)
    layers = [(rng.random(shape) + 0.1).astype(np.float32) for _ in range(n_layers)]  # no zeros
    counts = run_allocation("uniform", layers, target, 1.0)
    assert counts is not None
    check_counts("uniform", layers, target, 1.0, counts)
    for k, w in zip(counts.tolist(), layers):
        assert abs(k - target * w.size) < 1, (k, target * w.size)
    assert counts.max() - counts.min() <= 1


@settings(max_examples=150, **SETTINGS)
@given(layers=layer_sets(modes=("normal", "fp16"), zero_fractions=(0.0,)), target=targets)
def test_uniform_unbounded_each_layer_near_target(layers, target):
    layers = [np.where(w.astype(np.float32) == 0, 1, w).astype(w.dtype) for w in layers]  # no zeros
    counts = run_allocation("uniform", layers, target, 1.0)
    assert counts is not None
    total = sum(w.size for w in layers)
    for k, w in zip(counts.tolist(), layers):
        # rounding of the layer (< 1) plus that of the global count (0.5 spread over N_l / N)
        assert abs(k - target * w.size) < 1 + 0.5 * w.size / total + 1e-9


@settings(max_examples=150, **SETTINGS)
@given(layers=layer_sets(), target=targets, cap=max_layer)
def test_uniform_free_layers_share_one_sparsity(layers, target, cap):
    counts = run_allocation("uniform", layers, target, cap)
    if counts is None:
        return
    zeros, caps = existing_zeros(layers), layer_caps(layers, cap)
    free = [i for i, k in enumerate(counts.tolist()) if zeros[i] < k < caps[i]]
    for i in free:
        for j in free:
            si, sj = counts[i] / layers[i].size, counts[j] / layers[j].size
            assert abs(si - sj) < 1 / layers[i].size + 1 / layers[j].size + 1e-9


# ---------------------------------------------------------------------------------------------
# global
# ---------------------------------------------------------------------------------------------


def zeroed_and_kept(layers, counts):
    zeroed, kept = [], []
    for w, k in zip(layers, counts.tolist()):
        b = w.astype(np.float32).reshape(-1)
        z = zero_smallest(w, k).astype(np.float32).reshape(-1) == 0
        zeroed.append(np.abs(b[z]))
        kept.append(np.abs(b[~z]))
    return zeroed, kept


@settings(max_examples=200, **SETTINGS)
@given(layers=layer_sets(), target=targets, cap=max_layer)
def test_global_one_threshold(layers, target, cap):
    counts = run_allocation("global", layers, target, cap)
    if counts is None:
        return
    zeroed, kept = zeroed_and_kept(layers, counts)
    all_zeroed = np.concatenate(zeroed)
    largest_zeroed = all_zeroed.max() if all_zeroed.size else -np.inf
    caps = layer_caps(layers, cap)
    for i, k in enumerate(counts.tolist()):
        if cap == 1.0:
            assert k < caps[i] or kept[i].size == 0
        if k < caps[i] and kept[i].size:
            # a layer below its cap keeps nothing smaller than anything zeroed anywhere
            assert kept[i].min() >= largest_zeroed, (i, kept[i].min(), largest_zeroed)


def test_global_ties_across_layers_are_split_deterministically():
    a = np.ones((4, 4), np.float32)
    b = np.ones((4, 4), np.float32)
    counts = allocate("global", make_problem([a, b], 0.5, 1.0))
    assert counts.sum() == 16
    np.testing.assert_array_equal(counts, allocate("global", make_problem([a, b], 0.5, 1.0)))


def test_global_picks_the_small_layer():
    big = np.full((8, 8), 10.0, np.float32)
    small = np.full((8, 8), 0.1, np.float32)
    counts = allocate("global", make_problem([big, small], 0.25, 1.0))
    assert counts.tolist() == [0, 32]
    counts = allocate("global", make_problem([big, small], 0.25, 0.25))
    assert counts.tolist() == [16, 16]  # small layer capped at 16, the rest from big


# ---------------------------------------------------------------------------------------------
# lamp: against a brute-force reference
# ---------------------------------------------------------------------------------------------


def lamp_reference(w: np.ndarray) -> list[float]:
    """score(u) = w_u^2 / sum_{v >= u} w_v^2 over the layer sorted ascending by |w| (plain loops)."""
    mags = sorted(float(x) for x in np.abs(w.astype(np.float32).reshape(-1)))
    scores = []
    for u in range(len(mags)):
        tail = sum(m * m for m in mags[u:])
        scores.append(0.0 if mags[u] == 0 else mags[u] * mags[u] / tail)
    return scores


@settings(max_examples=200, **SETTINGS)
@given(layers=layer_sets(max_layers=4, modes=("normal", "ties", "fp16", "constant"),
                         zero_fractions=(0.0, 0.0, 0.2),
                         shape_strategy=shapes(max_2d=10, max_out=3, max_in=3)),
       target=targets)
def test_lamp_matches_brute_force(layers, target):
    counts = run_allocation("lamp", layers, target, 1.0)
    if counts is None:
        return
    n = required_zeros(layers, target)
    per_layer = [lamp_reference(w) for w in layers]
    if n == 0:
        assert counts.tolist() == [0] * len(layers)
        return
    threshold = sorted(s for scores in per_layer for s in scores)[n - 1]
    for k, scores in zip(counts.tolist(), per_layer):
        below = sum(s < threshold * (1 - 1e-9) for s in scores)
        at_most = sum(s <= threshold * (1 + 1e-9) for s in scores)
        assert below <= k <= at_most, (k, below, at_most, threshold)
    # Scores rise along each layer's sorted order, so LAMP zeroes a layer's smallest weights.
    for scores in per_layer:
        assert all(a <= b * (1 + 1e-12) for a, b in zip(scores, scores[1:]))


def test_lamp_prunes_small_weights_next_to_an_outlier_first():
    # Layer A: one large outlier, the rest small -> small weights score tiny; layer B: flat.
    a = np.full((1, 10), 0.1, np.float32)
    a[0, -1] = 10.0
    b = np.full((1, 10), 1.0, np.float32)
    counts = allocate("lamp", make_problem([a, b], 0.45, 1.0))
    assert counts.tolist() == [9, 0]


# ---------------------------------------------------------------------------------------------
# erk
# ---------------------------------------------------------------------------------------------


@settings(max_examples=200, **SETTINGS)
@given(layers=layer_sets(modes=("normal", "ties", "fp16"), zero_fractions=(0.0, 0.0, 0.0, 0.3)),
       target=targets, cap=max_layer)
def test_erk_densities_follow_ratios(layers, target, cap):
    counts = run_allocation("erk", layers, target, cap)
    if counts is None:
        return
    zeros, caps = existing_zeros(layers), layer_caps(layers, cap)
    ratio = [sum(w.shape) / w.size for w in layers]
    dims_sum = [sum(w.shape) for w in layers]  # N_l * ratio_l: one count of rounding -> 1/dims_sum in eps
    density = [(w.size - k) / w.size for w, k in zip(layers, counts.tolist())]
    free = [i for i, k in enumerate(counts.tolist()) if zeros[i] < k < caps[i]]
    for i in free:
        for j in free:
            tol = 1 / dims_sum[i] + 1 / dims_sum[j] + 1e-9
            assert abs(density[i] / ratio[i] - density[j] / ratio[j]) <= tol, (i, j, density, ratio)
    if free:
        i = free[0]
        eps_low = density[i] / ratio[i] - 1 / dims_sum[i]
        for j, k in enumerate(counts.tolist()):
            if eps_low * ratio[j] >= 1 + 1e-9:
                assert k == zeros[j], f"layer {j} should stay dense (eps*ratio >= 1) but loses {k - zeros[j]}"


def test_erk_small_layer_stays_dense():
    layers = [np.ones((2, 2), np.float32), np.ones((64, 64), np.float32)]  # ratios 1 and 1/32
    counts = allocate("erk", make_problem(layers, 0.5, 1.0))
    assert counts.tolist() == [0, round(0.5 * 4100)]
    # the two big layers share the density; each loses half
    layers = [np.ones((32, 32), np.float32), np.ones((32, 32), np.float32)]
    assert allocate("erk", make_problem(layers, 0.5, 1.0)).tolist() == [512, 512]


# ---------------------------------------------------------------------------------------------
# Infeasible targets, registry, unknown methods
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_existing_zeros_above_target_refused(method):
    w = np.zeros((10, 10), np.float32)
    w[0, :10] = 1.0  # 90 % zeros
    with pytest.raises(OptionError, match="--sparsity 0.9"):
        allocate(method, make_problem([w], 0.5, 0.98))


@pytest.mark.parametrize("method", METHODS)
def test_caps_below_target_refused(method):
    w = np.ones((10, 10), np.float32)
    with pytest.raises(OptionError, match="max-layer-sparsity"):
        allocate(method, make_problem([w, w.copy()], 0.8, 0.5))
    # exactly at the caps is fine
    assert allocate(method, make_problem([w, w.copy()], 0.5, 0.5)).tolist() == [50, 50]


def test_layer_already_beyond_cap_keeps_its_zeros():
    sparse = np.zeros((10, 10), np.float32)
    sparse[0, 0] = 1  # 99 zeros, cap 0.5 -> cap raised to 99
    dense = np.ones((10, 10), np.float32)
    for method in METHODS:
        counts = allocate(method, make_problem([sparse, dense], 0.6, 0.5))
        assert counts.tolist() == [99, 21], method


def test_duplicate_registration_raises():
    before = dict(ALLOCATORS)
    with pytest.raises(ValueError, match="global"):
        register("global")(lambda problem: np.zeros(len(problem.sizes), np.int64))
    assert ALLOCATORS == before


def test_registered_method_is_checked_by_the_driver():
    register("_test_broken")(lambda problem: np.zeros(len(problem.sizes), np.int64))
    try:
        assert get_allocator("_test_broken") is ALLOCATORS["_test_broken"]
        with pytest.raises(AssertionError, match="_test_broken"):
            allocate("_test_broken", make_problem([np.ones((4, 4), np.float32)], 0.5, 1.0))
    finally:
        del ALLOCATORS["_test_broken"]


def test_unknown_method_lists_the_choices():
    problem = make_problem([np.ones((4, 4), np.float32)], 0.5, 1.0)
    with pytest.raises(OptionError) as info:
        allocate("magnitude", problem)
    message = str(info.value)
    assert "'magnitude'" in message
    for name in ALLOCATORS:
        assert name in message
    with pytest.raises(OptionError):
        get_allocator("")


def test_zero_smallest_breaks_ties_by_position():
    w = np.full(5000, 0.5, np.float32)
    w[::7] = -0.5
    out = zero_smallest(w.reshape(50, 100), 1234).reshape(-1)
    assert np.all(out[:1234] == 0) and np.all(out[1234:] == w[1234:])
    h = np.full((40, 40), 2.0, np.float16)
    h[3, 3] = 0
    out = zero_smallest(h, 10).reshape(-1)
    expected = np.zeros(1600, bool)
    expected[3 * 40 + 3] = True
    expected[:9] = True
    np.testing.assert_array_equal(out == 0, expected)


@settings(max_examples=200, **SETTINGS)
@given(data=st.data())
def test_smallest_scores_counts_the_globally_smallest_within_caps(data):
    # against a plain sort: integer scores make ties common, -inf and inf stand for existing
    # zeros and protected weights; caps cut layers anywhere
    from fcpts_onnx.allocation.problem import smallest_scores

    n_layers = data.draw(st.integers(1, 5))
    values = st.one_of(st.integers(-3, 3).map(float), st.sampled_from([-math.inf, math.inf]))
    scores = [np.array(data.draw(st.lists(values, min_size=1, max_size=40))) for _ in range(n_layers)]
    problem = AllocationProblem([np.abs(s).astype(np.float32) for s in scores], [s.shape for s in scores], 0.0, 1.0)
    problem.caps = np.array([data.draw(st.integers(0, s.size)) for s in scores], dtype=np.int64)
    problem.n_zeros = data.draw(st.integers(0, int(problem.caps.sum())))
    counts = smallest_scores(scores, problem)
    assert counts.sum() == problem.n_zeros and np.all(counts <= problem.caps)
    candidates = [np.sort(s)[:cap] for s, cap in zip(scores, problem.caps)]
    taken = np.concatenate([c[:k] for c, k in zip(candidates, counts)])
    left = np.concatenate([c[k:] for c, k in zip(candidates, counts)])
    if taken.size and left.size:
        assert taken.max() <= left.min()  # nothing left out is smaller than anything taken
    # ties at the cut go to the earliest layers
    if taken.size and left.size and taken.max() == left.min():
        cut = taken.max()
        first_with_a_tie_left = min(i for i, (c, k) in enumerate(zip(candidates, counts)) if np.any(c[k:] == cut))
        assert not any(np.any(c[:k] == cut) for c, k in list(zip(candidates, counts))[first_with_a_tie_left + 1:])
