"""The H100 compile check (`make gpu-check`, benchmarks/gpu_compile.py) can fail, and reads what it
claims to: registers and spills from ptxas, launches from the thunk sequence, and the bytes of one
decode step from XLA's cost analysis.

Needs the gpu-check extra (jax-cuda12-plugin and ptxas), so plain `make test` skips this file;
`make gpu-check` runs it alone in its own venv.
"""

import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("jax_cuda12_plugin")  # importing it does not start jax
# Only with the plugin (the gpu-check venv): before jax starts, or the plugin looks for a GPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_compile  # noqa: E402
import jax  # noqa: E402
import pallas_kernels as pk  # noqa: E402
from llama_jax import LlamaConfig, quant  # noqa: E402

# Small and prime-ish where the kernels allow it (head dim 32: Triton tiles are powers of two).
TINY = LlamaConfig(vocab_size=509, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=352, max_seq_len=256)
TOO_BIG = pk.FlashBlockSizes(block_q=512, block_k=512, num_warps=8)  # 512x128 bf16 tiles, pipelined


def _launches(row, kernel: str) -> int:
    """Launches per step of kernels named kernel (XLA may add a suffix: decode_attention_1)."""
    return sum(n for k, n in row["launches"].items() if isinstance(k, tuple) and k[1].startswith(kernel))


def _programs(*args, **kwargs) -> dict:
    """gpu_compile.programs as {name: (fn, args, meta)}."""
    return {name: (fn, fargs, meta) for name, fn, fargs, meta in gpu_compile.programs(*args, **kwargs)}


@pytest.fixture(scope="module")
def h100():
    return gpu_compile.h100(1).devices[0]


@pytest.fixture(scope="module")
def tiny(h100):
    return _programs(TINY, h100, batch=1, context=256, prompt=64)


@pytest.fixture(scope="module")
def tiny_decode(tiny, tmp_path_factory):
    """The tiny decode's report row and failures (compiled once for the tests that read it)."""
    fn, args, meta = tiny["decode"]
    return gpu_compile.analyse_program("tiny decode", fn, args, meta, tmp_path_factory.mktemp("decode"))


def test_tiles_that_do_not_fit_fail_the_check(monkeypatch, capsys, tmp_path):
    bad = gpu_compile.flash_case(128, 4, True, 1024, block_sizes=TOO_BIG)
    monkeypatch.setattr(gpu_compile, "kernel_cases", lambda quick: [bad])
    monkeypatch.setattr(gpu_compile, "program_specs", lambda quick: [])
    monkeypatch.setattr(gpu_compile, "train_specs", lambda quick: [])
    out = tmp_path / "report.md"

    assert gpu_compile.main(["--quick", "--out", str(out), "--dump-dir", str(tmp_path / "dump")]) == 1
    fails = [l for l in capsys.readouterr().out.splitlines() if l.startswith("FAIL")]
    assert len(fails) == 1, fails
    assert fails[0].startswith(f"FAIL compile: {bad.label}: RESOURCE_EXHAUSTED: Shared memory size limit exceeded")
    assert "## Failures (1)" in out.read_text()
    # Known (listed) failures do not fail the run; a listed one that no longer happens does.
    known = tmp_path / "expected.txt"
    known.write_text(f"# known\ncompile: {bad.label}\n")
    assert gpu_compile.main(["--expected", str(known), "--dump-dir", str(tmp_path / "dump2")]) == 0
    known.write_text(f"compile: {bad.label}\nspill: a kernel since fixed\n")
    capsys.readouterr()
    assert gpu_compile.main(["--expected", str(known), "--dump-dir", str(tmp_path / "dump3")]) == 1
    assert "FIXED (remove it from" in capsys.readouterr().out


def test_a_small_kernel_compiles_with_registers_and_no_spills(h100, tmp_path):
    case = gpu_compile.flash_case(64, 4, False, 2048)  # not one of kernel_cases: make gpu-check compiles each once
    rows, fails = gpu_compile.check_kernel(case, h100, tmp_path)
    assert fails == []
    [row] = rows
    assert row["kernel"] == "flash_attention_fwd"
    assert 0 < row["registers"] <= 255
    assert row["spill_stores"] == row["spill_loads"] == 0
    assert row["warps"] >= 1 and row["smem"] > 0 and row["grid"][1:] == (2, 32)  # (q blocks, B, H)


def test_a_tiny_program_gets_its_decode_figures(tiny, tiny_decode, tmp_path):
    _, args, meta = tiny["decode"]
    # Minimum bytes, by hand: every weight (of the untied input embedding, one row) and the cache's
    # used blocks (256 tokens, 16 blocks of 16), not the null block.
    d, f, kv, v, L = 128, 352, 2 * 32, 509, 2
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d
    assert meta["min_bytes"] == (2 * (L * per_layer + d + d * v + d), 2 * (L * 2 * 256 * kv))
    assert meta["num_blocks"] == 256 // 16 + 1 and meta["block_size"] == 16
    pool = args[2]
    assert [x.shape for x in pool[0]] == [(17, 16, 2, 32)] * 2  # the engine's pool: [P, block_size, K, E]

    row, fails = tiny_decode
    assert not [f for f in fails if f.key.startswith(("compile", "spill", "donation"))], fails
    assert 1.0 <= row["ratio"] < 5, row["ratio"]  # the step reads at least the weights and the cache
    assert row["cost"]["flops"] >= meta["min_bytes"][0]  # a multiply-add (2 FLOPs) per bf16 weight (2 bytes)
    kernels = row["launches"]
    assert kernels["kernel"] > 0
    assert _launches(row, "paged_decode_attention") == TINY.n_layers  # one per layer and step

    fn, args, meta = tiny["prefill"]
    row, fails = gpu_compile.analyse_program("tiny prefill", fn, args, meta, tmp_path / "prefill")
    assert not fails, fails
    assert row["cost"]["flops"] >= 64 * meta["min_bytes"][0] * 0.5  # 64 tokens through (most) weights
    assert _launches(row, "flash_attention_fwd") == TINY.n_layers


def test_a_tiny_int4_program_reads_its_stored_bytes(h100, tmp_path):
    fn, args, meta = _programs(TINY, h100, batch=1, context=256, prompt=64, quantize="int4")["decode"]
    # By hand: linear weights at 4 bits plus an f16 scale (and min) per 32; bf16 norms; of the int8
    # embedding one row and its f32 scale; the int8 head with a scale per output; the KV cache as in bf16.
    d, f, kv, v, L = 128, 352, 2 * 32, 509, 2
    linear = 2 * d * d + 2 * d * kv + 3 * d * f
    per_layer = linear // 2 + linear // 32 * 2 * (2 if quant.MODEL_INT4_MINS else 1) + 2 * d * 2
    assert meta["min_bytes"] == (L * per_layer + 2 * d + (d + 4) + (d * v + 4 * v), 2 * (L * 2 * 256 * kv))

    row, fails = gpu_compile.analyse_program("tiny int4 decode", fn, args, meta, tmp_path / "int4")
    assert not [f for f in fails if f.key.startswith(("compile", "spill", "donation"))], fails
    assert 1.0 <= row["ratio"] < 1.5, row["ratio"]  # a tiny model's activations weigh; 1B and 8B are checked to 1.05
    # Each layer's products (wqkv wo w13 w2: one device, so q/k/v and w1/w3 fused) read their bytes in
    # the kernel; the untied head, kept [D, V] as stored, is XLA's convert fused into its dot.
    assert _launches(row, "quant_matmul") == 4 * TINY.n_layers


def test_quant_kernel_compiles_without_spills(h100, tmp_path):
    case = gpu_compile.quant_case("int4", 1, 4096, 4096, 32, mins=True)  # GGUF Q4_1 at 8B's wq (not in kernel_cases)
    rows, fails = gpu_compile.check_kernel(case, h100, tmp_path)
    assert fails == []
    [row] = rows
    assert row["kernel"] == "quant_matmul" and 0 < row["registers"] <= 255 and row["spill_stores"] == 0, row
    assert row["grid"][:2] == (1, 4096 // 32) and row["grid"][2] > 1  # output channels, and K split


def test_a_program_that_copies_the_pool_fails_the_check(tiny, tmp_path):
    # The engine's decode without donating its pool: XLA must then write a new pool each call.
    fn, args, meta = tiny["decode"]
    copying = jax.jit(fn.__wrapped__, static_argnums=(0, 3))
    _, fails = gpu_compile.analyse_program("tiny decode", copying, args, meta, tmp_path / "copy")
    [fail] = [f for f in fails if f.key.startswith("donation")]
    assert fail.key == "donation: tiny decode" and fail.detail.startswith("no donated argument"), fail


def test_a_scanned_decode_counts_every_layer(h100, tmp_path):
    # HLO cost analysis counts a while loop's body once; the harness multiplies the layer scan by
    # its trip count, so one step still reads every layer's weights.
    fn, args, meta = _programs(TINY, h100, batch=1, context=256, prompt=64, layout="scan")["decode"]
    row, _ = gpu_compile.analyse_program("tiny decode (scan)", fn, args, meta, tmp_path / "scan")
    assert row["cost"]["bytes"] >= meta["min_bytes"][0]
    assert _launches(row, "paged_decode_attention") == TINY.n_layers


@pytest.mark.parametrize("donated", [True, False], ids=["in_place", "copied"])
def test_gathers_and_in_place_scatters_count_the_rows_they_touch(h100, donated):
    # 8 rows of a 4 MB table looked up, and 8 new rows written into a pool: in place when the pool
    # is donated (a few KB moved), into a copy otherwise (the copy and the new pool counted whole).
    on = jax.sharding.SingleDeviceSharding(h100)
    table = jax.ShapeDtypeStruct((8192, 256), jax.numpy.bfloat16, sharding=on)
    new = jax.ShapeDtypeStruct((8, 256), jax.numpy.bfloat16, sharding=on)
    rows = jax.ShapeDtypeStruct((8,), jax.numpy.int32, sharding=on)
    step = lambda table, pool, rows, new: (table[rows], pool.at[rows].set(new, mode="promise_in_bounds"))  # noqa: E731
    hlo = gpu_compile.Hlo(jax.jit(step, donate_argnums=(1,) if donated else ()).trace(table, table, rows, new)
                          .lower().compile())
    moved, whole = hlo.cost(hlo.entry)["bytes"], 8192 * 256 * 2
    assert moved < whole / 50 if donated else moved > 2 * whole, moved


def test_a_verify_is_compared_with_one_decode_step(tiny, tiny_decode, monkeypatch, tmp_path):
    # Speculative decoding (issue 26): the verify of K proposals against one decode step of the
    # same program, as main() pairs them.
    fn, args, meta = tiny["verify"]
    assert args[3].shape == (1, gpu_compile.SPEC_K + 1)  # each row's last token and its K proposals
    verify, fails = gpu_compile.analyse_program("tiny verify", fn, args, meta, tmp_path / "verify")
    assert not [f for f in fails if f.key.startswith(("compile", "spill", "donation"))], fails
    step = tiny_decode[0]
    program = (TINY, 1, "layers")
    rows = [dict(step, program=(*program, "decode"), quantize=None), dict(verify, program=(*program, "verify"),
                                                                         quantize=None)]
    ratio = verify["cost"]["bytes"] / step["cost"]["bytes"]
    # K + 1 tokens through the weights, read once: a tiny model's activations and logits weigh next
    # to its weights (2.6x here); the 8B verify is checked to VERIFY_SLACK.
    assert 1.0 <= ratio < 4, ratio
    monkeypatch.setattr(gpu_compile, "VERIFY_SLACK", ratio * 1.01)
    assert gpu_compile.verify_failures(rows) == []
    assert rows[1]["vs_step"] == ratio and rows[1]["step_bytes"] == step["cost"]["bytes"]
    monkeypatch.setattr(gpu_compile, "VERIFY_SLACK", ratio * 0.99)
    [fail] = gpu_compile.verify_failures(rows)
    assert fail.key == "verify: tiny verify" and f"{ratio:.2f}x >" in fail.detail, fail
    # A verify whose decode step did not compile (or is of other weights) fails too.
    [fail] = gpu_compile.verify_failures([dict(rows[0], quantize="int8"), rows[1]])
    assert fail.detail.startswith("no decode step"), fail


@pytest.mark.parametrize("rows, kernel", [(32, "mosaic_gpu"), (8, "triton")])
def test_mosaic_runtime_sends_prefill_quantized_products_to_the_mosaic_kernel(h100, rows, kernel):
    """ops.linear with mosaic=True (attention_impl "mosaic"): an int4 product of prefill's many rows
    lowers to the Mosaic GPU kernel, decode's few rows to the Triton one."""
    from jax.sharding import SingleDeviceSharding

    import jax.numpy as jnp

    from llama_jax import ops

    w = jax.random.normal(jax.random.key(0), (256, 256))
    values, tree = jax.tree.flatten(quant.quantize(w, "int4", group_size=32, asymmetric=True, axis=-1))
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=SingleDeviceSharding(h100))
            for a in (jax.ShapeDtypeStruct((rows, 256), jnp.bfloat16), *values)]
    f = jax.jit(lambda x, *v: ops.linear(x, jax.tree.unflatten(tree, v), transposed=True, mosaic=True))
    text = f.trace(*args).lower().as_text().lower()
    other = "triton" if kernel == "mosaic_gpu" else "mosaic_gpu"
    assert kernel in text and other not in text


def test_mosaic_kernels_use_wgmma_and_tma_without_spills(h100, tmp_path):
    # A backward case that gpu_compile.kernel_cases leaves to this test: `make gpu-check` compiles it once.
    rows, fails = gpu_compile.check_kernel(gpu_compile.mosaic_case(64, True, 1024, grad=True), h100, tmp_path)
    assert fails == []
    assert sorted(gpu_compile._base(r["kernel"]) for r in rows) == [
        "mosaic_flash_attention_dkdv", "mosaic_flash_attention_dq", "mosaic_flash_attention_fwd"]
    for r in rows:
        assert r["wgmma"] and r["tma"], r
        assert 0 < r["registers"] <= 255 and r["spill_stores"] == r["spill_loads"] == 0, r
        assert 0 < r["smem"] <= gpu_compile.H100_SMEM and r["warps"] == 12, r  # 2 compute + 1 TMA warpgroup
