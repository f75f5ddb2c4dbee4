"""Merge methods on small hand-written tensors: expected numbers are worked
out by hand in the comments, and the edge cases (exact ends, zero tensors,
seeded DARE) are checked bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

from modelkit.core.registry import TRANSFORMS, transform
from modelkit.errors import ModelkitError
from modelkit.merge import methods as mm
from modelkit.merge.methods import (
    add_difference,
    check_params,
    get_method,
    methods,
    model_stock,
    slerp,
    sum_twice,
    ties,
    train_difference,
    triple_sum,
    weighted_sum,
)


def T(rows: list) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def close(x: torch.Tensor, expected: list, atol: float = 1e-6) -> bool:
    return torch.allclose(x, T(expected), atol=atol, rtol=0)


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def bits_equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    return torch.equal(x.view(torch.int32), y.view(torch.int32))


# --- registry -------------------------------------------------------------------


def test_registry_lists_methods_with_inferred_params() -> None:
    METHODS = methods()
    assert set(METHODS) >= {"weighted_sum", "add_difference", "triple_sum", "sum_twice",
                            "slerp", "train_difference", "ties", "model_stock"}
    ws = get_method("weighted_sum")
    assert (ws.n_models, ws.defaults, ws.seeded) == (2, {"alpha": None}, False)
    assert get_method("add_difference").n_models == 3
    assert get_method("triple_sum").defaults == {"alpha": None, "beta": None}
    t = get_method("ties")
    assert t.n_models == -1 and t.seeded
    assert t.defaults == {"alpha": 1.0, "k": 0.2, "vote_sgn": False, "dare_p": 0.0,
                          "dare_rescale": True, "trim": "round"}
    assert get_method("model_stock").defaults == {}
    for m in METHODS.values():
        assert m.summary and m.reference


def test_unknown_method_suggests() -> None:
    with pytest.raises(ModelkitError, match="unknown merge method 'weighted_sun'") as e:
        get_method("weighted_sun")
    assert "did you mean 'weighted_sum'" in str(e.value)
    assert "known: " in str(e.value) and "model_stock" in str(e.value)
    with pytest.raises(ModelkitError) as e:
        get_method("zzz")
    assert "did you mean" not in str(e.value)


def test_check_params() -> None:
    ties_m = get_method("ties")
    assert check_params(ties_m, {"k": 1}) == {"alpha": 1.0, "k": 1.0, "vote_sgn": False,
                                              "dare_p": 0.0, "dare_rescale": True,
                                              "trim": "round"}
    assert isinstance(check_params(ties_m, {"k": 1})["k"], float)
    ws = get_method("weighted_sum")
    assert check_params(ws, {"alpha": 0.3}) == {"alpha": 0.3}
    with pytest.raises(ModelkitError, match="weighted_sum: unknown parameter 'beta'"):
        check_params(ws, {"alpha": 0.3, "beta": 1})
    with pytest.raises(ModelkitError, match="weighted_sum: missing parameter 'alpha'"):
        check_params(ws, {})
    with pytest.raises(ModelkitError, match="'alpha' must be a number"):
        check_params(ws, {"alpha": "0.3"})
    with pytest.raises(ModelkitError, match="'alpha' must be finite"):
        check_params(ws, {"alpha": math.nan})
    with pytest.raises(ModelkitError, match="'vote_sgn' must be true or false"):
        check_params(ties_m, {"vote_sgn": 1})


def test_merge_method_decorator_and_duplicates() -> None:
    try:
        @transform("_test_tmp", summary="s", reference="r")
        def tmp(a: torch.Tensor, b: torch.Tensor, *, x: float, y: int = 3) -> torch.Tensor:
            return a + b * x * y

        m = get_method("_test_tmp")
        assert m.defaults == {"x": None, "y": 3} and m.fn is tmp
        assert m.n_models == 2 and not m.seeded
        with pytest.raises(ValueError, match="already registered"):
            transform("_test_tmp", summary="s", reference="r")(tmp)
        with pytest.raises(TypeError, match="model-role annotation"):
            transform("_test_tmp2", summary="s")(lambda a, *, x: a)
    finally:
        TRANSFORMS.pop("_test_tmp", None)
        TRANSFORMS.pop("_test_tmp2", None)


def test_apply_checks_arity_and_passes_generator() -> None:
    a, b = T([1.0, 2.0]), T([3.0, 4.0])
    assert close(get_method("weighted_sum").apply([a, b], {"alpha": 0.5}), [2.0, 3.0])
    with pytest.raises(ModelkitError, match="weighted_sum takes 2 models, got 3"):
        get_method("weighted_sum").apply([a, b, b], {"alpha": 0.5})
    with pytest.raises(ModelkitError, match="ties takes 2 or more models, got 1"):
        get_method("ties").apply([a], {})
    g = torch.Generator().manual_seed(0)
    out = get_method("ties").apply([a, b], {"dare_p": 0.5, "k": 1.0}, generator=g)
    assert out.shape == a.shape


def test_shape_mismatch_refused() -> None:
    with pytest.raises(ModelkitError, match=r"shapes differ: \(2, 2\) vs \(4,\)"):
        weighted_sum(torch.zeros(2, 2), torch.zeros(4), alpha=0.5)


# --- linear family ---------------------------------------------------------------


def test_weighted_sum_values_and_exact_ends() -> None:
    a, b = T([[1, 2], [3, 4]]), T([[5, 6], [7, 8]])
    # 0.75*a + 0.25*b = a + 1
    assert close(weighted_sum(a, b, alpha=0.25), [[2, 3], [4, 5]])
    # alpha moves toward B; 1.5 extrapolates past B
    assert close(weighted_sum(a, b, alpha=1.5), [[7, 8], [9, 10]])
    x, y = rand(16, 16, seed=1), rand(16, 16, seed=2)
    assert weighted_sum(x, y, alpha=0) is x
    assert weighted_sum(x, y, alpha=1) is y
    assert weighted_sum(x, y, alpha=0.0) is x and weighted_sum(x, y, alpha=1.0) is y


def test_add_difference() -> None:
    a, b, c = T([[1, 2], [3, 4]]), T([[2, 2], [5, 0]]), T([[1, 1], [1, 1]])
    # b - c = [[1, 1], [4, -1]]; a + 0.5 * that
    assert close(add_difference(a, b, c, alpha=0.5), [[1.5, 2.5], [5, 3.5]])
    assert close(add_difference(a, b, c, alpha=1), [[2, 3], [7, 3]])
    neg_zero = T([[-0.0, 1.0], [2.0, -3.0]])
    b2 = rand(2, 2, seed=3)
    assert add_difference(neg_zero, b2, b2.clone(), alpha=0.7) is neg_zero
    assert add_difference(neg_zero, b, c, alpha=0) is neg_zero
    # the formula alone also leaves a unchanged when b == c, except that -0.0
    # would become 0.0: that is why b == c returns a itself
    x, y = rand(8, 8, seed=4), rand(8, 8, seed=5)
    assert bits_equal(torch.add(x, y - y.clone(), alpha=0.7), x)
    assert not bits_equal(torch.add(neg_zero, b2 - b2.clone(), alpha=0.7), neg_zero)


def test_triple_sum_and_sum_twice() -> None:
    a, b, c = T([[4, 8], [0, 4]]), T([[0, 4], [8, 4]]), T([[2, 2], [2, 2]])
    # 0.25a + 0.25b + 0.5c
    assert close(triple_sum(a, b, c, alpha=0.25, beta=0.5), [[2, 4], [3, 3]])
    # 0*a + 0.5b + 0.5c
    assert close(triple_sum(a, b, c, alpha=0.5, beta=0.5), [[1, 3], [5, 3]])
    assert triple_sum(a, b, c, alpha=0, beta=0) is a
    assert triple_sum(a, b, c, alpha=1, beta=0) is b
    assert triple_sum(a, b, c, alpha=0, beta=1) is c
    # 0.5 * (0.5a + 0.5b) + 0.5c = 0.5 * [[2, 6], [4, 4]] + [[1, 1], [1, 1]]
    assert close(sum_twice(a, b, c, alpha=0.5, beta=0.5), [[2, 4], [3, 3]])
    # (1-0.5) * (0.75a + 0.25b) + 0.5c = 0.5 * [[3, 7], [2, 4]] + [[1, 1], [1, 1]]
    assert close(sum_twice(a, b, c, alpha=0.25, beta=0.5), [[2.5, 4.5], [2, 3]])
    assert sum_twice(a, b, c, alpha=0, beta=0) is a
    assert sum_twice(a, b, c, alpha=1, beta=0) is b
    assert sum_twice(a, b, c, alpha=0.3, beta=1) is c


# --- slerp ----------------------------------------------------------------------------


def test_slerp_values() -> None:
    h = math.sqrt(0.5)
    # orthogonal unit vectors: omega = pi/2
    assert close(slerp(T([1, 0]), T([0, 1]), alpha=0.5), [h, h])
    # alpha = 1/3: sin(pi/3), sin(pi/6)
    assert close(slerp(T([1, 0]), T([0, 1]), alpha=1 / 3), [math.sqrt(3) / 2, 0.5])
    # norms 2 and 4 interpolate linearly to 3, direction half way
    out = slerp(T([[2, 0], [0, 0]]), T([[0, 0], [0, 4]]), alpha=0.5)
    assert close(out, [[3 * h, 0], [0, 3 * h]], atol=1e-5)
    assert torch.linalg.vector_norm(out).item() == pytest.approx(3.0)


def test_slerp_fallbacks_and_exact_ends() -> None:
    # zero tensor: plain lerp
    assert close(slerp(T([0, 0]), T([1, 2]), alpha=0.25), [0.25, 0.5])
    assert close(slerp(T([0, 0]), T([0, 0]), alpha=0.25), [0, 0])
    # parallel and antiparallel: plain lerp
    assert close(slerp(T([1, 2]), T([2, 4]), alpha=0.5), [1.5, 3])
    assert close(slerp(T([1, 2]), T([-1, -2]), alpha=0.5), [0, 0])
    x, y = rand(4, 4, seed=5), rand(4, 4, seed=6)
    assert slerp(x, y, alpha=0) is x and slerp(x, y, alpha=1) is y
    # 0-d tensors work too
    assert slerp(torch.tensor(2.0), torch.tensor(4.0), alpha=0.5).item() == 3.0


# --- train difference --------------------------------------------------------------


def test_train_difference() -> None:
    a = T([[1, 0], [2, 5], [0, 0]])
    b = T([[3, 1], [2, 5], [3, 0]])
    c = T([[1, 1], [0, 5], [0, 0]])
    # factor 1.8 * 0.5 = 0.9, per element (b-c) * |b-a| / (|b-c| + |b-a|):
    # (0,0): 2*2/4 = 1 -> 1.9 ; (0,1): b == c -> 0 ; (1,0): |b-a| = 0 -> 0
    # (1,1): denominator 0 -> 0 ; (2,0): 3*3/6 = 1.5 -> 1.35 ; (2,1): 0
    out = train_difference(a, b, c, alpha=0.5)
    assert close(out, [[1.9, 0], [2, 5], [1.35, 0]])
    x, y = rand(4, 4, seed=7), rand(4, 4, seed=8)
    assert train_difference(x, y, y.clone(), alpha=1) is x
    assert train_difference(x, y, rand(4, 4, seed=9), alpha=0) is x
    assert torch.isfinite(train_difference(x, x.clone(), rand(4, 4), alpha=1)).all()


# --- TIES / DARE ---------------------------------------------------------------------

BASE = T([[1, 1], [1, 1]])
D1 = T([[1, -2], [3, 1]])
D2 = T([[3, 1], [-1, 1]])
D3 = T([[-2, -1], [1, -5]])


def test_ties_sign_election_and_disjoint_mean() -> None:
    models = [BASE + d for d in (D1, D2, D3)]
    # per element, deltas -> elected sign by count -> mean of agreeing:
    # (0,0) 1,3,-2 -> + -> 2 ; (0,1) -2,1,-1 -> - -> -1.5
    # (1,0) 3,-1,1 -> + -> 2 ; (1,1) 1,1,-5 -> + -> 1
    out = ties(BASE, *models, alpha=0.5, k=1.0)
    assert close(out, [[2, 0.25], [2, 1.5]])
    # vote_sgn elects by the sum instead: (1,1) sum -3 -> - -> -5, the rest unchanged
    out = ties(BASE, *models, alpha=1.0, k=1.0, vote_sgn=True)
    assert close(out, [[3, -0.5], [3, -4]])
    assert ties(BASE, *models, alpha=0) is BASE


def test_ties_top_k_trim() -> None:
    delta = T([[1, -9, 2, 3], [-4, 5, 0.5, -6], [7, 0.1, -8, 0.2], [10, -11, 12, 0.3]])
    base = torch.full((4, 4), 2.0)
    # k = 0.25 of 16 elements: keep the 4 largest magnitudes 12, -11, 10, -9
    out = ties(base, base + delta, k=0.25)
    expected = [[2, -7, 2, 2], [2, 2, 2, 2], [2, 2, 2, 2], [12, -9, 14, 2]]
    assert close(out, expected)
    assert torch.equal(ties(base, base + delta, k=0.0), base)
    # two models: each is trimmed on its own (keep 1 of 4), then merged
    b = torch.zeros(2, 2)
    out = ties(b, T([[5, 1], [1, 1]]), T([[1, 1], [1, -7]]), k=0.25)
    # model 1 keeps (0,0)=5, model 2 keeps (1,1)=-7; no conflicts
    assert close(out, [[5, 0], [0, -7]])


def test_ties_zero_deltas() -> None:
    base = rand(3, 3, seed=10)
    assert torch.equal(ties(base, base.clone(), base.clone(), k=1.0), base)


def test_dare_p0_equals_ties_and_seeding() -> None:
    base, m1, m2 = rand(16, 16, seed=11), rand(16, 16, seed=12), rand(16, 16, seed=13)
    plain = ties(base, m1, m2, k=0.5)
    g = torch.Generator().manual_seed(3)
    assert torch.equal(ties(base, m1, m2, k=0.5, dare_p=0.0, generator=g), plain)

    def run(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return ties(base, m1, m2, k=0.5, dare_p=0.5, generator=g)

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))
    assert not torch.equal(run(7), plain)


def test_dare_drops_and_rescales() -> None:
    base, model = torch.zeros(1000), torch.ones(1000) * 3
    g = torch.Generator().manual_seed(0)
    out = ties(base, model, k=1.0, dare_p=0.5, generator=g)
    kept = out != 0
    assert set(out.unique().tolist()) == {0.0, 6.0}  # survivors scaled by 1/(1-0.5)
    assert 0.4 < kept.float().mean().item() < 0.6
    g = torch.Generator().manual_seed(0)
    out2 = ties(base, model, k=1.0, dare_p=0.5, dare_rescale=False, generator=g)
    assert set(out2.unique().tolist()) == {0.0, 3.0}
    assert torch.equal(out2 != 0, kept)  # same seed, same mask


def test_ties_errors() -> None:
    with pytest.raises(ModelkitError, match="needs a seed"):
        ties(BASE, BASE + D1, dare_p=0.5)
    with pytest.raises(ModelkitError, match=r"dare_p must be in \[0, 1\)"):
        ties(BASE, BASE + D1, dare_p=1.0, generator=torch.Generator())
    with pytest.raises(ModelkitError, match=r"k must be in \[0, 1\]"):
        ties(BASE, BASE + D1, k=1.5)
    with pytest.raises(ModelkitError, match="at least one model"):
        ties(BASE)


# --- model stock -------------------------------------------------------------------------


def test_model_stock_rows() -> None:
    base = torch.ones(3, 2)
    s3 = math.sqrt(3)
    d1 = T([[1, 0], [1, 0], [1, 0]])
    d2 = T([[1, 0], [0, 1], [1, s3]])
    # row 0: cos 1 -> t = 2*1/(1+1) = 1 -> mean [1, 0]
    # row 1: cos 0 -> t = 0 -> base
    # row 2: cos 1/2 -> t = 1/1.5 = 2/3 -> 2/3 * [1, s3/2]
    out = model_stock(base, base + d1, base + d2)
    assert close(out - base, [[1, 0], [0, 0], [2 / 3, s3 / 3]], atol=1e-6)


def test_model_stock_more_models_and_edges() -> None:
    base = rand(4, 3, 3, 3, seed=14)
    d = rand(4, 3, 3, 3, seed=15)
    # three equal task vectors: cos 1 -> t = 3/(1+2) = 1 -> base + d
    out = model_stock(base, base + d, base + d, base + d)
    assert torch.allclose(out, base + d, atol=1e-6)
    # 1-D tensors use the whole-tensor cosine: orthogonal -> t = 0
    out = model_stock(torch.zeros(2), T([1, 0]), T([0, 1]))
    assert close(out, [0, 0])
    # zero task vectors -> base
    b = rand(5, seed=16)
    assert torch.equal(model_stock(b, b.clone(), b.clone()), b)
    with pytest.raises(ModelkitError, match="at least 2 models, got 1"):
        model_stock(b, b)
    empty = torch.zeros(0, 4)
    assert model_stock(empty, empty, empty).shape == (0, 4)
    assert ties(empty, empty, empty).shape == (0, 4)


# --- dtype --------------------------------------------------------------------------------

CALLS = {
    "weighted_sum": (2, {"alpha": 0.3}),
    "add_difference": (3, {"alpha": 0.7}),
    "triple_sum": (3, {"alpha": 0.2, "beta": 0.3}),
    "sum_twice": (3, {"alpha": 0.2, "beta": 0.3}),
    "slerp": (2, {"alpha": 0.4}),
    "train_difference": (3, {"alpha": 0.5}),
    "ties": (3, {"k": 0.5, "dare_p": 0.3}),
    "model_stock": (3, {}),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_output_dtype_and_shape_follow_inputs(dtype: torch.dtype) -> None:
    assert set(CALLS) == set(methods())
    for name, (n, params) in CALLS.items():
        tensors = [rand(4, 6, seed=20 + i).to(dtype) for i in range(n)]
        out = get_method(name).apply(tensors, params, torch.Generator().manual_seed(0))
        assert out.dtype == dtype and out.shape == (4, 6), name
        assert torch.isfinite(out).all(), name


def test_module_has_no_io_imports() -> None:
    import ast
    import inspect as ins

    tree = ast.parse(ins.getsource(mm))
    imported = {a.name.split(".")[0] for n in ast.walk(tree)
                if isinstance(n, ast.Import | ast.ImportFrom)
                for a in (n.names if isinstance(n, ast.Import) else [ast.alias(n.module or "")])}
    assert imported <= {"__future__", "difflib", "inspect", "math", "collections", "dataclasses",
                        "itertools", "torch", "modelkit"}
    assert {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} <= {
        "__future__", "itertools", "torch", "modelkit.core.registry", "modelkit.errors"}


def test_ties_trim_rules_count_like_their_tools() -> None:
    """``round`` keeps round(k*n); ``mecha`` keeps n - int((1-k)*n) + 1 (the
    int((1-k)*n)-th smallest magnitude is sd-mecha's threshold)."""
    base = torch.zeros(10)
    model = torch.arange(1.0, 11.0)  # distinct magnitudes 1..10
    for k, want_round, want_mecha in ((0.25, 2, 4), (0.5, 5, 6), (0.05, 1, 2), (1.0, 10, 10)):
        got_round = ties(base, model, k=k, trim="round")
        got_mecha = ties(base, model, k=k, trim="mecha")
        assert int((got_round != 0).sum()) == want_round, k
        assert int((got_mecha != 0).sum()) == want_mecha, k
        # the kept elements are the largest ones
        assert torch.equal(got_mecha[-want_mecha:], model[-want_mecha:])
    with pytest.raises(ModelkitError, match="'trim': 'x' is not one of round, mecha"):
        check_params(get_method("ties"), {"trim": "x"})


def test_blend_weights_outside_0_1_warn_not_fail(models: dict, capsys: pytest.CaptureFixture
                                                 ) -> None:
    from modelkit.cli import main
    from modelkit.core.registry import param_warnings

    ws, ts = get_method("weighted_sum"), get_method("triple_sum")
    assert ws.params["alpha"].blend and "blend weight 0..1" in ws.params["alpha"].describe()
    assert not get_method("train_difference").params["alpha"].blend
    assert param_warnings(ws, {"alpha": 0.0}) == param_warnings(ws, {"alpha": 1}) == []
    assert param_warnings(ts, {"alpha": 0.5, "beta": -0.25}) == [
        "triple_sum: beta -0.25 is outside 0..1, the range of a blend weight: the result "
        "extrapolates past the models"]
    assert param_warnings(ws, {"alpha": {"IN00": 0.5, "OUT11": 1.25}}, "steps.m") == [
        "steps.m: alpha 1.25 is outside 0..1, the range of a blend weight: the result "
        "extrapolates past the models"]
    code = main(["merge", str(models["sd1"]), str(models["sd1_b"]), "-o",
                 str(models["sd1"].parent / "never.safetensors"), "--alpha", "1.5",
                 "--dry-run", "-q"])
    err = capsys.readouterr().err
    assert code == 0 and err == ("warning: steps.merge (weighted_sum): alpha 1.5 is outside "
                                 "0..1, the range of a blend weight: the result extrapolates "
                                 "past the models\n")
