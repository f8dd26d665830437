"""LoRA against PEFT + torch autograd: the initialisation, one step's loss and adapter gradients, five
AdamW steps, dropout with PEFT's semantics (the same masks fed to both), the exported adapter loaded
by PEFT (our merged inference gives its logits), PEFT's own save read back; a frozen base (no base
gradient computed, optimizer state for the adapters only), the layouts and a mesh of 8 fake devices,
resume, the command line, bad input.

The tiny models are tests/tiny_models.py's; every trainer uses batches of one shape."""

import copy
import io
import json
import math
import os
import pathlib

import jax
import numpy as np
import pytest
import torch

import llama_jax
from llama_jax import lora
from llama_jax.train import Trainer, TrainConfig
from test_train import B, BASE, T, _assert_close, tiny_model_with_smollm2_tokenizer, torch_warmup_cosine
from tiny_models import make_hf_model

RANK, ALPHA = 4, 12.0
PEFT_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
                "down": "down_proj"}


def _config(**kw) -> TrainConfig:
    return TrainConfig(**{**BASE.to_dict(), "lora_rank": RANK, "lora_alpha": ALPHA, **kw})


def _batch(seed, b=B):
    return {"tokens": np.random.default_rng(seed).integers(0, 211, (b, T))}


def _random_adapters(trainer: Trainer, seed: int) -> dict:
    """The trainer's adapter tree filled with random A and B (B nonzero, so that A has a gradient)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: (0.1 * rng.standard_normal(a.shape)).astype(np.float32), trainer.params)


def _peft(hf, config: TrainConfig, adapters: dict, llama_config):
    """PEFT's LoRA model over a copy of `hf`, its adapters set to ours (through PEFT's own state-dict
    loader and our export names)."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    lc = config.lora()
    pm = get_peft_model(copy.deepcopy(hf), LoraConfig(r=lc.rank, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                                      target_modules=[PEFT_MODULES[t] for t in lc.targets]))
    state = {k: torch.tensor(v) for k, v in lora.to_peft_state_dict(adapters, llama_config).items()}
    result = set_peft_model_state_dict(pm, state)
    assert not result.unexpected_keys, result.unexpected_keys
    return pm


def _peft_tensors(pm, grad: bool) -> dict:
    """PEFT's adapter parameters (or their gradients) by the names its save_pretrained writes."""
    return {n.replace(".default", ""): (p.grad if grad else p).detach().numpy().copy()
            for n, p in pm.named_parameters() if p.requires_grad}


# --- Initialisation and the frozen base ---------------------------------------------------------------


@pytest.mark.slow
def test_init_is_peft_s_and_starts_as_the_base_model(untied):
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) (Kaiming-uniform, a = sqrt(5)), B zero, as PEFT draws them, so
    the first loss is the base model's to the last bit."""
    hf, _, llama = untied
    trainer = Trainer(llama, _config())
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(copy.deepcopy(hf), LoraConfig(r=RANK, lora_alpha=ALPHA,
                                                      target_modules=list(PEFT_MODULES.values())))
    theirs = _peft_tensors(pm, grad=False)
    ours = lora.to_peft_state_dict(trainer.params, llama.config)
    assert set(ours) == set(theirs)
    for name, a in ours.items():
        if ".lora_B." in name:
            assert not a.any() and not theirs[name].any(), name
            continue
        bound = 1 / math.sqrt(a.shape[1])
        for draw in (a, theirs[name]):  # both uniform on [-bound, bound]: max near it, std bound / sqrt(3)
            assert 0.9 * bound <= np.abs(draw).max() <= bound, (name, np.abs(draw).max(), bound)
            assert abs(draw.std() - bound / math.sqrt(3)) <= 0.25 * bound / math.sqrt(3), name
    batch = _batch(0)
    assert trainer.loss_and_grads(batch)[0] == Trainer(llama, BASE).loss_and_grads(batch)[0]


def test_the_base_is_frozen_and_only_adapters_have_optimizer_state(untied):
    _, _, llama = untied
    trainer = Trainer(llama, _config(warmup_steps=0))
    before = jax.tree.map(np.asarray, trainer.merged_params())
    frozen = jax.tree.map(np.array, trainer._frozen)
    trainer.step(_batch(1))
    assert jax.tree.all(jax.tree.map(np.array_equal, frozen, jax.tree.map(np.asarray, trainer._frozen)))
    moments = sum(a.size for a in jax.tree.leaves(trainer.opt_state) if a.ndim)
    assert moments == 2 * lora.nbytes(trainer.params) // 4  # mu and nu of each adapter, nothing else
    after = trainer.merged_params()
    changed = {p: not np.array_equal(before["layers"][part][p], after["layers"][part][p])
               for part in ("attention", "feed_forward") for p in after["layers"][part]}
    assert all(changed.values()), changed
    assert np.array_equal(before["tok_embeddings"], after["tok_embeddings"])


@pytest.mark.slow
def test_a_lora_step_computes_no_base_weight_gradient(untied):
    """XLA's FLOP count of the gradient program (XLA's own products, not the C++ backend's, which it
    counts as 0): a LoRA step of one rank-1 adapter does all a full step does but the weight
    gradients, 2 FLOPs per weight per token, every projection and the output head (which the loss
    would otherwise compute in its forward: 13% of them here)."""
    _, path, _ = untied
    llama = llama_jax.load(path, dtype="float32", cpu_kernels="off")
    batch = _batch(2)
    flops = {name: Trainer(llama, config).lower(batch)["grads"].compile().cost_analysis()["flops"]
             for name, config in (("full", BASE), ("lora", _config(lora_rank=1, lora_targets=("q",))))}
    c = llama.config
    weights = c.n_layers * (c.dim * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim + c.n_heads * c.head_dim * c.dim
                            + 3 * c.dim * c.ffn_dim) + c.dim * c.vocab_size
    weight_grads = 2 * weights * B * T
    adapter = 3 * 2 * B * T * c.n_layers * (c.dim + c.n_heads * c.head_dim)  # x a, h b: forward and two gradients
    # Also skipped: the embedding's and the norms' gradients (a scatter-add and sums, XLA counts some).
    saved = flops["full"] - flops["lora"]
    assert 0.97 * (weight_grads - adapter) <= saved <= 1.25 * weight_grads, (flops, weight_grads)


# --- Parity with PEFT + torch -----------------------------------------------------------------------


@pytest.mark.parametrize("name,targets,scan", [("g3_scaled_headdim", lora.DEFAULT_TARGETS, False),
                                               ("g1_tied", ("q", "v", "down"), True)])
def test_one_step_loss_and_adapter_gradients_equal_peft(models, name, targets, scan):
    """All targets in the CPU's per-layer fused layout; some (k missing from the fused q|k|v) over
    the scanned stacked layers."""
    hf, _, llama = models[name]
    config = _config(lora_targets=targets, scan_layers=scan)
    trainer = Trainer(llama, config)
    trainer.params = _random_adapters(trainer, 3)
    batch = _batch(4)
    loss, grads = trainer.loss_and_grads(batch)
    pm = _peft(hf, config, trainer.params, llama.config).train()
    ids = torch.tensor(batch["tokens"])
    want = pm(input_ids=ids, labels=ids).loss
    want.backward()
    assert abs(loss - want.item()) <= 1e-5 * want.item(), (loss, want.item())
    _assert_close(lora.to_peft_state_dict(grads, llama.config), _peft_tensors(pm, grad=True), 1e-4, "gradients")


def test_five_adamw_steps_equal_peft_and_torch(untied):
    """torch.optim.AdamW over the adapters (all decayed), the warmup-cosine LambdaLR and
    clip_grad_norm_, step for step. From adapters already trained some (B nonzero): from B = 0, A's
    first gradients are near zero and Adam's update, about lr * sign(gradient), turns their f32
    rounding into visible differences."""
    hf, _, llama = untied
    c = _config(total_steps=5)
    trainer = Trainer(llama, c)
    trainer.params = _random_adapters(trainer, 15)
    pm = _peft(hf, c, trainer.params, llama.config).train()
    batches = [_batch(10 + i) for i in range(5)]
    ours = [trainer.step(b) for b in batches]

    trained = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=c.peak_lr, betas=(c.b1, c.b2), eps=c.eps, weight_decay=c.weight_decay)

    sched = torch_warmup_cosine(opt, c)
    for i, batch in enumerate(batches):
        ids = torch.tensor(batch["tokens"])
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(trained, c.grad_clip).item()
        opt.step()
        sched.step()
        opt.zero_grad()
        assert abs(ours[i]["loss"] - loss.item()) <= 1e-5 * loss.item(), (i, ours[i], loss.item())
        assert abs(ours[i]["grad_norm"] - norm) <= 1e-4 * norm, (i, ours[i], norm)
    assert max(m["grad_norm"] for m in ours) > c.grad_clip  # clipping was active
    assert ours[-1]["loss"] < ours[0]["loss"]
    _assert_close(lora.to_peft_state_dict(trainer.params, llama.config), _peft_tensors(pm, grad=False), 1e-4,
                  "adapters after 5 steps")


@pytest.mark.slow
def test_dropout_is_peft_s_with_the_same_masks(untied):
    """lora_dropout 0.3: PEFT's dropout modules replaced by ours (the masks llama_jax.lora.dropout_keys
    draws for this step), the loss and gradients agree; evaluation uses no dropout; the scanned and
    per-layer fused layouts draw the same masks."""
    hf, _, llama = untied
    p = 0.3
    config = _config(lora_dropout=p)
    trainer = Trainer(llama, config)
    trainer.params = _random_adapters(trainer, 5)
    batch = _batch(6)
    loss, grads = trainer.loss_and_grads(batch)
    keys = lora.dropout_keys(trainer.dropout_key(), llama.config.n_layers)

    pm = _peft(hf, config, trainer.params, llama.config).train()

    class Mask(torch.nn.Module):
        def __init__(self, key):
            super().__init__()
            self.key = key

        def forward(self, x):
            keep = np.asarray(jax.random.bernoulli(self.key, 1 - p, tuple(x.shape)))
            return x * torch.tensor(keep, dtype=x.dtype) / (1 - p)

    layers = pm.base_model.model.model.layers
    for t, module in PEFT_MODULES.items():
        for i, layer in enumerate(layers):
            owner = layer.self_attn if t in "qkvo" else layer.mlp
            getattr(owner, module).lora_dropout["default"] = Mask(keys[t][i])
    ids = torch.tensor(batch["tokens"])
    want = pm(input_ids=ids, labels=ids).loss
    want.backward()
    assert abs(loss - want.item()) <= 1e-5 * want.item(), (loss, want.item())
    _assert_close(lora.to_peft_state_dict(grads, llama.config), _peft_tensors(pm, grad=True), 1e-4,
                  "gradients with dropout")

    without = Trainer(llama, _config())
    without.params = trainer.params
    assert abs(without.loss_and_grads(batch)[0] - loss) > 1e-3  # the masks did something
    assert trainer.evaluate([batch]) == without.evaluate([batch])
    scanned = Trainer(llama, _config(lora_dropout=p, scan_layers=True))
    scanned.params = trainer.params
    loss_s, grads_s = scanned.loss_and_grads(batch)
    assert abs(loss_s - loss) <= 1e-6 * loss
    _assert_close(lora.to_peft_state_dict(grads_s, llama.config), lora.to_peft_state_dict(grads, llama.config),
                  2e-5, "scanned against per-layer")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_qlora_equals_peft_over_the_dequantized_model(tmp_path, fmt):
    """QLoRA: over a model loaded quantized (int4 groups with minimums, or int8; the embedding and
    head at 8 bits), the frozen weights stay quantized, and the loss and adapter gradients are
    PEFT's over the float model they stand for; the merged export is that model plus the adapters."""
    from llama_jax import quant
    from llama_jax.checkpoint import to_hf_state_dict

    hf, path = make_hf_model(tmp_path, "kv8")  # every input width a multiple of int4's groups of 32
    llama = llama_jax.load(path, dtype="float32", quantize=fmt)
    config = _config()
    trainer = Trainer(llama, config)
    assert quant.is_quantized(trainer._frozen)
    trainer.params = _random_adapters(trainer, 16)
    batch = _batch(17)
    loss, grads = trainer.loss_and_grads(batch)

    dequantized = quant.dequantize_params(llama.params, np.float32)
    stands_for = copy.deepcopy(hf)
    stands_for.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in
                                to_hf_state_dict(dequantized, llama.config).items()}, strict=False)
    pm = _peft(stands_for, config, trainer.params, llama.config).train()
    ids = torch.tensor(batch["tokens"])
    want = pm(input_ids=ids, labels=ids).loss
    want.backward()
    assert abs(loss - want.item()) <= 1e-5 * want.item(), (loss, want.item())
    _assert_close(lora.to_peft_state_dict(grads, llama.config), _peft_tensors(pm, grad=True), 1e-4, f"{fmt} gradients")
    with torch.no_grad():
        theirs = pm.eval()(ids[:2]).logits.numpy()
    np.testing.assert_allclose(trainer.llama().logits(batch["tokens"][:2].tolist()), theirs, rtol=1e-4, atol=1e-4)
    trainer.step(batch)
    # Full fine-tuning of a quantized model trains the float32 weights it stands for.
    full = Trainer(llama, BASE)
    assert not quant.is_quantized(full.params)
    assert jax.tree.all(jax.tree.map(np.array_equal, jax.tree.map(np.asarray, full.params),
                                     jax.tree.map(np.asarray, dequantized)))


# --- Export and loading -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["g3_scaled_headdim", "g1_tied"])
def test_exported_adapter_loads_in_peft_with_our_logits(models, name, tmp_path):
    """`--export peft` -> PeftModel.from_pretrained gives the logits of `load(base, lora=DIR)` and
    of the trainer's own model; `--export merged` loads in transformers as a plain model with the
    same logits."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    hf, path, llama = models[name]
    trainer = Trainer(llama, _config(lora_targets=("q", "k", "o", "up")))
    trainer.params = _random_adapters(trainer, 7)
    adapter = trainer.export(tmp_path / "adapter", base_model=str(path))
    assert sorted(os.listdir(adapter)) == ["adapter_config.json", "adapter_model.safetensors"]
    ids = _batch(8)["tokens"][:2]
    pm = PeftModel.from_pretrained(copy.deepcopy(hf), adapter).eval()
    with torch.no_grad():
        theirs = pm(torch.tensor(ids)).logits.numpy()
    ours = llama_jax.load(path, dtype="float32", lora=adapter).logits(ids.tolist())
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(trainer.llama().logits(ids.tolist()), theirs, rtol=1e-4, atol=1e-4)

    plain = LlamaForCausalLM.from_pretrained(trainer.export(tmp_path / "merged", "merged"), dtype=torch.float32)
    with torch.no_grad():
        np.testing.assert_allclose(plain.eval()(torch.tensor(ids)).logits.numpy(), theirs, rtol=1e-4, atol=1e-4)
    spec, adapters = lora.read(adapter, llama.config)
    assert spec == trainer.lora
    _assert_close(lora.to_peft_state_dict(adapters, llama.config),
                  lora.to_peft_state_dict(trainer.params, llama.config), 0.0, "read back")


def test_peft_s_own_save_is_read(untied, tmp_path):
    """An adapter PEFT trained and saved (rsLoRA, some layers only, its own config file) merges into
    our model with PEFT's logits."""
    from peft import LoraConfig, get_peft_model

    hf, _, llama = untied
    pm = get_peft_model(copy.deepcopy(hf), LoraConfig(r=3, lora_alpha=5, use_rslora=True, layers_to_transform=[0, 2],
                                                      target_modules=["v_proj", "gate_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    pm.save_pretrained(tmp_path / "theirs")
    ids = _batch(9)["tokens"][:2]
    with torch.no_grad():
        theirs = pm.eval()(torch.tensor(ids)).logits.numpy()
    spec, adapters = lora.read(tmp_path / "theirs", llama.config)
    assert (spec.rank, spec.alpha, spec.rslora, spec.targets) == (3, 5, True, ("v", "gate", "down"))
    assert not adapters["layers"]["attention"]["wv"]["a"][1].any()  # layer 1 has no adapter
    merged = lora.merge(llama.params, adapters, spec)
    ours = llama_jax.api.from_params(llama.config, merged, llama.runtime).logits(ids.tolist())
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_adapters_we_cannot_read_are_refused_in_one_line(untied, tmp_path):
    _, path, llama = untied
    with pytest.raises(FileNotFoundError, match="^lora: .*nowhere: no such adapter directory$"):
        llama_jax.load(path, lora=tmp_path / "nowhere")
    trainer = Trainer(llama, _config())
    good = pathlib.Path(trainer.export(tmp_path / "good"))

    def variant(name, config=None, tensors=None, drop=None):
        d = tmp_path / name
        d.mkdir()
        cfg = json.loads((good / "adapter_config.json").read_text()) if config is None else config
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        if drop != "weights":
            from safetensors.numpy import load_file, save_file

            save_file(tensors if tensors is not None else load_file(str(good / "adapter_model.safetensors")),
                      str(d / "adapter_model.safetensors"))
        return d

    cfg = json.loads((good / "adapter_config.json").read_text())
    from safetensors.numpy import load_file

    t = load_file(str(good / "adapter_model.safetensors"))
    wrong = dict(t)
    name = next(k for k in t if k.endswith("q_proj.lora_A.weight"))
    wrong[name] = np.zeros((RANK, 7), np.float32)
    cases = [
        (tmp_path / "nowhere", "no adapter_config.json"),
        (variant("dora", {**cfg, "use_dora": True}), "use_dora=True is not supported"),
        (variant("saved", {**cfg, "modules_to_save": ["lm_head"]}), "modules_to_save"),
        (variant("prefix", {**cfg, "peft_type": "PREFIX_TUNING"}), "only LORA"),
        (variant("noweights", drop="weights"), "no adapter_model.safetensors"),
        (variant("shape", tensors=wrong), "this model needs (4, 48)"),
        (variant("extra", tensors={**t, "base_model.model.lm_head.lora_A.weight": np.zeros((RANK, 48), np.float32)}),
         "not a LoRA A/B of a Llama projection"),
    ]
    for where, needle in cases:
        with pytest.raises(lora.AdapterError, match=needle.replace("(", r"\(").replace(")", r"\)")) as e:
            lora.read(where, llama.config)
        assert len(str(e.value).splitlines()) == 1


# --- Layouts, accumulation, meshes, resume -------------------------------------------------------------


def test_accumulation_remat_and_layouts_agree(untied):
    """Four micro-batches equal one batch; remat over the scanned layers equals the per-layer fused
    loop (the CPU default) and the per-layer unfused one."""
    _, _, llama = untied
    batch = _batch(11)
    plain = Trainer(llama, _config())
    plain.params = _random_adapters(plain, 12)
    loss, want = plain.loss_and_grads(batch)
    want = lora.to_peft_state_dict(want, llama.config)
    for kw in (dict(grad_accum=4, batch_size=1), dict(remat=True, scan_layers=True)):
        other = Trainer(llama, _config(**kw))
        other.params = plain.params
        loss_o, got = other.loss_and_grads(batch)
        assert abs(loss_o - loss) <= 1e-6 * loss, kw
        _assert_close(lora.to_peft_state_dict(got, llama.config), want, 1e-5, str(kw))


@pytest.mark.slow
def test_sharded_lora_equals_single_device(tmp_path):
    """dp=2 x fsdp=2 x tp=2 over 8 fake devices and pp=3 x tp=2 over 6: the same loss and adapter
    gradients as one device; the adapters split by their weight's axes."""
    _, path = make_hf_model(tmp_path, "g4_sharded")
    batch = _batch(13, b=8)
    config = _config(batch_size=8)
    single = Trainer(llama_jax.load(path, dtype="float32"), config)
    adapters = _random_adapters(single, 14)
    single.params = adapters
    loss, want = single.loss_and_grads(batch)
    want = lora.to_peft_state_dict(want, single.model_config)
    for mesh in (llama_jax.make_mesh(dp=2, fsdp=2, tp=2), llama_jax.make_mesh(pp=3, tp=2)):
        trainer = Trainer(llama_jax.load(path, dtype="float32", mesh=mesh), config)
        trainer.params = adapters
        b = trainer.params["layers"]["attention"]["wq"]["b"]
        assert "model" in str(b.sharding.spec), b.sharding.spec
        loss_s, got = trainer.loss_and_grads(batch)
        assert abs(loss_s - loss) <= 1e-5 * loss, mesh.shape
        _assert_close(lora.to_peft_state_dict(got, trainer.model_config), want, 3e-5, f"mesh {dict(mesh.shape)}")
        trainer.step(batch)


@pytest.mark.slow
def test_resume_continues_as_a_straight_run(untied, tmp_path):
    """Two steps, a checkpoint, a new Trainer resumed from it, two more: the adapters and dropout masks
    of a straight four-step run, to the bit; another LoRA setting is refused."""
    _, _, llama = untied
    config = _config(lora_dropout=0.1, total_steps=4)
    batches = [_batch(20 + i) for i in range(4)]
    straight = Trainer(llama, config)
    losses = [straight.step(b)["loss"] for b in batches]
    first = Trainer(llama, config)
    for b in batches[:2]:
        first.step(b)
    first.save(tmp_path / "ckpt")
    resumed = Trainer(llama, config, resume_from=tmp_path / "ckpt")
    assert resumed.step_count == 2
    assert [resumed.step(b)["loss"] for b in batches[2:]] == losses[2:]
    _assert_close(lora.to_peft_state_dict(resumed.params, llama.config),
                  lora.to_peft_state_dict(straight.params, llama.config), 0.0, "resumed")
    with pytest.raises(ValueError, match="another TrainConfig.*lora_rank"):
        Trainer(llama, _config(lora_dropout=0.1, total_steps=4, lora_rank=8), resume_from=tmp_path / "ckpt")


# --- Configuration and the command line ---------------------------------------------------------------


def test_bad_lora_settings_are_refused():
    for kw, needle in [({"lora_rank": 0}, "lora_rank must be a positive integer"),
                       ({"lora_rank": 4, "lora_alpha": -1.0}, "lora_alpha must be a positive number"),
                       ({"lora_rank": 4, "lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
                       ({"lora_rank": 4, "lora_targets": ("q", "x")}, "lora_targets"),
                       ({"lora_rank": 4, "lora_targets": ()}, "lora_targets"),
                       ({"lora_alpha": 8.0}, "need lora_rank")]:
        with pytest.raises(ValueError, match=needle):
            TrainConfig(**kw)
    assert TrainConfig(lora_rank=8, lora_targets=("v", "q")).lora() == lora.LoraConfig(8, 16, 0.0, ("q", "v"))


def test_export_formats_follow_the_run(untied, tmp_path):
    _, _, llama = untied
    with pytest.raises(ValueError, match="a LoRA run exports 'peft' or 'merged'"):
        Trainer(llama, _config()).export(tmp_path / "x", "hf")
    with pytest.raises(ValueError, match="a full fine-tuning run exports 'hf' or 'ours'"):
        Trainer(llama, BASE).export(tmp_path / "x", "peft")
    assert not (tmp_path / "x").exists()


@pytest.fixture
def in_process(monkeypatch, tmp_path):
    from llama_jax import cli

    monkeypatch.setenv("LLAMA_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cli, "_cache_compiled_programs", lambda: None)
    return cli.main


@pytest.fixture(scope="module")
def tok_model(tmp_path_factory):
    return tiny_model_with_smollm2_tokenizer(tmp_path_factory.mktemp("lora_cli"))


def _train_args(model, out, *extra, lora=("--lora-rank", "4", "--lora-targets", "q,v,down")):
    return ["train", "--model", str(model), "--out", str(out), "--steps", "6", "--seq-len", "32", "--batch-size", "2",
            "--warmup", "1", "--lr", "1e-2", "--eval-every", "3", "--eval-rows", "4", "--save-every", "3", *lora,
            *extra]


@pytest.mark.slow
def test_cli_lora_run_resumes_and_exports_peft_and_merged(tok_model, in_process, tmp_path, capsys, monkeypatch):
    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import LlamaForCausalLM

    straight, parts = tmp_path / "straight", tmp_path / "parts"
    assert in_process(_train_args(tok_model, straight, "--lora-dropout", "0.1", "--export", "both")) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 6 and summary["eval_loss"] is not None
    assert in_process(_train_args(tok_model, parts, "--lora-dropout", "0.1", "--stop-after", "3")) == 0
    assert in_process(_train_args(tok_model, parts, "--lora-dropout", "0.1", "--resume")) == 0
    a, b = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (straight, parts))
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a), "resumed adapter differs"
    assert not (parts / "merged").exists()
    cfg = json.loads((straight / "adapter" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["target_modules"]) == (4, 8, ["down_proj", "q_proj", "v_proj"])
    assert cfg["base_model_name_or_path"] == str(tok_model)
    ids = torch.tensor([[5, 9, 300, 17, 2000]])
    with torch.no_grad():
        merged = LlamaForCausalLM.from_pretrained(straight / "merged").eval()(ids).logits.numpy()
        base = LlamaForCausalLM.from_pretrained(tok_model)
        peft = PeftModel.from_pretrained(base, straight / "adapter").eval()(ids).logits.numpy()
    np.testing.assert_allclose(merged, peft, rtol=1e-4, atol=1e-4)
    assert not np.allclose(peft, LlamaForCausalLM.from_pretrained(tok_model).eval()(ids).logits.detach().numpy())

    # generate and chat --lora DIR: the tokens of the merged export, which the base's are not.
    def generated(*model):
        assert in_process(["generate", *model, "--prompt", "The with statement", "--max-new-tokens", "8",
                           "--json"]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["token_ids"]

    with_lora = generated("--model", str(tok_model), "--lora", str(straight / "adapter"))
    assert with_lora == generated("--model", str(straight / "merged"))
    assert with_lora != generated("--model", str(tok_model))
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n"))
    assert in_process(["chat", "--model", str(tok_model), "--lora", str(straight / "adapter"),
                       "--max-new-tokens", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["user"] == "Hello"
    assert in_process(["generate", "--model", str(tok_model), "--lora", str(tmp_path / "nowhere"),
                       "--prompt", "x"]) == 2
    assert "lora: " in capsys.readouterr().err


def test_cli_bad_lora_input_is_refused_with_nothing_written(tok_model, in_process, tmp_path, capsys):
    cases = [(["--lora-targets", "q,x"], "--lora-targets"), (["--lora-dropout", "1.5"], "--lora-dropout must be"),
             (["--export", "hf"], "--export hf: a LoRA run (--lora-rank) exports peft, merged, both or none")]
    for extra, needle in cases:
        out = tmp_path / "new"
        assert in_process(_train_args(tok_model, out, *extra)) == 2, extra
        err = capsys.readouterr().err
        assert needle in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1, (extra, err)
        assert not out.exists()
    assert in_process(_train_args(tok_model, tmp_path / "new", lora=("--lora-alpha", "8"))) == 2
    assert "need --lora-rank" in capsys.readouterr().err
