"""The engine's primitive ops: gradchecks over shapes and broadcasting, graph semantics, clear errors."""

import numpy as np
import pytest

import minigpt
from minigpt.autograd import backend, gradcheck, no_grad

rng = np.random.default_rng(0)


def rand(*shape, positive=False, requires_grad=True):
    data = rng.standard_normal(shape)
    if positive:
        data = np.abs(data) + 0.5
    return minigpt.tensor(data, requires_grad=requires_grad)


# Broadcast pairs: equal shapes, size-1 dims, rank differences, 0-d on either side.
BROADCAST_SHAPES = [((3, 4), (3, 4)), ((3, 1), (1, 4)), ((2, 3, 4), (4,)), ((), (2, 3)), ((2, 3), ()), ((1,), (2, 1))]


@pytest.mark.parametrize("sa,sb", BROADCAST_SHAPES)
@pytest.mark.parametrize(
    "op",
    [lambda a, b: a + b, lambda a, b: a - b, lambda a, b: a * b, lambda a, b: a / b, lambda a, b: a**b],
    ids=["add", "sub", "mul", "div", "pow"],
)
def test_binary_ops_gradcheck(op, sa, sb):
    a, b = rand(*sa, positive=True), rand(*sb, positive=True)
    assert gradcheck(op, [a, b])


@pytest.mark.parametrize(
    "op",
    [
        lambda x: 2 * x,
        lambda x: 1 - x,
        lambda x: 2 / x,
        lambda x: x - 3,
        lambda x: x / 4,
        lambda x: x**2,
        lambda x: x**3,
        lambda x: x**-1.5,
        lambda x: x**0.5,
        lambda x: 2.0**x,
        lambda x: -x,
        lambda x: np.full((3, 4), 2.0) * x,
        lambda x: np.ones(4) - x,
        lambda x: np.full((3, 4), 3.0) / x,
    ],
    ids=[
        "rmul",
        "rsub",
        "rdiv",
        "sub_s",
        "div_s",
        "sq",
        "cube",
        "pow_neg",
        "pow_half",
        "rpow",
        "neg",
        "np_mul",
        "np_rsub",
        "np_rdiv",
    ],
)
def test_scalar_and_numpy_operands(op):
    assert gradcheck(op, [rand(3, 4, positive=True)])


def test_numpy_operand_on_left_gives_tensor():
    x = rand(3)
    assert isinstance(np.ones(3) * x, minigpt.Tensor)
    assert isinstance(np.ones(3) + x, minigpt.Tensor)


@pytest.mark.parametrize(
    "op",
    [
        lambda x: x.exp(),
        lambda x: x.log(),
        lambda x: x.sqrt(),
        lambda x: x.tanh(),
        lambda x: x.sigmoid(),
        lambda x: x.relu(),
    ],
    ids=["exp", "log", "sqrt", "tanh", "sigmoid", "relu"],
)
@pytest.mark.parametrize("shape", [(), (5,), (2, 3, 4)])
def test_unary_ops_gradcheck(op, shape):
    x = rand(*shape, positive=op.__code__.co_names[0] in ("log", "sqrt"))
    if op(x).ndim and "relu" in op.__code__.co_names:
        x.data[np.abs(x.data) < 1e-3] = 0.5  # keep away from the kink
    assert gradcheck(op, [x])


@pytest.mark.parametrize(
    "sa,sb",
    [
        ((3, 4), (4, 5)),
        ((2, 3, 4), (4, 5)),
        ((2, 3, 4), (2, 4, 5)),
        ((2, 1, 3, 4), (5, 4, 2)),
        ((4,), (4, 5)),
        ((3, 4), (4,)),
        ((4,), (4,)),
        ((3, 4), (2, 4, 5)),
    ],
)
def test_matmul_gradcheck(sa, sb):
    assert gradcheck(lambda a, b: a @ b, [rand(*sa), rand(*sb)])


@pytest.mark.parametrize("dim", [None, 0, 1, -1, (0, 2)])
@pytest.mark.parametrize("keepdim", [False, True])
@pytest.mark.parametrize("name", ["sum", "mean", "max", "var"])
def test_reductions_gradcheck(name, dim, keepdim):
    x = rand(3, 4, 5)
    assert gradcheck(lambda t: getattr(t, name)(dim=dim, keepdim=keepdim), [x])


def test_reductions_match_numpy():
    x = rand(3, 4, requires_grad=False)
    np.testing.assert_allclose(x.var(dim=1).data, x.data.var(axis=1, ddof=1))
    np.testing.assert_allclose(x.var(dim=1, unbiased=False).data, x.data.var(axis=1))
    np.testing.assert_allclose(x.max(dim=0, keepdim=True).data, x.data.max(axis=0, keepdims=True))
    np.testing.assert_allclose(x.mean().data, x.data.mean())


def test_var_with_no_degrees_of_freedom_is_nan_as_torch():
    one = minigpt.tensor(np.array([3.0], dtype=np.float32), requires_grad=True)
    with np.errstate(invalid="ignore"):  # 0 * inf, as torch's "degrees of freedom is <= 0"
        v = one.var()
        v.backward()
        pair = minigpt.tensor(np.array([[1.0, 2.0], [5.0, 5.0]], dtype=np.float32))
        over = pair.var(dim=1, correction=2).data
    assert np.isnan(v.item()) and np.isnan(one.grad).all()
    assert np.isinf(over[0]) and np.isnan(over[1])  # torch: sum / max(0, n - correction)
    assert one.var(unbiased=False).item() == 0.0  # the population variance of one element is 0


@pytest.mark.filterwarnings("ignore:var\\(\\)")  # torch warns of no degrees of freedom for the cases with none
@pytest.mark.parametrize("shape,dim,correction", [((1,), None, 1), ((2,), None, 2), ((3, 4), 1, 5), ((3, 4), 0, 1)])
def test_var_matches_torch(shape, dim, correction):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        ours = minigpt.tensor(x).var(dim=dim, correction=correction).data
    theirs = torch.from_numpy(x).var(dim=dim, correction=correction).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, equal_nan=True)


def test_reductions_on_0d():
    x = rand()
    assert gradcheck(lambda t: t.sum() * 3, [x])
    assert gradcheck(lambda t: t.max(), [x])


def test_max_ties_share_gradient():
    x = minigpt.tensor(np.array([1.0, 3.0, 3.0]), requires_grad=True)
    x.max().backward()
    np.testing.assert_allclose(x.grad, [0.0, 0.5, 0.5])


def test_shape_ops_gradcheck():
    x = rand(2, 3, 4)
    assert gradcheck(lambda t: t.reshape(6, 4) * np.arange(4.0), [x])
    assert gradcheck(lambda t: t.view(-1, 2), [x])
    assert gradcheck(lambda t: t.permute(2, 0, 1), [x])
    assert gradcheck(lambda t: t.transpose(0, 2), [x])
    assert gradcheck(lambda t: t.T, [x])
    assert gradcheck(lambda t: t.unsqueeze(1).squeeze(1), [x])


@pytest.mark.parametrize(
    "index",
    [1, -1, slice(1, 3), (slice(None), 2), (0, slice(None), slice(1, None, 2)), (Ellipsis, 0), (None, 1)],
)
def test_getitem_basic_gradcheck(index):
    assert gradcheck(lambda t: t[index], [rand(3, 4, 5)])


def test_getitem_integer_arrays_with_repeats_scatter_add():
    x = rand(5, 3)
    idx = np.array([0, 2, 2, 4, 0, 0])
    assert gradcheck(lambda t: t[idx], [x])
    assert gradcheck(lambda t: t[idx, np.array([0, 1, 1, 2, 2, 0])], [x])
    assert gradcheck(lambda t: t[minigpt.tensor(np.array([[1, 1], [3, 1]]))], [x])
    x.grad = None
    x[idx].sum().backward()
    np.testing.assert_allclose(x.grad[:, 0], [3, 0, 2, 0, 1])


@pytest.mark.parametrize("n_rows", [5, 600])  # a one-hot GEMM, and sorted segment sums (NumPy); scatter-add (CuPy)
def test_index_add_rows_sums_repeated_ids(xp, n_rows):
    ids = xp.asarray([0, 2, 2, 4, 0, 0] * 100)
    values = xp.asarray(np.arange(600 * 3, dtype=np.float64).reshape(600, 3))
    out = backend.index_add_rows(n_rows, ids, values)
    assert backend.get_array_module(out) is xp and out.shape == (n_rows, 3)
    expected = np.zeros((n_rows, 3))
    np.add.at(expected, backend.to_numpy(ids), backend.to_numpy(values))
    np.testing.assert_allclose(backend.to_numpy(out), expected)


def test_cat_stack_split_gradcheck():
    a, b, c = rand(2, 3), rand(2, 5), rand(2, 3)
    assert gradcheck(lambda a, b: minigpt.cat([a, b], dim=1), [a, b])
    assert gradcheck(lambda a, c: minigpt.stack([a, c], dim=1), [a, c])
    assert gradcheck(lambda a, c: minigpt.stack([a, c]), [a, c])
    x = rand(7, 2)
    assert gradcheck(lambda t: minigpt.cat([p * (i + 1) for i, p in enumerate(t.split(3))]), [x])
    assert gradcheck(lambda t: t.split([2, 5], dim=0)[1], [x])
    assert [p.shape for p in x.split(3)] == [(3, 2), (3, 2), (1, 2)]


def test_split_is_one_node_whose_backward_gets_every_piece_once():
    x = rand(4, 9)
    # pieces used twice, in another order, one unused, and the input used directly as well
    assert gradcheck(lambda t: (lambda q, k, v: q * v + v * 2 + q.exp() + t[:, :3])(*t.split(3, dim=1)), [x])
    assert gradcheck(lambda t: t.split([1, 3], dim=0)[0] * 3, [x])  # only one piece reaches the loss
    x.grad, calls = None, []
    pieces = x.split(3, dim=1)
    op = pieces[0]._ctx
    assert all(p._ctx is op for p in pieces) and all(p.data.base is x.data for p in pieces)  # views
    backward = op.backward
    op.backward = lambda grads: calls.append([g is None for g in grads]) or backward(grads)
    (pieces[2] * 2 + pieces[0]).sum().backward()
    assert calls == [[False, True, False]]  # once, with None for the piece no gradient reached
    np.testing.assert_array_equal(x.grad, np.tile([1.0] * 3 + [0.0] * 3 + [2.0] * 3, (4, 1)))


def test_where_and_masked_fill_gradcheck():
    a, b = rand(3, 4), rand(1, 4)
    cond = rng.random((3, 4)) > 0.5
    assert gradcheck(lambda a, b: minigpt.where(cond, a, b), [a, b])
    assert gradcheck(lambda a: minigpt.where(cond, a, 0.0), [a])
    mask = np.triu(np.ones((3, 4), dtype=bool), k=1)
    assert gradcheck(lambda a: a.masked_fill(mask, -5.0), [a])
    out = a.masked_fill(mask, -5.0)
    assert (out.data[mask] == -5.0).all()


def test_micrograd_readme_example():
    a = minigpt.tensor(np.array(-4.0), requires_grad=True)
    b = minigpt.tensor(np.array(2.0), requires_grad=True)
    c = a + b
    d = a * b + b**3
    c = c + c + 1
    c = c + 1 + c + (-a)
    d = d + d * 2 + (b + a).relu()
    d = d + 3 * d + (b - a).relu()
    e = c - d
    f = e**2
    g = f / 2.0
    g = g + 10.0 / f
    g.backward()
    assert a.dtype == np.float64 and g.ndim == 0
    assert abs(g.item() - 24.7041) < 1e-4
    assert abs(a.grad - 138.8338) < 1e-4
    assert abs(b.grad - 645.5773) < 1e-4


def test_deep_chain_backprops_without_recursion_error():
    x = minigpt.tensor(np.array(1.0), requires_grad=True)
    y = x
    for _ in range(100_000):
        y = y * 1.0
    y.backward()
    assert x.grad == 1.0


def test_tensor_used_twice_gets_both_contributions_and_grads_accumulate():
    x = rand(3)
    y = (x * x + x).sum()
    y.backward(retain_graph=True)
    np.testing.assert_allclose(x.grad, 2 * x.data + 1)
    y.backward()
    np.testing.assert_allclose(x.grad, 2 * (2 * x.data + 1))


def test_graph_is_released_after_backward():
    x = rand(3)
    y = (x * 2).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        y.backward()


def test_no_grad_builds_no_graph():
    x = rand(3)
    with no_grad():
        y = (x * 2).exp().sum()
    assert not y.requires_grad and y._ctx is None
    assert minigpt.is_grad_enabled()

    @no_grad()
    def f(t):
        return t * 2

    assert f(x)._ctx is None


def test_leaf_grads_are_independent_buffers():
    a, b = rand(3), rand(3)
    (a + b).sum().backward()
    a.grad *= 5  # an optimizer scaling one grad in place must not touch the other
    np.testing.assert_allclose(b.grad, np.ones(3))


def test_dtypes_of_tensor_factory():
    assert minigpt.tensor(np.zeros(2)).dtype == np.float64
    assert minigpt.tensor(np.zeros(2, dtype=np.float32)).dtype == np.float32
    assert minigpt.tensor(1.5).dtype == np.float32
    assert minigpt.tensor([1, 2]).dtype == np.float32
    assert minigpt.tensor(np.array([1, 2])).dtype.kind == "i"
    assert minigpt.tensor([1, 2], dtype=np.int64).dtype == np.int64
    x = minigpt.tensor(np.ones(3, dtype=np.float32), requires_grad=True)
    assert (x * 2.5).dtype == np.float32 and (2.5 / x).dtype == np.float32 and (x**2).dtype == np.float32


def test_factories_and_accessors():
    g = np.random.default_rng(1)
    r = minigpt.randn(2, 3, generator=g)
    assert r.shape == (2, 3) and r.dtype == np.float32
    assert minigpt.zeros(2, 2).numpy().sum() == 0 and minigpt.ones((3,)).numpy().sum() == 3
    assert minigpt.arange(4).tolist() == [0, 1, 2, 3]
    x = rand(2, 3)
    d = x.detach()
    assert not d.requires_grad and d.data is x.data
    assert x.to("cpu") is x and x.device == "cpu"
    assert minigpt.tensor(3.0).item() == 3.0


def test_error_messages():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(4,\)"):
        rand(2, 3) + rand(4)
    with pytest.raises(ValueError, match=r"matmul.*\(2, 3\).*\(4, 5\)"):
        rand(2, 3) @ rand(4, 5)
    with pytest.raises(RuntimeError, match="not a scalar"):
        (rand(2, 3) * 2).backward()
    with pytest.raises(TypeError, match="floating-point"):
        minigpt.tensor(np.array([1, 2]), requires_grad=True)
    with pytest.raises(RuntimeError, match="does not require grad"):
        minigpt.tensor(1.0).backward()


def test_backward_with_explicit_grad():
    x = rand(2, 3)
    (x * 3).backward(np.ones((2, 3)))
    np.testing.assert_allclose(x.grad, np.full((2, 3), 3.0))


def test_slices_and_whole_tensor_gradients_accumulate():
    x = rand(4, 3)

    def f(t):
        s = t.exp()
        a, b = s + 0.0, s  # Add hands one gradient array to two paths
        return (a[:2] * 3).sum() + (b * b).sum() + b[1:].sum() + a[np.array([0, 0, 3])].sum() + a.sum()

    assert gradcheck(f, [x])


def test_an_op_on_a_raw_array_or_list_says_to_wrap_it():
    """As torch's 'must be Tensor, not numpy.ndarray': one line naming the op, not a device mix-up."""
    import minigpt.functional as F
    from minigpt import nn

    with pytest.raises(TypeError, match=r"linear: expects Tensors, got \(ndarray, Parameter\); wrap arrays with"):
        nn.Linear(3, 2, bias=False)(np.ones((2, 3), np.float32))
    with pytest.raises(TypeError, match=r"gelu: expects Tensors, got \(ndarray\)"):
        F.gelu(np.ones(3))
    with pytest.raises(TypeError, match=r"relu: expects Tensors, got \(list\)"):
        F.relu([1.0])
