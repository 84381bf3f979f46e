"""CPU threads: split GEMMs and row blocks give NumPy's results, and the fused ops stay exact under them."""

import os
import resource
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import minigpt
from minigpt import functional as F
from minigpt.autograd import gradcheck, parallel

rng = np.random.default_rng(5)

needs_threads = pytest.mark.skipif(
    not parallel._blas_libraries(), reason="NumPy's BLAS cannot be set to one thread: minigpt stays single-threaded"
)


@pytest.fixture
def split_everything(monkeypatch: pytest.MonkeyPatch):
    """Two threads, and every GEMM and row kernel split, however small (tiny blocks too)."""
    threads = parallel.get_num_threads()
    parallel.set_num_threads(2)
    monkeypatch.setattr(parallel, "MIN_SPLIT_FLOPS", 0)
    monkeypatch.setattr(parallel, "MIN_SPLIT_ELEMENTS", 0)
    monkeypatch.setattr(parallel, "MIN_SLICE_ROWS", 1)
    monkeypatch.setattr(parallel, "MIN_SLICE_FLOOR", 1)
    monkeypatch.setattr(parallel, "BLOCK_ELEMENTS", 8)
    yield
    parallel.set_num_threads(threads)


def _views(shape: tuple[int, ...]) -> list[np.ndarray]:
    a = rng.standard_normal(shape)
    return [a, a.swapaxes(-1, -2).copy().swapaxes(-1, -2)]  # C order, and a transposed layout


@needs_threads
@pytest.mark.parametrize(
    "a_shape,b_shape",
    [((7, 5), (5, 3)), ((1, 4), (4, 6)), ((3, 7, 5), (3, 5, 2)), ((2, 3, 7, 5), (5, 4)), ((1, 9, 4), (1, 4, 4))],
)
def test_split_matmul_matches_numpy(split_everything, a_shape, b_shape):
    for a in _views(a_shape):
        for b in _views(b_shape):
            np.testing.assert_allclose(parallel.matmul(a, b), a @ b, rtol=1e-12)
            out = np.empty(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1]))
            assert parallel.matmul(a, b, out=out) is out
            np.testing.assert_allclose(out, a @ b, rtol=1e-12)


@needs_threads
def test_row_blocks_cover_every_row_in_order(split_everything):
    x = np.arange(40.0).reshape(20, 2)
    out = np.empty_like(x)

    def kernel(block, out_block):
        np.multiply(block, 2, out=out_block)
        return block[:, 0].tolist()

    parts = parallel.map_row_blocks(kernel, x, out)
    assert len(parts) > 2  # several blocks on each of the two threads
    assert [r for part in parts for r in part] == x[:, 0].tolist()
    np.testing.assert_array_equal(out, 2 * x)


@needs_threads
def test_worker_errors_reach_the_caller(split_everything):
    def fail():
        raise KeyError("from the worker")

    with pytest.raises(KeyError, match="from the worker"):
        parallel.run_parallel([lambda: 1, fail])


def test_set_num_threads_rejects_nonsense():
    with pytest.raises(ValueError, match="positive integer"):
        parallel.set_num_threads(0)
    assert minigpt.get_num_threads() == parallel.get_num_threads() >= 1


def _rand(*shape):
    return minigpt.tensor(rng.standard_normal(shape), requires_grad=True)


@needs_threads
def test_fused_ops_gradcheck_when_split(split_everything):
    x, w, b = _rand(2, 6, 5), _rand(4, 5), _rand(4)
    assert gradcheck(F.linear, [x, w, b])
    assert gradcheck(F.layer_norm, [_rand(3, 4, 5), _rand(5), _rand(5)])
    assert gradcheck(F.gelu, [_rand(6, 5)])
    targets = rng.integers(0, 7, 9)
    assert gradcheck(lambda z: F.cross_entropy(z, targets), [_rand(9, 7)])
    q, k, v = _rand(2, 2, 6, 3), _rand(2, 2, 6, 3), _rand(2, 2, 6, 3)
    assert gradcheck(F.scaled_dot_product_attention, [q, k, v])
    q, k, v = _rand(1, 3, 4, 3), _rand(1, 3, 6, 3), _rand(1, 3, 6, 3)  # one sequence: split by head
    assert gradcheck(F.scaled_dot_product_attention, [q, k, v])


@needs_threads
@pytest.mark.parametrize("shape, tk", [((3, 2, 5, 4), 5), ((1, 3, 4, 4), 9), ((5, 1, 1, 4), 7)])
def test_attention_shared_out_by_sequence_or_head_equals_the_array_code(split_everything, shape, tk):
    from minigpt.autograd import fused, kernels_cpu

    q = rng.standard_normal(shape).astype(np.float32)
    k, v = (rng.standard_normal((*shape[:2], tk, shape[3])).astype(np.float32) for _ in range(2))
    g = rng.standard_normal(shape).astype(np.float32)
    results = []
    for op in (kernels_cpu.ScaledDotProductAttention(), fused.ScaledDotProductAttention()):
        op.needs_input_grad = [True, True, True]
        results.append((op.forward(q, k, v, True, 0.0, None), *op.backward(g)))
        if type(op) is kernels_cpu.ScaledDotProductAttention:
            assert len(op.parts) == 2  # two threads, two blocks
    for kernel, array in zip(*results):
        np.testing.assert_allclose(kernel, array, rtol=1e-5, atol=1e-6)


@needs_threads
def test_gpt_training_is_the_same_on_one_and_two_threads(monkeypatch):
    from test_equivalence import train_losses

    threads = parallel.get_num_threads()
    try:
        parallel.set_num_threads(1)
        one_thread_losses, one_thread_state = train_losses()
        parallel.set_num_threads(2)
        monkeypatch.setattr(parallel, "MIN_SPLIT_FLOPS", 0)
        monkeypatch.setattr(parallel, "MIN_SPLIT_ELEMENTS", 0)
        monkeypatch.setattr(parallel, "MIN_SLICE_FLOOR", 1)
        monkeypatch.setattr(parallel, "BLOCK_ELEMENTS", 64)
        split_losses, split_state = train_losses()
    finally:
        parallel.set_num_threads(threads)
    np.testing.assert_allclose(split_losses, one_thread_losses, rtol=1e-5)
    for name, value in split_state.items():
        # atol as in test_equivalence: AdamW blows float32 rounding in ~0 gradients (the key bias) up to lr-sized steps
        np.testing.assert_allclose(value, one_thread_state[name], rtol=1e-3, atol=2e-5, err_msg=name)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_freed_activations_are_reused_without_page_faults():
    # A training step frees and reallocates the same large buffers: they must come back from the
    # heap, not from the OS (mallopt takes C ints: a trim threshold of 1 << 62 once wrapped to 0).
    from minigpt.autograd import backend

    if not backend.keep_freed_memory():
        pytest.skip("not glibc, or MINIGPT_KEEP_MEMORY=0")

    def step() -> None:  # 176 MB alive at once (more than glibc's 64 MB top pad), then freed
        buffers = [np.ones((3072, 2048), dtype=np.float32) for _ in range(4)]  # 24 MB each
        buffers.append(np.ones((10240, 2048), dtype=np.float32))  # 80 MB: above glibc's largest mmap threshold
        del buffers

    step()  # warm up: the heap grows once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 500


@needs_threads
def test_nested_and_concurrent_dispatch_run_serially_instead_of_deadlocking(split_everything):
    inner = [lambda: 1, lambda: 2, lambda: 3]
    assert parallel.run_parallel([lambda: parallel.run_parallel(inner), lambda: parallel.run_parallel(inner)]) == [
        [1, 2, 3],
        [1, 2, 3],
    ]
    a, b = rng.standard_normal((64, 32)), rng.standard_normal((32, 16))
    results: list[np.ndarray] = []
    threads = [threading.Thread(target=lambda: results.append(parallel.matmul(a, b))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4
    for r in results:
        np.testing.assert_allclose(r, a @ b, rtol=1e-12)


@needs_threads
def test_blas_threads_lends_the_threads_to_blas_and_takes_them_back():
    threads = parallel.get_num_threads()
    parallel.set_num_threads(2)
    try:
        with parallel.blas_threads():
            assert parallel.get_num_threads() == 1  # minigpt's pool idles: no split inside
            a = rng.standard_normal((300, 200))
            np.testing.assert_allclose(parallel.matmul(a, a.T), a @ a.T, atol=1e-12)  # NumPy's a @ a.T is a SYRK
        assert parallel.get_num_threads() == 2
        with pytest.raises(KeyError), parallel.blas_threads():
            raise KeyError("restored even so")
        assert parallel.get_num_threads() == 2
    finally:
        parallel.set_num_threads(threads)


@needs_threads
@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX")
def test_a_forked_child_gets_workers_of_its_own(split_everything):
    a = rng.standard_normal((64, 32))
    expected = a @ a.T
    np.testing.assert_allclose(parallel.matmul(a, a.T), expected, atol=1e-12)  # the parent's workers run
    pid = os.fork()
    if pid == 0:  # the child: without new workers this split would wait forever
        ok = np.allclose(parallel.matmul(a, a.T), expected, rtol=0, atol=1e-12)
        os._exit(0 if ok else 1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    pytest.fail("the forked child hung in a split matmul")


def test_adamw_updates_a_scalar_parameter():
    from minigpt import nn, optim

    p = nn.Parameter(np.array(1.0, dtype=np.float32))
    opt = optim.AdamW([p], lr=0.1, weight_decay=0.0)
    p.grad = np.array(2.0, dtype=np.float32)
    opt.step()
    np.testing.assert_allclose(p.data, 0.9, rtol=1e-6)  # Adam's first step moves by lr against the gradient's sign


def test_import_changes_no_process_wide_setting_and_work_restores_the_blas_threads():
    code = (
        "import numpy as np\n"
        "from threadpoolctl import threadpool_info\n"
        "blas = lambda: {i['filepath']: i['num_threads'] for i in threadpool_info() if i['user_api'] == 'blas'}\n"
        "before = blas()\n"
        "import minigpt\n"
        "from minigpt.autograd import parallel\n"
        "after_import = blas()\n"
        "a = np.ones((512, 512), np.float32)\n"
        "x = minigpt.tensor(a, requires_grad=True)\n"
        "(x @ x).sum().backward(); parallel.matmul(a, a)\n"
        "after_work = {k: n for k, n in blas().items() if k in before}  # MKL (the extra) may have loaded\n"
        "print(list(before.values()), list(after_import.values()), list(after_work.values()), parallel._blas_holders)\n"
    )
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "2", "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    before = out.split("]")[0] + "]"
    assert before == "[2]" and out.strip() == f"{before} {before} {before} 0"  # after import, after work
