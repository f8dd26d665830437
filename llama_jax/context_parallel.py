"""Context parallelism: causal attention with the sequence split over the mesh's context axis (issue 14).

Layout. A causal query at position t sees t + 1 keys, so cutting T into cp contiguous pieces gives
the last device about 2cp - 1 times the first one's work. Llama 3 (Dubey et al. 2024,
section 3.3.2) cuts T into 2*cp chunks of C = T / (2*cp) tokens and gives device i the chunks i and
2*cp-1-i: every device then sees the same number of (query, key) pairs. `balanced_order` is that
permutation; activations stay in it for the whole forward (everything but attention is per token),
and `natural_order` undoes it at the end.

Two ways to attend, both inside `jax.shard_map` over the local batch, heads and chunks:
- "allgather" (Llama 3's choice, the default): each layer all-gathers K, V (and the key segment
  ids) over the context axis, puts them back in natural order with a static reshape, and runs the
  attention kernel twice, once per local query chunk, with q_offset = chunk * C and kv_lengths =
  (chunk + 1) * C, so the kernel never visits a key block past the chunk: the work is balanced.
  With GQA, K and V are H / K times smaller than Q, which is why gathering them is cheap. The
  backward is the kernel's own (custom_vjp), and the all-gather's transpose is a reduce-scatter of
  dK, dV.
- "ring" (Liu et al. 2023, zigzag layout): K, V blocks travel around the ring with `ppermute`;
  each device attends its queries to the block it holds and merges the results by log-sum-exp.
  The per-block attention is plain jnp (the kernels do not return their log-sum-exp), autodiffed;
  each step costs exactly two C x C blocks of unmasked work (the layout makes the ring balanced).

`attention_cached` is the inference side: a chunked-prefill step whose queries are split
contiguously over the context axis and which read a cache every device holds whole.
Mesh axis names come from llama_jax.sharding's logical axes ("seq" and friends), never literals.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import pallas_kernels as pk
from llama_jax import sharding


# Masked logits and the log-sum-exp of a row that sees no key: finite, so no inf - inf = NaN.
_NO_KEY = -1e30
# Queries x keys per tile of the ring's block attention (its backward recomputes a query block).
_RING_BLOCK_Q = 512
_RING_BLOCK_K = 256


def _check_split(t: int, cp: int, pieces: int, what: str) -> None:
    if cp < 1 or t % pieces:
        lo, hi = (t // pieces) * pieces, (t // pieces + 1) * pieces
        works = f"{lo} or {hi}" if lo else f"{hi}"
        raise ValueError(f"sequence length t={t} cannot be split over cp={cp}: {what} needs t divisible "
                         f"by {pieces} (the nearest lengths that work: {works}, or any multiple of {pieces})")


def balanced_order(t: int, cp: int) -> np.ndarray:
    """Permutation p of range(t) (t divisible by 2*cp): x[:, p] split into cp contiguous shards gives
    device i the chunks i and 2*cp-1-i of t/(2*cp) tokens each (Llama 3's load balancing of causal
    work). Raises ValueError naming t, cp and the lengths that work when 2*cp does not divide t."""
    _check_split(t, cp, 2 * cp, "the balanced layout (2*cp chunks)")
    chunks = np.arange(t).reshape(2 * cp, t // (2 * cp))  # (2cp, C)
    return np.concatenate([chunks[[i, 2 * cp - 1 - i]].ravel() for i in range(cp)])


def natural_order(t: int, cp: int) -> np.ndarray:
    """The inverse of balanced_order(t, cp): x_balanced[:, natural_order(t, cp)] is in token order."""
    return np.argsort(balanced_order(t, cp))


def context_size(mesh=None) -> int:
    """How many ways the mesh (default: the active one) splits the sequence; 1 without a mesh."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    return 1 if mesh.empty else sharding.axis_size("seq", mesh)


def hidden(model, tokens, positions=None, *, segment_ids=None, **kwargs):
    """model.hidden(tokens, positions, ...) with no cache, in the balanced order when the active mesh
    splits the sequence: the tokens (and positions, segment ids) go in permuted, every layer's
    attention runs context-parallel (llama_jax.ops sees the split), and the hidden states [B, T, D]
    come back in token order. Without a context split, model.hidden as it is."""
    cp = context_size()
    if cp == 1:
        return model.hidden(tokens, positions, segment_ids=segment_ids, **kwargs)
    b, t = tokens.shape
    order, inverse = balanced_order(t, cp), natural_order(t, cp)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    segment_ids = None if segment_ids is None else segment_ids[:, order]
    x, cache = model.hidden(tokens[:, order], positions[:, order], segment_ids=segment_ids, **kwargs)
    return x[:, inverse], cache


def _to_natural(x, cp: int):
    """[B, T, ...] gathered in balanced order -> natural order, statically: device d's first slot
    holds chunk d, its second chunk 2cp-1-d."""
    b, t = x.shape[:2]
    x = x.reshape(b, cp, 2, t // (2 * cp), *x.shape[2:])  # (B, cp, 2, C, ...)
    return jnp.concatenate([x[:, :, 0], x[:, ::-1, 1]], axis=1).reshape(b, t, *x.shape[4:])


def _kernel(impl: str):
    if impl == "xla":
        return pk.blocked_attention
    if impl == "pallas":
        return pk.flash_attention
    if impl == "mosaic":
        return pk.flash_attention_mosaic
    raise ValueError(f"impl={impl!r}: context-parallel attention takes 'xla', 'pallas' or 'mosaic'")


def _specs(mesh, axes_and_args):
    """The shard_map spec of each argument from its logical axes (None for a None argument);
    refuses a mesh that splits query heads and KV heads differently (see sharding.kv_replication)."""
    specs = [None if x is None else sharding.logical_to_mesh(axes, jnp.shape(x), mesh)
             for axes, x in axes_and_args]
    q_spec, kv_spec = specs[0], specs[1]
    if q_spec[2] != kv_spec[2]:
        raise ValueError(f"the mesh splits {jnp.shape(axes_and_args[0][1])[2]} query heads as {q_spec[2]!r} "
                         f"but {jnp.shape(axes_and_args[1][1])[2]} KV heads as {kv_spec[2]!r}: "
                         "replicate KV heads first (sharding.kv_replication)")
    return specs


def attention(q, k, v, *, segment_ids=None, impl="xla", method="allgather"):
    """Causal self-attention with no cache, context-parallel.

    q [B, T, H, E], k, v [B, T, K, E] and segment_ids [B, T] (optional; a query sees only keys of
    its own segment) are in balanced order (x[:, balanced_order(T, cp)]), T split over the
    context axis (cp = sharding.axis_size("seq", mesh)); batch and heads split as the rules say.
    Called under jax.set_mesh(mesh), inside or outside jit. Returns [B, T, H, E] in balanced
    order. With cp == 1 (or no mesh) it is plain causal attention.

    impl: "xla" (pallas_kernels.blocked_attention) or "pallas" (flash_attention).
    method: "allgather" (each device gathers K/V and runs the kernel on its two query chunks;
    differentiable through the kernels' backward) or "ring" (K/V passed around the ring with
    ppermute, merged by log-sum-exp; plain-jnp blocks, so impl must be "xla"; differentiable by
    autodiff).
    """
    if method not in ("allgather", "ring"):
        raise ValueError(f"method={method!r}: 'allgather' or 'ring'")
    kernel = _kernel(impl)
    if method == "ring" and impl != "xla":
        raise ValueError("method='ring' computes its blocks in plain jnp (the kernels return no "
                         "log-sum-exp to merge): use impl='xla', or method='allgather' for the kernels")
    b, t = q.shape[:2]
    mesh = jax.sharding.get_abstract_mesh()
    cp = 1 if mesh.empty else sharding.axis_size("seq", mesh)
    if cp == 1:
        def local(q, k, v, seg):
            return kernel(q, k, v, causal=True, q_offset=jnp.zeros((q.shape[0],), jnp.int32),
                          q_segment_ids=seg)
    else:
        _check_split(t, cp, 2 * cp, "the balanced layout (2*cp chunks)")
        axis = sharding.spec(("seq",))[0]  # the mesh axis that splits the sequence
        if method == "allgather":
            local = functools.partial(_allgather_local, axis=axis, cp=cp, kernel=kernel)
        else:
            local = functools.partial(_ring_local, axis=axis, cp=cp)
    if mesh.empty:
        return local(q, k, v, segment_ids)
    specs = _specs(mesh, [(sharding.HEADS, q), (sharding.KV, k), (sharding.KV, v), (sharding.TOKENS, segment_ids)])
    # check_vma=False: Pallas calls do not declare how their outputs vary over the mesh.
    return jax.shard_map(local, in_specs=tuple(specs), out_specs=specs[0], check_vma=False)(
        q, k, v, segment_ids)


def _allgather_local(q, k, v, seg, *, axis, cp, kernel):
    """One device: q (B, 2C, H, E) holds chunks i and 2cp-1-i; K/V/segments gathered whole."""
    i = lax.axis_index(axis)
    b, c = q.shape[0], q.shape[1] // 2
    gather = lambda x: _to_natural(lax.all_gather(x, axis, axis=1, tiled=True), cp)  # noqa: E731
    k, v = gather(k), gather(v)  # (B, T, K, E), natural order
    kv_seg = None if seg is None else gather(seg)  # (B, T)
    chunks = jnp.stack([i, 2 * cp - 1 - i])  # (2,)
    split = lambda x: jnp.moveaxis(x.reshape(b, 2, c, *x.shape[2:]), 1, 0)  # noqa: E731  (2, B, C, ...)

    def one(args):  # one query chunk at its place: q_offset = chunk * C
        qc, q_seg, chunk = args
        start = jnp.broadcast_to(chunk * c, (b,)).astype(jnp.int32)
        # kv_lengths = the chunk's end: the kernel skips the key blocks past it (not just masks).
        return kernel(qc, k, v, causal=True, q_offset=start, kv_lengths=start + c,
                      q_segment_ids=q_seg, kv_segment_ids=kv_seg)
    # A loop of two, not two calls: one copy of the kernel (and its backward) in the program.
    out = lax.map(one, (split(q), None if seg is None else split(seg), chunks))  # (2, B, C, H, E)
    return jnp.moveaxis(out, 0, 1).reshape(q.shape)


def _block(q, k, v, q_pos, k_pos, q_seg, k_seg):
    """Attention of q [B, Tq, H, E] over k, v [B, S, K, E] with queries at q_pos [Tq] and keys at
    k_pos [S] (key visible iff k_pos <= q_pos and same segment): (out [B, Tq, H, E] f32, normalized;
    lse [B, Tq, H] f32, natural log, _NO_KEY for a query that sees no key). An online softmax over
    key blocks of _RING_BLOCK_K (FlashAttention-2's loop in jnp), so a score tile stays in cache."""
    b, tq, h, e = q.shape
    s_len, kh = k.shape[1], k.shape[2]
    bk = _RING_BLOCK_K if s_len % _RING_BLOCK_K == 0 else s_len
    q5 = (q.astype(jnp.float32) / math.sqrt(e)).reshape(b, tq, kh, h // kh, e)  # (B, Tq, K, G, E)
    blocks = lambda x: jnp.moveaxis(x.reshape(x.shape[0], -1, bk, *x.shape[2:]), 1, 0)  # noqa: E731  (nk, B, bk, ...)

    def step(carry, xs):
        acc, m, l = carry  # (B, K, G, Tq, E), (B, K, G, Tq) x 2
        kb, vb, kpos, kseg = xs
        s = jnp.einsum("BTKGE,BSKE->BKGTS", q5, kb, preferred_element_type=jnp.float32)
        mask = (kpos[None, :] <= q_pos[:, None])[None]  # (1, Tq, bk)
        if q_seg is not None:
            mask = mask & (q_seg[:, :, None] == kseg[:, None, :])  # (B, Tq, bk)
        mask = mask[:, None, None]  # (B, 1, 1, Tq, bk)
        # Masked before the exp too: exp(s - m) of a masked logit in a row that has seen no key
        # yet (m = _NO_KEY) is inf, and its gradient inf * 0 = NaN even where it is not selected.
        s = jnp.where(mask, s, _NO_KEY)
        # m only shifts the exponent (the result does not depend on it): no gradient through it.
        m_new = lax.stop_gradient(jnp.maximum(m, jnp.max(s, axis=-1)))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)  # a row with no key: 0, not exp(0)
        alpha = jnp.exp(m - m_new)
        pv = jnp.einsum("BKGTS,BSKE->BKGTE", p, vb.astype(jnp.float32))
        return (acc * alpha[..., None] + pv, m_new, l * alpha + jnp.sum(p, axis=-1)), None

    stats = (b, kh, h // kh, tq)
    init = (jnp.zeros((*stats, e), jnp.float32), jnp.full(stats, _NO_KEY, jnp.float32), jnp.zeros(stats, jnp.float32))
    xs = (blocks(k), blocks(v), k_pos.reshape(-1, bk), None if k_seg is None else blocks(k_seg))
    (acc, m, l), _ = lax.scan(step, init, xs)
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)  # no log(0) or 1/0, even in the unselected branch's gradient
    o = (acc / l_safe[..., None]).transpose(0, 3, 1, 2, 4).reshape(b, tq, h, e)  # (B, Tq, H, E)
    lse = jnp.where(empty, _NO_KEY, m + jnp.log(l_safe)).transpose(0, 3, 1, 2).reshape(b, tq, h)
    return o, lse


def _block_bounded(q, k, v, q_pos, k_pos, q_seg, k_seg):
    """_block over query blocks of _RING_BLOCK_Q, each rematerialized in the backward: live scores
    B * H * _RING_BLOCK_Q * S, not B * H * Tq * S."""
    b, tq = q.shape[:2]
    if tq <= _RING_BLOCK_Q or tq % _RING_BLOCK_Q:
        return _block(q, k, v, q_pos, k_pos, q_seg, k_seg)
    n = tq // _RING_BLOCK_Q
    split = lambda x: jnp.moveaxis(x.reshape(x.shape[0], n, _RING_BLOCK_Q, *x.shape[2:]), 1, 0)  # noqa: E731
    qs, q_pos_s = split(q), q_pos.reshape(n, _RING_BLOCK_Q)
    q_seg_s = None if q_seg is None else split(q_seg)
    body = jax.checkpoint(lambda xs: _block(xs[0], k, v, xs[1], k_pos, xs[2], k_seg))
    o, lse = lax.map(body, (qs, q_pos_s, q_seg_s))  # (n, B, bq, ...)
    join = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, tq, *x.shape[3:])  # noqa: E731
    return join(o), join(lse)


def _merge(o1, lse1, o2, lse2):
    """Two partial softmax results over disjoint key sets -> the result over their union."""
    lse = jnp.logaddexp(lse1, lse2)
    return (o1 * jnp.exp(lse1 - lse)[..., None] + o2 * jnp.exp(lse2 - lse)[..., None]), lse


def _ring_local(q, k, v, seg, *, axis, cp):
    """One device i: its queries (chunks i and 2cp-1-i) meet the K/V of device (i - s) mod cp at
    step s. For s > 0 and j = (i - s) mod cp, either j < i (both query chunks see all of key chunk
    j, none of 2cp-1-j) or j > i (only query chunk 2cp-1-i sees keys, all of them): two unmasked
    C x C blocks either way."""
    i = lax.axis_index(axis)
    c = q.shape[1] // 2
    pos = lambda d: jnp.concatenate([d * c + jnp.arange(c), (2 * cp - 1 - d) * c + jnp.arange(c)])  # noqa: E731
    q_pos = pos(i)  # (2C,)
    half = lambda x, h: None if x is None else x[:, h * c:(h + 1) * c]  # noqa: E731

    # Step 0, own keys: chunk i sees its own chunk (causal); chunk 2cp-1-i sees both.
    o_lo, lse_lo = _block_bounded(half(q, 0), half(k, 0), half(v, 0), q_pos[:c], q_pos[:c],
                                  half(seg, 0), half(seg, 0))
    o_hi, lse_hi = _block_bounded(half(q, 1), k, v, q_pos[c:], q_pos, half(seg, 1), seg)
    o = jnp.concatenate([o_lo, o_hi], axis=1)
    lse = jnp.concatenate([lse_lo, lse_hi], axis=1)

    perm = [(d, (d + 1) % cp) for d in range(cp)]
    kv = (k, v, seg)
    for s in range(1, cp):
        kv = jax.tree.map(lambda x: lax.ppermute(x, axis, perm), kv)
        j = (i - s) % cp
        k_pos = pos(j)

        def lower(kv, k_pos):  # j < i: every query sees key chunk j, none sees 2cp-1-j
            k, v, kseg = kv
            return _block_bounded(q, half(k, 0), half(v, 0), q_pos, k_pos[:c], seg, half(kseg, 0))

        def upper(kv, k_pos):  # j > i: only query chunk 2cp-1-i sees keys, all of them
            k, v, kseg = kv
            o_hi, lse_hi = _block_bounded(half(q, 1), k, v, q_pos[c:], k_pos, half(seg, 1), kseg)
            return (jnp.concatenate([jnp.zeros_like(o_hi), o_hi], axis=1),
                    jnp.concatenate([jnp.full_like(lse_hi, _NO_KEY), lse_hi], axis=1))

        o_s, lse_s = lax.cond(j < i, lower, upper, kv, k_pos)
        o, lse = _merge(o, lse, o_s, lse_s)
    return o.astype(q.dtype)


def attention_cached(q, k_cache, v_cache, *, q_offset, kv_length, impl="xla"):
    """A chunked-prefill step, context-parallel: q [B, T, H, E] in natural order with T split
    contiguously over the context axis; k_cache, v_cache [B, S, K, E] already hold this chunk's keys
    and are not split over context. Device i's queries sit at keys q_offset + i*T/cp + j; keys past
    kv_length (scalar or [B]) are masked. Returns [B, T, H, E] split like q. Equal to
    ops.prefill_attention(q, k_cache, v_cache, q_offset=q_offset, kv_length=kv_length) on one device.
    Inference only (the kernels' backward would work, but nothing here is tested for it)."""
    kernel = _kernel(impl)
    b, t = q.shape[:2]
    off = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (b,))
    n = jnp.broadcast_to(jnp.asarray(kv_length, jnp.int32), (b,))
    mesh = jax.sharding.get_abstract_mesh()
    cp = 1 if mesh.empty else sharding.axis_size("seq", mesh)
    if cp > 1:
        _check_split(t, cp, cp, "a contiguous split over the context axis")
    axis = None if cp == 1 else sharding.spec(("seq",))[0]

    def local(q, k, v, off, n):
        if axis is not None:  # this device's queries start i * T/cp later
            off = off + lax.axis_index(axis) * q.shape[1]
        return kernel(q, k, v, causal=True, q_offset=off, kv_lengths=n)
    if mesh.empty:
        return local(q, k_cache, v_cache, off, n)
    specs = _specs(mesh, [(sharding.HEADS, q), (sharding.CACHE_AXES, k_cache), (sharding.CACHE_AXES, v_cache),
                           (sharding.PER_ROW, off), (sharding.PER_ROW, n)])
    return jax.shard_map(local, in_specs=tuple(specs), out_specs=specs[0], check_vma=False)(
        q, k_cache, v_cache, off, n)
