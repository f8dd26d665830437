"""The public entry points: `load` and the `Llama` handle."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax import context_parallel, engine, ops, orbax_io, quant, requests, sharding, structured
from llama_jax import generate as gen
from llama_jax import model as model_lib
from llama_jax.checkpoint import read_hf_params
from llama_jax.config import LlamaConfig, RuntimeConfig, default_dtype
from llama_jax.model import Layout, Transformer
from llama_jax.speculative import SpeculativeConfig, with_draft


def inference_layout(mesh=None) -> Layout:
    """How inference reads the weights: per-layer arrays (a decode step on a CPU runs about 1.5x
    faster than scanning the stacked ones) stored [out, in] (XLA's GPU matrix-vector product then
    reads each weight once), with q/k/v and w1/w3 each one product where no mesh splits them (tensor
    parallelism cuts q, k and v apart by heads): SmolLM2's CPU decode 1.12x, fewer and longer
    products. docs/PERFORMANCE.md and docs/GPU_COMPILE.md have the measurements."""
    return Layout(per_layer=True, transposed=True, fused=mesh is None)


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, tokens, positions):
    model = model_lib.merge(graphdef, state)
    x, _ = context_parallel.hidden(model, tokens, positions)
    return sharding.replicated(model.head(x))


class Llama:
    """A loaded model: `config` (the architecture), `runtime` (how it runs), `tokenizer`, `mesh`,
    `logits`, `generate`, `chat`, `stream`.

    A thin handle: the model is split once into `graphdef` and `state` (its arrays), which the
    jitted functions of llama_jax.generate take, so nothing re-traces per call."""

    def __init__(self, model: Transformer, *, tokenizer=None, chat_format=None, mesh=None, speculative=None,
                 adapters: tuple[tuple[str, ...], dict] | None = None):
        ops.check_runtime(model.runtime)  # fails now, not at the first call
        sharding.place(model, mesh)
        self.config: LlamaConfig = model.config
        self.runtime: RuntimeConfig = model.runtime
        self.layout: Layout = model.layout
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.chat_format = chat_format
        # A draft model named by its directory loads now, as this model runs.
        self.speculative: SpeculativeConfig | None = with_draft(SpeculativeConfig.of(speculative), self)
        graphdef, self.state = nnx.split(model)
        self.graphdef = model_lib.StaticGraph(graphdef)
        # LoRA adapters served beside the base (`load(adapters=...)`): their names, adapter n + 1 being
        # adapter_names[n], and their banks (llama_jax.lora.bank, stored layout, host arrays). Only the
        # engine applies them, per request; generate, chat and logits run the base.
        self.adapter_names: tuple[str, ...] = () if adapters is None else adapters[0]
        self.adapter_bank: dict | None = None if adapters is None else adapters[1]

    @property
    def model(self) -> Transformer:
        return model_lib.merge(self.graphdef, self.state)

    @property
    def params(self) -> dict:
        """The weights in the stored layout (layers stacked on axis 0, linear weights [in, out]) as a
        nested dict; new arrays where the model runs another layout."""
        return model_lib.stored(nnx.to_pure_dict(nnx.state(self.model, nnx.Param)), self.layout, self.config)

    def init_cache(self, batch: int, max_len: int):
        """A zero KV cache for `batch` sequences of up to `max_len` tokens, on the mesh when sharded
        (split by batch and KV heads, as llama_jax.sharding says)."""
        return gen.init_cache(self.graphdef, self.state, batch, max_len, self.mesh)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """The checkpoint's stop ids: config.json's and the tokenizer's (generation_config.json)."""
        ids = list(self.config.eos_ids)
        if self.tokenizer is not None:
            ids += [i for i in self.tokenizer.eos_ids if i not in ids]
        return tuple(ids)

    def _request(self, prompts, max_new_tokens, **sampling) -> tuple[list[list[int]], requests.SamplingParams]:
        params = requests.sampling_params(max_new_tokens=max_new_tokens, **sampling,
                                          vocab_size=self.config.vocab_size, eos_ids=self.eos_ids)
        ids = requests.check_prompts(prompts, tokenizer=self.tokenizer, vocab_size=self.config.vocab_size,
                                     max_len=self.config.max_seq_len, max_new_tokens=params.max_new_tokens)
        sharding.check_batch(self.mesh, len(ids))
        return ids, params

    def _generate_ids(self, prompts: list[list[int]], params: requests.SamplingParams, report: dict | None = None):
        """The new tokens of each prompt, chunk by chunk: from the engine (a paged KV cache, prompts
        sharing a prefix compute it once), or, on a mesh that splits rows or the sequence (data or
        context parallel), from llama_jax.generate's batch over a contiguous cache."""
        if not engine.runs_on(self.mesh):
            return gen.generate_ids(self.graphdef, self.state, prompts, params, mesh=self.mesh)  # never speculates
        return engine.generate_ids(self, prompts, params, decode_steps=gen.CHUNK, speculative=self.speculative,
                                   report=report)

    def _text(self, ids: list[int], stops) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode([i for i in ids if i not in stops])

    def generate(self, prompts, *, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int = 0, stop_token_ids=None, json_schema=None
                 ) -> list[gen.Completion]:
        """Generates a completion for each prompt (a string, or a list of token ids), batched.

        temperature 0 is greedy; top_k and top_p restrict sampling; the same seed gives the same
        output. stop_token_ids=None stops on the checkpoint's eos ids, [] on none. json_schema (a
        dict, or its JSON text; `{"type": "object"}` for any object): each completion's text is
        JSON following it, decoding held to it by a grammar (llama_jax.structured, needs xgrammar),
        and stops where the JSON ends (unless max_new_tokens cuts it: finish_reason "length").
        Returns one Completion per prompt (token_ids: the generated ids only)."""
        ids, params = self._request(prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                    seed=seed, stop_token_ids=stop_token_ids, json_schema=json_schema)
        self._check_structured(params)
        report = {}
        rows, timings = gen.collect(self._generate_ids(ids, params, report), len(ids))
        timings.update(report)
        stops = params.stop_token_ids
        return [gen.Completion(token_ids=row, text=self._text(row, stops),
                               finish_reason="stop" if row and row[-1] in stops else "length",
                               prompt_token_ids=p, timings=dict(timings)) for p, row in zip(ids, rows)]

    def _check_structured(self, params: requests.SamplingParams) -> None:
        """A schema's grammar compiles (a bad one fails here, in one line), on an engine that runs it."""
        if params.json_schema is None:
            return
        if not engine.runs_on(self.mesh):
            raise ValueError("json_schema: needs the engine, which runs on a mesh without data or context axes")
        structured.grammars_for(self.tokenizer, self.config.vocab_size, self.eos_ids).compile(params.json_schema)

    def stream(self, prompt, *, max_new_tokens: int, **sampling):
        """Yields text pieces of one prompt's completion as the device produces them (sampling: as
        `generate`'s, json_schema included)."""
        if self.tokenizer is None:
            raise ValueError("stream needs a tokenizer")
        [ids], params = self._request([prompt], max_new_tokens, **sampling)
        self._check_structured(params)
        new, shown = [], ""
        for [chunk] in self._generate_ids([ids], params):
            new += chunk
            text = self._text(new, params.stop_token_ids)
            # Hold back a piece that ends inside a multi-byte character.
            if text.endswith("\ufffd"):
                continue
            if len(text) > len(shown):
                yield text[len(shown):]
                shown = text
        text = self._text(new, params.stop_token_ids)
        if len(text) > len(shown):
            yield text[len(shown):]

    def chat_prompt(self, messages) -> list[int]:
        """The token ids of a dialog (a list of {"role", "content"} dicts) with an open assistant turn."""
        if self.chat_format is None:
            raise ValueError("this model has no chat format (no tokenizer or chat template)")
        return self.chat_format.encode_dialog(messages, add_generation_prompt=True)

    def chat(self, messages, **sampling) -> gen.Completion:
        """Answers a dialog (a list of {"role", "content"} dicts) in the checkpoint's chat format
        (sampling: as `generate`'s; json_schema=... for a JSON answer)."""
        sampling.setdefault("max_new_tokens", 256)
        return self.generate([self.chat_prompt(messages)], **sampling)[0]

    def logits(self, token_ids, positions=None) -> np.ndarray:
        """Full-sequence logits: token_ids, a batch of equal-length lists of ids [B, T] ->
        float32 numpy array [B, T, V]. positions [B, T] (ints, default 0..T-1) place the sequence
        anywhere in the context."""
        ids = requests.check_token_ids(token_ids, vocab_size=self.config.vocab_size, max_len=self.config.max_seq_len)
        sharding.check_batch(self.mesh, len(ids))
        pos = requests.check_positions(positions, ids.shape, max_len=self.config.max_seq_len)
        with sharding.on_mesh(self.mesh):
            tokens = jax.device_put(ids, sharding.batch_sharding(self.mesh, 2))
            pos = jax.device_put(pos, sharding.batch_sharding(self.mesh, 2))
            return np.asarray(_logits(self.graphdef, self.state, tokens, pos))


def load(path: str | os.PathLike, *, dtype=None, mesh=None, attention_impl: str = "auto",
         norm_impl: str = "auto", prefill_chunk: int | None = None, cpu_kernels: str = "auto",
         unstack_layers: bool = True, speculative=None, quantize: str | None = None,
         lora: str | os.PathLike | None = None, adapters: dict | None = None) -> Llama:
    """Loads a model directory: a Hugging Face one (config.json with model.safetensors, or shards
    with model.safetensors.index.json) or one made by `llama-jax convert` (Orbax).

    mesh: a mesh from `make_mesh`; each parameter goes straight onto its sharding (from Orbax each
    device reads only its shard). The rest fill the model's RuntimeConfig: dtype (parameters and
    compute, "float32" or "bfloat16"; None picks float32 on CPU and bfloat16 on GPU);
    attention_impl ("auto", "xla", "pallas", "cudnn") and norm_impl ("auto", "xla", "pallas"), where
    "auto" is pallas on GPU and xla on CPU; prefill_chunk (prompt tokens per prefill step, a
    multiple of 16; None: 2048); cpu_kernels ("auto", "on", "off": the optional C++ CPU backend).
    unstack_layers: run per-layer arrays (`inference_layout`, the default) or scan the stacked ones.
    speculative: speculative decoding for generate, stream, chat and the server, with vLLM's names:
    {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1}
    or {"method": "draft", "model": DIR, "num_speculative_tokens": 4} (a smaller model with this
    one's tokenizer, loaded with this dtype, mesh and CPU kernels); llama_jax.speculative. The same
    tokens as without it, fewer forwards where guesses hold.
    quantize: "int8", "int4" or "fp8" weight-only (llama_jax.quant, round to nearest at load: every
    linear weight, and the embedding and head at 8 bits); weights a checkpoint stores quantized
    (a GGUF's Q4/Q8 blocks, `convert --quantize`) load as they are either way.
    lora: a LoRA adapter directory in PEFT's format (`llama-jax train --lora-rank` writes one, and so
    does PEFT's save_pretrained), merged into the weights it adapts at load (W + scale A B, before
    `quantize`; an adapted weight the checkpoint stores quantized loads dequantized), so generation
    runs at the base model's speed; llama_jax.lora.AdapterError (a ValueError) for one it cannot read.
    adapters: {name: adapter directory} of LoRA adapters (PEFT's format) kept apart from the weights,
    for the engine (the server) to apply per request: requests for different adapters and for the
    base decode in one batch (`Engine.make_request(adapter=name)`)."""
    path = os.fspath(path)
    speculative = SpeculativeConfig.of(speculative)  # a bad setting fails before anything loads
    if quantize not in (None, *quant.FORMATS):
        raise ValueError(f"quantize must be one of {', '.join(quant.FORMATS)}, got {quantize!r}")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such model directory")
    if lora is not None and not os.path.isdir(lora):  # before the weights are read
        raise FileNotFoundError(f"lora: {os.fspath(lora)}: no such adapter directory")
    for name, d in (adapters or {}).items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapters: a name must be a non-empty string, got {name!r}")
        if not os.path.isdir(d):
            raise FileNotFoundError(f"adapters: {name}: {os.fspath(d)}: no such adapter directory")
    dtype = jnp.dtype(dtype or default_dtype()).name
    runtime = RuntimeConfig(param_dtype=dtype, dtype=dtype, attention_impl=attention_impl, norm_impl=norm_impl,
                            prefill_chunk=prefill_chunk, cpu_kernels=cpu_kernels)
    tp = 1 if mesh is None else sharding.axis_size("kv_heads", mesh)
    if orbax_io.is_converted(path):
        config = orbax_io.read_config(path)
        r = sharding.kv_replication(config, tp)
        # With KV heads to repeat, wk/wv are restored whole and repeated on the host.
        shardings = None if mesh is None or r > 1 else _stored_shardings(config, runtime, mesh)
        _, params = orbax_io.read_converted(path, dtype=dtype, shardings=shardings)
    elif os.path.isfile(os.path.join(path, "config.json")):
        config = LlamaConfig.from_hf(path)
        r = sharding.kv_replication(config, tp)
        params = read_hf_params(path, config, np.dtype(jnp.dtype(dtype)))
    else:
        raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face model directory) and no "
                                f"{orbax_io.CONFIG_FILE} (not a converted one)")
    if lora is not None:
        from llama_jax import lora as lora_lib

        params = lora_lib.merged_params(params, config, lora, dtype=dtype)
    served = None
    if adapters:
        from llama_jax import lora as lora_lib

        if r > 1:
            raise ValueError("adapters: not served where the mesh repeats KV heads (tp > n_kv_heads)")
        loaded = [lora_lib.read(d, config) for d in adapters.values()]
        served = (tuple(adapters), lora_lib.bank(loaded, config, np.dtype(jnp.dtype(dtype))))
    config, params = sharding.replicate_kv_heads(config, params, r)
    if quantize:
        params = quant.quantize_params(params, quantize, model_lib.LINEAR_WEIGHTS, release=True)
    tokenizer, chat_format = _load_tokenizer(path)
    layout = inference_layout(mesh) if unstack_layers else model_lib.STORED
    return Llama(model_lib.build(config, _view_freeing(params, layout, config), runtime, layout),
                 tokenizer=tokenizer, chat_format=chat_format, mesh=mesh, speculative=speculative, adapters=served)


def _view_freeing(params: dict, layout: Layout, config: LlamaConfig) -> dict:
    """model.view of a parameter tree that `load` owns, a few weights at a time (one kind, or the
    kinds a fused layout joins), each stored device array deleted once viewed: the peak is the model
    plus those weights, not two models (host arrays are viewed without a copy anyway)."""
    n_layers = config.n_layers
    stored = params.pop("layers")
    viewed = dict(params)  # a view changes only the layers
    viewed["layers"] = {} if not layout.per_layer else {i: {} for i in range(n_layers)}
    for part in list(stored):
        fused = model_lib.FUSED[part][1] if layout.fused and part in model_lib.FUSED else ()
        groups = [fused] if fused else []
        groups += [(name,) for name in stored[part] if name not in fused]
        for names in groups:
            ws = {name: stored[part].pop(name) for name in names}
            one = model_lib.view({"layers": {part: ws}}, layout, config)["layers"]
            for block, got in ([(viewed["layers"][i], one[i]) for i in range(n_layers)] if layout.per_layer
                               else [(viewed["layers"], one)]):
                block.setdefault(part, {}).update(got[part])
            for w in ws.values():
                if isinstance(w, jax.Array) and layout != model_lib.STORED:
                    w.delete()
    return viewed


def _stored_shardings(config: LlamaConfig, runtime: RuntimeConfig, mesh) -> dict:
    """The NamedSharding of every parameter in the stored layout, from its logical axes."""
    return sharding.param_shardings(model_lib.abstract(config, runtime), mesh)


def _load_tokenizer(path: str):
    """The checkpoint's tokenizer and chat format, or (None, None) for a weights-only directory."""
    from llama_jax.chat import chat_format_for
    from llama_jax.tokenizer import load_tokenizer

    if not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.model", "tokenizer.json")):
        return None, None
    tokenizer = load_tokenizer(path)
    try:
        chat_format = chat_format_for(path, tokenizer)
    except ValueError:  # a base model without a chat template: generate works, chat says why not
        chat_format = None
    return tokenizer, chat_format


def from_params(config: LlamaConfig, params: dict, runtime: RuntimeConfig | None = None, *, tokenizer=None,
                chat_format=None, mesh=None, layout: Layout | None = None) -> Llama:
    """A Llama over `params` (a nested dict of arrays in the stored layout: layers stacked, linear
    weights [in, out]), read in `layout` (default: `inference_layout(mesh)`). Host arrays stay on
    the host until `Llama` places each one on its device(s), so no device holds the stored and the
    viewed copy of a host weight."""
    layout = inference_layout(mesh) if layout is None else layout
    params = model_lib.view(params, layout, config)
    return Llama(model_lib.build(config, params, runtime, layout), tokenizer=tokenizer, chat_format=chat_format,
                 mesh=mesh)


def from_config(config: LlamaConfig, runtime: RuntimeConfig | None = None, *, seed: int = 0, mesh=None,
                unstack_layers: bool = True) -> Llama:
    """A randomly initialized model (for tests and benchmarks)."""
    params = nnx.to_pure_dict(nnx.state(Transformer(config, runtime, rngs=nnx.Rngs(seed)), nnx.Param))
    return from_params(config, params, runtime, mesh=mesh,
                       layout=None if unstack_layers else model_lib.STORED)


__all__ = ["inference_layout", "Llama", "load", "from_config", "from_params"]
