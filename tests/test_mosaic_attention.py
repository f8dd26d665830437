"""The Mosaic GPU flash attention (pallas_kernels.mosaic) equals the reference, gradients included,
run in the Mosaic GPU interpreter on CPU with race detection on, in a child process
(tests/mosaic_interpreter.py says why); the comparisons happen here.
"""

import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from mosaic_interpreter import outputs, run_child, save, start_case
from numerics import BF16_EPS, assert_close, attention_inputs, tolerances

pytestmark = pytest.mark.slow  # about 100 s of the Mosaic GPU interpreter in a subprocess

# (B, T, S, H, K, E, options, block table entry): small grids, since the interpreter costs about a
# second per CTA. Every entry of the BlockSizes table (head dim 64 and 128), causal and not, GQA,
# odd lengths, per-sequence offsets and kv lengths, segment ids, queries that see no key.
CASES = {
    "e64_causal_gqa_odd": (1, 77, 77, 2, 1, 64, {}),
    "e64_noncausal_segments": (1, 100, 100, 2, 1, 64, dict(causal=False, segments=3)),
    "e128_offset_ragged": (2, 17, 150, 2, 1, 128, dict(
        q_offset=np.array([133, 40], np.int32), kv_lengths=np.array([150, 90], np.int32))),
    "e128_causal_segments_t_lt_s": (1, 40, 130, 4, 2, 128, dict(segments=2)),
    "e64_empty_rows": (2, 40, 30, 2, 2, 64, dict(kv_lengths=np.array([0, 5], np.int32))),
}
FWD_ONLY = {"e64_empty_rows"}  # the gradient of rows that see nothing is 0 on both sides: no news
FWD_ATOL = 2e-2  # bf16 outputs of magnitude <= 1


def _run_cases(out_dir: Path) -> None:
    """The child: every case's kernel and reference outputs (and gradients) into out_dir/NAME.npz;
    a line 'CASE NAME' on stdout before each, so that a race report can be put to its case."""
    import jax

    from pallas_kernels import flash_attention_reference
    from pallas_kernels.mosaic import flash_attention_mosaic, interpreter

    for name, case in CASES.items():
        seed = start_case(name)
        q, k, v, do, opts = attention_inputs(case, jnp.bfloat16, seed=seed)
        kw = {a: jnp.asarray(x) if isinstance(x, np.ndarray) else x for a, x in opts.items()}

        def run(fn, **extra):
            out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, **kw, **extra), q, k, v)
            return [out] if name in FWD_ONLY else [out, *vjp(do)]

        got = run(flash_attention_mosaic, interpret=interpreter(detect_races=True))
        want = run(flash_attention_reference)
        save(out_dir, name, got, want)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_child(__file__, tmp_path_factory.mktemp("mosaic"))


@pytest.mark.parametrize("case", list(CASES))
def test_mosaic_flash_attention_matches_reference(case, results):
    data = outputs(results, case)
    B, T, S, H, K, E, opts = CASES[case]
    assert_close(data["got0"], data["want0"], atol=FWD_ATOL, rtol=2 * BF16_EPS, name=f"{case} out")
    if case == "e64_empty_rows":  # queries that see no key give exactly 0
        np.testing.assert_array_equal(data["got0"][0], 0.0)  # no keys at all
        np.testing.assert_array_equal(data["got0"][1, :10], 0.0)  # causal: q_offset is -10
    for i, name in enumerate("qkv", start=1):
        if f"got{i}" not in data:
            continue
        ref = data[f"want{i}"]
        scale = max(1.0, float(np.max(np.abs(ref))))
        assert_close(data[f"got{i}"], ref, **tolerances(jnp.bfloat16, S * T, scale), name=f"{case} d{name}")


if __name__ == "__main__":  # the child process (see the module docstring)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    _run_cases(Path(sys.argv[1]))
