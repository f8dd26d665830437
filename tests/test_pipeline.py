"""Pipeline parallelism (llama_jax.pipeline): GPipe over the mesh's stage axis equals the plain scan
of the layers, outputs and gradients, on meshes that mix stages with data and tensor parallelism; the
real transformer block, whose Pallas kernels (interpret mode) run in shard_maps nested inside the
stage-manual one, equals the model's own forward and gradient; the schedule's arithmetic and its
refusals."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llama_jax
from llama_jax import sharding
from llama_jax.model import Transformer
from llama_jax.pipeline import bubble_fraction, check, default_micro_batches, pipeline

RTOL = 1e-5  # f32: max |ours - plain| <= RTOL * max |plain|, leaf by leaf


def _assert_close(ours, theirs, what):
    """Leaf by leaf, relative to the leaf's scale; prints the worst and the mean."""
    errs = jax.tree.leaves(jax.tree.map(
        lambda a, b: np.abs(np.asarray(a) - b).max() / max(np.abs(np.asarray(b)).max(), 1e-30), ours, theirs))
    assert max(errs) <= RTOL, f"{what}: off by {max(errs):.2e} of scale (mean {np.mean(errs):.2e})"


# --- A toy body on several meshes --------------------------------------------------------------------

L, B, T, D = 8, 16, 3, 12  # 8 layers split over 2, 4 or 8 stages


def toy_body(stream, layer, per_row):
    """A two-leaf stream; per_row scales each row and adds its positions, so a micro-batch that got
    another's per-row values would show."""
    x, acc = stream  # (b, T, D), (b, D)
    y = jnp.tanh(jnp.einsum("BTD,DE->BTE", x, layer["w"]) + layer["b"])
    y = y * per_row["gain"][:, None, None] + 0.01 * per_row["pos"][..., None]
    return y, acc + y.mean(1)


@pytest.fixture(scope="module")
def toy():
    """Layers, input, per-row values, a cotangent, and the plain layer loop's output and gradients."""
    k = jax.random.split(jax.random.key(0), 5)
    layers = {"w": jax.random.normal(k[0], (L, D, D)) / np.sqrt(D), "b": 0.1 * jax.random.normal(k[1], (L, D))}
    x = jax.random.normal(k[2], (B, T, D))
    per_row = {"gain": 1 + 0.2 * jax.random.normal(k[3], (B,)),
               "pos": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)) + jnp.arange(B)[:, None]}
    cot = jax.random.normal(k[4], (B, T, D))

    def plain(body, stream, layers, per_row):
        for i in range(L):
            stream = body(stream, jax.tree.map(lambda a: a[i], layers), per_row)
        return stream

    ref = _forward_backward(plain, toy_body, layers, x, per_row, cot)
    return layers, x, per_row, cot, ref


def _forward_backward(run, body, layers, x, per_row, cot):
    """The final stream and the gradients (w.r.t. the layers and the input) of <stream, cot>."""
    def forward_backward(layers, x):
        stream, vjp = jax.vjp(lambda layers, x: run(body, (x, jnp.zeros((B, D))), layers, per_row), layers, x)
        return stream, vjp((cot, cot[:, 0]))
    return jax.jit(forward_backward)(layers, x)


@pytest.mark.parametrize("pp,dp,tp,micro", [
    (2, 4, 1, 2), (2, 4, 1, 4),  # micro-batches = stages, and more
    (4, 2, 1, 4), (4, 2, 1, 8),
    (2, 2, 2, 2), (2, 2, 2, 8),  # tensor parallel axis Auto inside each stage
    (8, 1, 1, 8),
])
def test_toy_pipeline_equals_plain_scan(toy, pp, dp, tp, micro):
    layers, x, per_row, cot, ref = toy
    mesh = llama_jax.make_mesh(dp=dp, tp=tp, pp=pp)
    run = lambda *a: pipeline(*a, micro_batches=micro)  # noqa: E731
    with jax.set_mesh(mesh):
        got = _forward_backward(run, toy_body, layers, x, per_row, cot)
    _assert_close(got, ref, f"pp={pp} dp={dp} tp={tp} M={micro}")


def test_toy_pipeline_with_remat(toy):
    """The training step's jax.checkpoint around the body: same gradients."""
    layers, x, per_row, cot, ref = toy
    run = lambda *a: pipeline(*a, micro_batches=8)  # noqa: E731
    with jax.set_mesh(llama_jax.make_mesh(dp=2, tp=1, pp=4)):
        got = _forward_backward(run, jax.checkpoint(toy_body), layers, x, per_row, cot)
    _assert_close(got, ref, "remat, pp=4 M=8")


def test_one_stage_is_a_plain_scan(toy):
    """Without a mesh, or with pp == 1, no schedule: micro_batches is not even checked."""
    layers, x, per_row, cot, ref = toy
    run = lambda *a: pipeline(*a, micro_batches=5)  # noqa: E731
    _assert_close(_forward_backward(run, toy_body, layers, x, per_row, cot), ref, "no mesh")
    with jax.set_mesh(llama_jax.make_mesh(dp=8, tp=1)):
        _assert_close(_forward_backward(run, toy_body, layers, x, per_row, cot), ref, "pp=1")


def test_pipeline_refuses_bad_splits(toy):
    layers, x, per_row, _, _ = toy
    stream = (x, jnp.zeros((B, D)))
    with jax.set_mesh(llama_jax.make_mesh(dp=2, tp=1, pp=4)):
        with pytest.raises(ValueError, match=r"3 micro-batches do not divide the batch of 16.*\[4, 8, 16\]"):
            pipeline(toy_body, stream, layers, per_row, micro_batches=3)
        with pytest.raises(ValueError, match=r"6 layers do not split into 4 pipeline stages.*\[1, 2, 3, 6\]"):
            pipeline(toy_body, stream, jax.tree.map(lambda a: a[:6], layers), per_row, micro_batches=4)


# --- The real transformer block ------------------------------------------------------------------------


def _shard_map_nests(jaxpr, outer=()):
    """Every chain of nested shard_maps in a jaxpr, as tuples of the axes each makes manual,
    outermost first."""
    for eqn in jaxpr.eqns:
        chain = outer
        if eqn.primitive.name == "shard_map":
            chain = outer + (tuple(sorted(eqn.params["newly_manual_axes"])),)
            yield chain
        for sub in eqn.params.values():
            for sub in sub if isinstance(sub, (list, tuple)) else [sub]:
                sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
                if hasattr(sub, "eqns"):
                    yield from _shard_map_nests(sub, chain)


def test_transformer_layers_pipelined_equal_the_models_scan():
    """A tiny Llama on pp=2 x dp=2 x tp=2, Pallas attention (interpret mode), packed documents:
    embedding, the stacked layers through `pipeline`, final norm equals Transformer.hidden on one
    device (its own lax.scan): hidden states and the gradient of every parameter. The attention
    kernel runs in ops' shard_map (manual over data/fsdp/context/model) nested inside the
    pipeline's, which is manual over the stage and data axes."""
    cfg = llama_jax.LlamaConfig(vocab_size=64, dim=24, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=40,
                                rope_theta=10000.0)
    runtime = llama_jax.RuntimeConfig(dtype="float32", param_dtype="float32", attention_impl="pallas")
    b, t, micro = 8, 16, 4
    mesh = llama_jax.make_mesh(dp=2, tp=2, pp=2)
    with jax.set_mesh(mesh):
        model = Transformer(cfg, runtime, rngs=nnx.Rngs(0))
    sharding.place(model, mesh)  # the stacked layers split over the stage axis
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32)
    segment_ids = jnp.asarray(np.sort(rng.integers(0, 3, (b, t)), axis=1), jnp.int32)  # up to 3 documents a row
    cot = jnp.asarray(rng.normal(size=(b, t, cfg.dim)), jnp.float32)

    def models_own(params):  # on one device, no mesh: the model's plain lax.scan over its layers
        return nnx.merge(graphdef, params).hidden(tokens, segment_ids=segment_ids)[0]  # (B, T, D)

    def pipelined(params):  # Transformer.hidden walking its stacked layers through the pipeline
        walk = functools.partial(pipeline, micro_batches=micro)
        return nnx.merge(graphdef, params).hidden(tokens, segment_ids=segment_ids, walk=walk)[0]

    def forward_backward(f, params):  # hidden states; the gradient of <hidden, cot> w.r.t. every parameter
        out, vjp = jax.vjp(f, params)
        return out, vjp(cot)

    want = jax.jit(forward_backward, static_argnums=0)(models_own, jax.device_put(params, jax.devices()[0]))
    with jax.set_mesh(mesh):
        jaxpr = jax.make_jaxpr(pipelined)(params)
        got = jax.jit(forward_backward, static_argnums=0)(pipelined, params)
    stage = sharding.spec(("layers",), mesh)[0]
    nests = set(_shard_map_nests(jaxpr.jaxpr))
    # The pipeline is manual over the stage (and data) axes; the kernels' shard_map nests inside it.
    assert any(len(n) == 2 and stage in n[0] and "model" in n[1] for n in nests), nests
    _assert_close(got, want, "transformer layers, pp=2 dp=2 tp=2")


# --- Arithmetic and refusals ---------------------------------------------------------------------------


def test_bubble_fraction():
    assert bubble_fraction(1, 4) == 0.0
    assert bubble_fraction(4, 4) == pytest.approx(3 / 7)
    assert bubble_fraction(4, 12) == pytest.approx(0.2)
    assert bubble_fraction(2, 8, "gpipe") == pytest.approx(1 / 9)
    with pytest.raises(ValueError, match="unknown pipeline schedule 'zb'"):
        bubble_fraction(2, 4, "zb")


def test_check_names_the_numbers_that_work():
    check(8, 4, 16, 4)
    check(30, 5, 10, 5)
    with pytest.raises(ValueError, match=r"30 layers do not split into 4 .*\[1, 2, 3, 5, 6, 10, 15, 30\]"):
        check(30, 4, 8, 4)
    with pytest.raises(ValueError, match=r"5 micro-batches do not divide the batch of 12.*\[2, 3, 4, 6, 12\]"):
        check(8, 2, 12, 5)
    with pytest.raises(ValueError, match=r"2 micro-batches are fewer than the 4 stages.*\[4, 6, 12\]"):
        check(8, 4, 12, 2)
    with pytest.raises(ValueError, match=r"batch of 3 rows is too small for 4 stages: it needs at least 4 rows"):
        check(8, 4, 3, 3)
    with pytest.raises(ValueError, match="micro_batches=0"):
        check(8, 4, 8, 0)


def test_default_micro_batches():
    assert default_micro_batches(16, 2) == 4  # the smallest divisor >= 2 * stages
    assert default_micro_batches(12, 4) == 12
    assert default_micro_batches(6, 4) == 6  # none >= 8: the smallest >= 4
    assert default_micro_batches(7, 2) == 7
    assert default_micro_batches(8, 1) == 2
    with pytest.raises(ValueError, match="batch of 3 rows is too small for 4 pipeline stages"):
        default_micro_batches(3, 4)
