"""benchmarks/train_at_scale.py: a small training step compiles for 8 H100s and fits, a setup that
does not fit fails the run, and the memory, roofline and model-FLOP arithmetic is right by hand.

Needs the gpu-check extra (jax-cuda12-plugin and ptxas), so plain `make test` skips this file, as it
does tests/test_gpu_compile.py.
"""

import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("jax_cuda12_plugin", reason="needs the gpu-check extra (jax-cuda12-plugin): `make gpu-check`")
# Only with the plugin (the gpu-check venv): before jax starts, or the plugin looks for a GPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import train_at_scale as tas  # noqa: E402
from llama_jax import LLAMA3_2_1B, LlamaConfig  # noqa: E402

SMALL = tas.Setup("Llama 3.2 1B, 8 H100, fsdp=4 x tp=2", LLAMA3_2_1B, 1, 8, dict(fsdp=4, tp=2),
                  tas._tc(8, True, seq_len=1024))


@pytest.fixture(scope="module")
def small_row():
    return tas.run(SMALL)


def test_a_small_step_compiles_and_fits(small_row):
    r = small_row
    assert "error" not in r, r.get("error")
    for prog in ("grad", "update"):
        m = r[prog]["memory"]
        assert m["peak"] == m["arguments"] + m["outputs"] + m["temps"] - m["aliased"] > 0
    # The update donates params and state: all it returns is written in place but a few scalars
    # (the gradient norm, the step count).
    u = r["update"]["memory"]
    assert 0 <= u["outputs"] - u["aliased"] < 1024 < u["aliased"]
    # Its outputs keep the inputs' shardings (XLA replicated the lax.cond's outputs when unpinned).
    assert u["outputs"] < 1.01 * (r["grad"]["memory"]["outputs"] + r["opt_state"])
    assert r["memory"]["peak"] == max(r["grad"]["memory"]["peak"] + r["opt_state"], u["peak"]) <= tas.HBM_BYTES
    # f32 moments of every parameter, split over the 8 devices: twice the f32 weights per device.
    assert r["opt_state"] == pytest.approx(2 * r["grad"]["memory"]["outputs"], rel=0.01)
    # One forward kernel per layer in the forward and one in the recompute; one dq and one dkv each.
    assert r["grad"]["launches"] == {"flash_attention_fwd": 2 * 16, "flash_attention_dq": 16, "flash_attention_dkv": 16}
    # Recomputing every layer, the step does at least the model's FLOPs (the loop counted 16 times).
    assert r["model_flops"] <= r["grad"]["flops"] <= 1.5 * r["model_flops"]
    assert {"all-gather", "reduce-scatter", "all-reduce"} <= set(r["grad"]["collectives"])
    assert 0 < r["model_mfu"] < r["mfu"] <= 1


def test_a_setup_that_does_not_fit_fails_the_run(small_row, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(tas, "setups", lambda sweep: [SMALL])
    monkeypatch.setattr(tas, "run", lambda setup: small_row)
    assert tas.main(["--no-sweep", "--out", str(tmp_path / "r.md")]) == 0
    assert "| Llama 3.2 1B" in (tmp_path / "r.md").read_text()
    monkeypatch.setattr(tas, "HBM_BYTES", small_row["memory"]["peak"] - 1)
    assert tas.main(["--no-sweep", "--out", str(tmp_path / "r.md")]) == 1
    assert "FAIL Llama 3.2 1B" in capsys.readouterr().out


def test_a_small_qlora_step_trains_only_the_adapters():
    """Llama 3.2 1B, int4 base, rank 8 on q and v, one H100: the gradient program returns the
    adapters' gradients and nothing else, the optimizer state is their two f32 moments, and the
    frozen int4 model (8-bit embedding) takes under half of its bf16 bytes."""
    import math

    import jax

    from llama_jax import lora

    tc = tas._tc(1, True, seq_len=1024, lora_rank=8, lora_targets=("q", "v"))
    r = tas.run(tas.Setup("1B QLoRA", LLAMA3_2_1B, 1, 1, {}, tc, budget=24e9, quantize="int4"))
    assert "error" not in r, r.get("error")
    adapters = sum(4 * math.prod(a.shape) for a in jax.tree.leaves(lora.shapes(LLAMA3_2_1B, tc.lora())))
    assert adapters < r["grad"]["memory"]["outputs"] < adapters + 1024  # and the loss
    assert r["opt_state"] == pytest.approx(2 * adapters, rel=0.01)
    c = LLAMA3_2_1B
    weights = c.n_layers * (c.dim * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim + c.n_heads * c.head_dim * c.dim
                            + 3 * c.dim * c.ffn_dim) + c.dim * c.vocab_size
    assert r["grad"]["memory"]["arguments"] < weights  # bf16: 2 bytes a weight
    assert r["fits"]


def test_roofline_and_memory_by_hand():
    r = tas.roofline(989e12, 3.35e12 / 2)  # 1 s of FLOPs, 0.5 s of bytes: compute bound
    assert (r["flop_s"], r["byte_s"], r["bound_s"], r["mfu"]) == pytest.approx((1.0, 0.5, 1.0, 1.0))
    r = tas.roofline(0.3 * 989e12, 3.35e12)  # 0.3 s of FLOPs, 1 s of bytes
    assert (r["bound_s"], r["mfu"]) == pytest.approx((1.0, 0.3))
    m = tas.step_memory(dict(peak=50e9), dict(peak=30e9), 8e9)
    assert m == dict(during_grad=58e9, during_update=30e9, peak=58e9)


def test_model_flops_by_hand():
    # D 4, 2 query heads and 1 KV head of dim 6, F 5, V 7, 2 layers; batch 2 x 4 tokens on 2 devices.
    c = LlamaConfig(vocab_size=7, dim=4, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=6, ffn_dim=5, max_seq_len=16)
    tc = tas._tc(2, True, seq_len=4)
    per_layer = 4 * 12 + 4 * 6 + 4 * 6 + 12 * 4 + 3 * 4 * 5  # wq, wk, wv, wo, w1/w2/w3
    matmul = 6 * (2 * per_layer + 4 * 7) * 8  # 8 tokens; the output head, not the embedding lookup
    attention = 3 * 2 * 4 * 2 * 2 * 6 * (4 * 5 / 2)  # 3 x forward: 2 layers, 4 B H E, 10 causal pairs
    assert tas.model_flops(c, tc, 2) == pytest.approx((matmul + attention) / 2)
    # LoRA rank 2 on q and down: 4 FLOPs per frozen weight (no weight gradient), 6 per adapter weight.
    tc = tas._tc(2, True, seq_len=4, lora_rank=2, lora_targets=("q", "down"))
    adapters = 2 * (2 * (4 + 12) + 2 * (5 + 4))  # 2 layers of A [in, 2] and B [2, out]
    matmul = (4 * (2 * per_layer + 4 * 7) + 6 * adapters) * 8
    assert tas.model_flops(c, tc, 2) == pytest.approx((matmul + attention) / 2)


def test_replica_groups_in_each_form():
    line = "x = f32[8] all-reduce(y), replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}, to_apply=add"
    assert tas.replica_groups(line, 8) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    line = "x = f32[8] all-reduce(y), replica_groups=[2,4]<=[4,2]T(1,0), to_apply=add"
    assert tas.replica_groups(line, 8) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert tas.replica_groups("replica_groups={{0,1},{2,3}}, to_apply", 4) == [[0, 1], [2, 3]]
    assert tas.replica_groups("replica_groups={}, to_apply", 4) == [[0, 1, 2, 3]]
