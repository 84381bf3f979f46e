"""MKL's GEMM (the `mkl` extra): the same products as NumPy's, the layouts it takes, the switch, and
the fallbacks. The tests that multiply with MKL skip where it is not installed (CI); run them with
`pip install -e ".[mkl]"`."""

import numpy as np
import pytest

from minigpt.autograd import mkl, parallel

needs_mkl = pytest.mark.skipif(not mkl.available(), reason='MKL is not installed (pip install -e ".[mkl]")')
rng = np.random.default_rng(7)


@pytest.fixture
def reload_mkl(monkeypatch: pytest.MonkeyPatch):
    """mkl.available() decides again in the test (it loads once per process); monkeypatch puts the
    process's choice back after it."""
    monkeypatch.setattr(mkl, "_gemms", None)


def test_layouts_give_transpose_flags_and_leading_dimensions():
    a = np.zeros((6, 10), np.float32)
    assert mkl._layout(a) == (mkl._NO_TRANS, 10)
    assert mkl._layout(a.T) == (mkl._TRANS, 10)
    assert mkl._layout(a[1:4, 2:7]) == (mkl._NO_TRANS, 10)  # a block: rows 10 apart
    assert mkl._layout(a[1:4, 2:7].T) == (mkl._TRANS, 10)
    assert mkl._layout(a[:, ::2]) is None  # no unit stride
    assert mkl._layout(a[:, :1]) == (mkl._NO_TRANS, 10)
    assert mkl._layout(a[:1].T) == (mkl._TRANS, 10)  # one column of unit stride
    assert mkl._layout(np.broadcast_to(np.zeros(5, np.float32), (3, 5))) is None  # rows 0 apart


def _operands(dtype):
    """(a, b) pairs in every layout MKL takes, and some it does not (those go to NumPy)."""
    big = rng.standard_normal((70, 90)).astype(dtype)
    w = rng.standard_normal((33, 40)).astype(dtype)
    return [
        (big[:37, :33], w),  # a block of a wider array: leading dimension 90
        (big[:37, :33], w.T.copy().T),  # b transposed in memory
        (big[:33, :37].T, w),  # a transposed
        (big[:33, :37].T, w[::-1][:33]),  # b with a negative row stride: NumPy's
        (big[:1, :33], w),  # one row
        (big[:37, :33], w[:, :1]),  # one column
        (big[:37, ::3][:, :25], w[:25]),  # no unit stride: NumPy's
    ]


@needs_mkl
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_products_match_numpy(dtype, monkeypatch):
    tol = 1e-5 if dtype == np.float32 else 1e-12
    gemm, calls = mkl._gemms[np.dtype(dtype)], []
    monkeypatch.setitem(mkl._gemms, np.dtype(dtype), lambda *args: calls.append(gemm(*args)))
    for a, b in _operands(dtype):
        got = mkl.matmul(a, b)
        assert got.dtype == dtype and got.shape == (a.shape[0], b.shape[1])
        np.testing.assert_allclose(got, a @ b, rtol=tol, atol=tol * np.abs(a).sum(1).max())
        out = np.full((a.shape[0], b.shape[1]), np.nan, dtype)
        assert mkl.matmul(a, b, out=out) is out
        np.testing.assert_allclose(out, a @ b, rtol=tol, atol=tol * np.abs(a).sum(1).max())
    assert len(calls) == 2 * 5  # all but the two marked NumPy's, with and without out


@needs_mkl
def test_what_mkl_cannot_take_goes_to_numpy():
    a = rng.standard_normal((4, 4)).astype(np.float32)
    inplace = a.copy()
    assert np.array_equal(mkl.matmul(inplace, inplace, out=inplace), a @ a)  # out overlaps the operands
    batched = rng.standard_normal((2, 3, 4)).astype(np.float32)
    np.testing.assert_array_equal(mkl.matmul(batched, a), batched @ a)
    assert mkl.matmul(a, a.astype(np.float64)).dtype == np.float64  # mixed dtypes promote, as NumPy's
    assert mkl.matmul(np.ones((3, 0), np.float32), np.ones((0, 2), np.float32)).tolist() == [[0, 0]] * 3
    ints = np.arange(6).reshape(2, 3)
    np.testing.assert_array_equal(mkl.matmul(ints, ints.T), ints @ ints.T)


@needs_mkl
def test_split_products_on_threads_match_numpy(monkeypatch):
    monkeypatch.setattr(parallel, "MIN_SPLIT_FLOPS", 0)
    threads = parallel.get_num_threads()
    parallel.set_num_threads(2)
    try:
        a, b = rng.standard_normal((300, 64)).astype(np.float32), rng.standard_normal((64, 50)).astype(np.float32)
        np.testing.assert_allclose(parallel.matmul(a, b), a @ b, rtol=1e-5, atol=1e-4)
        gx, gw = parallel.matmuls((a, b), (a.T, a))
        np.testing.assert_allclose(gx, a @ b, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(gw, a.T @ a, rtol=1e-5, atol=1e-3)
    finally:
        parallel.set_num_threads(threads)


@needs_mkl
def test_training_with_mkl_and_numpys_blas_gives_the_same_losses(monkeypatch, reload_mkl):
    from test_kernels_cpu import train_losses

    with_mkl = train_losses()
    monkeypatch.setenv(mkl.SWITCH, "1")
    monkeypatch.setattr(mkl, "_gemms", None)
    assert not mkl.available()
    with_numpy = train_losses()
    np.testing.assert_allclose(with_mkl, with_numpy, rtol=1e-5)
    assert with_mkl[-1] < with_mkl[0]


def test_the_switch_keeps_numpys_blas(monkeypatch, reload_mkl):
    monkeypatch.setenv(mkl.SWITCH, "1")
    assert not mkl.available()
    assert "NumPy's BLAS" in mkl.describe()
    a = rng.standard_normal((5, 3)).astype(np.float32)
    np.testing.assert_array_equal(mkl.matmul(a, a.T), np.matmul(a, a.T))


def test_not_installed_and_unusable_libraries_fall_back(monkeypatch, reload_mkl, tmp_path, capsys):
    monkeypatch.delenv(mkl.SWITCH, raising=False)
    for attr in ("prefix", "base_prefix"):
        monkeypatch.setattr(mkl.sys, attr, str(tmp_path))
    monkeypatch.setattr(mkl.site, "USER_BASE", str(tmp_path))
    monkeypatch.setattr(mkl.ctypes.util, "find_library", lambda name: None)
    if mkl.sys.platform.startswith("linux"):
        assert mkl.library_path() is None
        assert not mkl.available() and capsys.readouterr().err == ""  # not installed: nothing to say
        (tmp_path / "lib").mkdir()
        (tmp_path / "lib" / "libmkl_rt.so.3").write_bytes(b"not a library")
        monkeypatch.setattr(mkl, "_gemms", None)
        assert mkl.library_path() == str(tmp_path / "lib" / "libmkl_rt.so.3")
        assert not mkl.available()
        assert "not usable" in capsys.readouterr().err
    else:
        assert not mkl.available()


def test_numpy_built_on_mkl_is_left_alone(monkeypatch, reload_mkl):
    """Conda's NumPy multiplies with MKL itself: minigpt then neither loads it nor sets its threading layer."""
    monkeypatch.delenv(mkl.SWITCH, raising=False)
    monkeypatch.setattr(mkl, "library_path", lambda: "/nonexistent/libmkl_rt.so.3")  # CDLL would fail loudly
    monkeypatch.setattr(mkl, "_numpy_has_mkl", lambda: True)
    assert not mkl.available()


def test_numpys_own_blas_is_its_build_not_what_is_loaded():
    mkl.available()  # loads MKL where the extra is installed: threadpoolctl then lists it beside OpenBLAS
    if "openblas" not in np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"]:
        pytest.skip("NumPy is not built on OpenBLAS here")
    assert not mkl._numpy_has_mkl()
