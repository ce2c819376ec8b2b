"""The lean runner's compute-weight cache: shared across generators, refreshed when weights change, and the
fp32 compute path for half-precision models."""
from __future__ import annotations

import copy

import pytest
import torch

from lvr_engine import LatentConfig, LatentGenerator, ops
from lvr_engine.engine.weights import auto_compute_dtype, compute_weights
from tiny_models import make_batch, tiny_vlm

ROWS = [(5, (8, 8), 7), (9, (6, 8), 3)]


def test_generators_share_one_fused_copy():
    model = tiny_vlm(seed=7)
    a = LatentGenerator(model, LatentConfig(num_latent_steps=2, num_selected_patches=4))
    b = LatentGenerator(model, LatentConfig(num_latent_steps=0))
    batch, _ = make_batch(ROWS, seed=1)
    a.generate(**batch, max_new_tokens=2)
    cw = compute_weights(a.runner.w, torch.float32)
    b.generate(**batch, max_new_tokens=2)
    a.generate(**batch, max_new_tokens=2)
    assert compute_weights(b.runner.w, torch.float32) is cw  # no re-fusing between alternating generators
    q = model.model.language_model.layers[0].self_attn.q_proj.weight
    assert q.data_ptr() == cw.layers[0].qkv.data_ptr()  # the HF parameter is a view of the fused tensor


def test_in_place_weight_updates_are_seen():
    model = tiny_vlm(seed=8)
    cfg = LatentConfig(num_latent_steps=2, num_selected_patches=4)
    gen = LatentGenerator(model, cfg)
    batch, _ = make_batch(ROWS, seed=2)
    before = gen.generate(**batch, max_new_tokens=6)
    with torch.no_grad():  # what an optimizer step does
        for layer in model.model.language_model.layers:
            layer.mlp.up_proj.weight.mul_(-3.0)
            layer.self_attn.k_proj.weight.add_(0.05)
    after = gen.generate(**batch, max_new_tokens=6)
    fresh = LatentGenerator(copy.deepcopy(model), cfg).generate(**batch, max_new_tokens=6)
    assert torch.equal(after.sequences, fresh.sequences) and torch.equal(after.selected, fresh.selected)
    assert not (torch.equal(after.sequences, before.sequences) and torch.equal(after.selected, before.selected))


@pytest.mark.parametrize("packed", [True, False], ids=["packed_bf16", "fp32_copy"])
def test_fp32_compute_of_a_bf16_model_equals_the_upcast_model(packed, monkeypatch):
    """fp32 compute of a bf16 model (vision tower included) gives the tokens of the model upcast to fp32, both
    with the bf16 weights packed for ops.mixed_linear (the CPU default) and with an fp32 copy."""
    import lvr_engine.engine.runner as runner_mod
    import lvr_engine.engine.weights as weights_mod

    if not packed:
        monkeypatch.setattr(weights_mod, "packs_for_mixed_linear", lambda w, dtype: False)
    bf16 = tiny_vlm(seed=9, dtype=torch.bfloat16)
    up = copy.deepcopy(bf16).float()
    cfg = LatentConfig(num_latent_steps=2, num_selected_patches=4)
    batch, _ = make_batch(ROWS, seed=3)
    a = LatentGenerator(bf16, cfg, compute_dtype=torch.float32)
    assert a.runner.compute_dtype == torch.float32
    calls = []
    real = runner_mod.ops.mixed_linear
    monkeypatch.setattr(runner_mod.ops, "mixed_linear", lambda *a_, **k: calls.append(1) or real(*a_, **k))
    out_a = a.generate(**batch, max_new_tokens=6)
    uses_kernel = "cpu" in ops.available_backends()["cpu"] and packed
    assert bool(calls) == uses_kernel
    out_b = LatentGenerator(up, cfg).generate(**batch, max_new_tokens=6)
    assert torch.equal(out_a.sequences, out_b.sequences) and torch.equal(out_a.selected, out_b.selected)
    # the bf16 model's own parameters are untouched (converted copies, not a cast of the model)
    assert next(bf16.model.language_model.parameters()).dtype == torch.bfloat16
    assert next(bf16.model.visual.parameters()).dtype == torch.bfloat16


def test_fp32_vision_copy_follows_weight_updates():
    bf16 = tiny_vlm(seed=10, dtype=torch.bfloat16)
    adapter = LatentGenerator(bf16, LatentConfig(num_latent_steps=0), compute_dtype=torch.float32).adapter
    batch, _ = make_batch(ROWS, seed=4)
    pv, thw = batch["pixel_values"], batch["image_grid_thw"]
    with torch.no_grad():
        before = adapter.encode_images(pv, thw, compute_dtype=torch.float32)
        for p in bf16.model.visual.parameters():
            p.mul_(0.5)
        after = adapter.encode_images(pv, thw, compute_dtype=torch.float32)
        want = copy.deepcopy(bf16.model.visual).float()(pv.float(), grid_thw=thw).pooler_output
    assert all(t.dtype == torch.float32 for t in after)
    torch.testing.assert_close(torch.cat(after), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(torch.cat(before), torch.cat(after))


# The policy, written out: (model dtype, device type, CPU has native bf16) -> compute dtype. (The parameter is not
# called `device`: tests/conftest.py marks device="cuda" cases as needing a GPU, and these only name the type.)
POLICY = [
    (torch.float32, "cpu", False, torch.float32), (torch.float32, "cpu", True, torch.float32),
    (torch.bfloat16, "cpu", False, torch.float32), (torch.bfloat16, "cpu", True, torch.bfloat16),
    (torch.float16, "cpu", False, torch.float32), (torch.float16, "cpu", True, torch.float16),
    (torch.bfloat16, "cuda", False, torch.bfloat16), (torch.float16, "cuda", False, torch.float16),
]


@pytest.mark.parametrize("model_dtype,device_type,native,want", POLICY)
def test_auto_compute_dtype_policy(model_dtype, device_type, native, want, monkeypatch):
    """Half-precision models compute in fp32 on CPUs without native bf16 arithmetic, in their own dtype
    elsewhere; fp32 models in fp32. The generator's compute_dtype="auto" follows it on CPU."""
    import lvr_engine.engine.weights as weights_mod

    monkeypatch.setattr(weights_mod, "cpu_has_native_bf16", lambda: native)
    assert auto_compute_dtype(model_dtype, torch.device(device_type)) == want
    if device_type == "cpu" and model_dtype != torch.float16:
        gen = LatentGenerator(tiny_vlm(seed=11, dtype=model_dtype), LatentConfig(num_latent_steps=0))
        assert gen.runner.compute_dtype == want


def _flag_words(cpuinfo: str) -> set[str]:
    """The words of /proc/cpuinfo's ``flags`` lines."""
    out: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            out |= set(value.split())
    return out


@pytest.mark.parametrize("flags,native", [
    ("fpu sse2 avx2 fma avx512f avx512bw avx512_vnni", False),  # AVX-512 without its bf16 extension
    ("fpu sse2 avx2 avx512f avx512_bf16", True),
    ("fpu sse2 avx2 amx_tile amx_bf16", True),
])
def test_native_bf16_detection(flags, native, monkeypatch):
    """cpu_has_native_bf16 on given /proc/cpuinfo texts, and on this machine's against its own flag list."""
    import io

    import lvr_engine.engine.weights as weights_mod

    text = f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n"
    real_open = open
    monkeypatch.setattr(weights_mod, "open", lambda path, *a, **k: io.StringIO(text) if path == "/proc/cpuinfo"
                        else real_open(path, *a, **k), raising=False)
    weights_mod.cpu_has_native_bf16.cache_clear()
    try:
        assert weights_mod.cpu_has_native_bf16() is native
    finally:
        monkeypatch.undo()
        weights_mod.cpu_has_native_bf16.cache_clear()
    try:
        with open("/proc/cpuinfo") as f:
            here = _flag_words(f.read())
    except OSError:
        return
    assert weights_mod.cpu_has_native_bf16() == bool(here & {"avx512_bf16", "amx_bf16"})


@pytest.mark.parametrize("conv_cls,kernel", [(torch.nn.Conv3d, (2, 14, 14)), (torch.nn.Conv2d, (4, 4))])
def test_patchify_conv_runs_as_matmul_with_the_same_result(conv_cls, kernel):
    """The converted copy's patchify convolutions (kernel = stride) equal the convolution: as one matmul on
    one-patch inputs, through the convolution itself on larger inputs; other convolutions stay as they are."""
    from lvr_engine.models.converted import PatchConv, converted

    torch.manual_seed(0)
    tower = torch.nn.Sequential(conv_cls(3, 16, kernel, stride=kernel, bias=True),
                                conv_cls(16, 8, 3, padding=1)).to(torch.bfloat16)
    copy_ = converted(tower, torch.float32)
    assert isinstance(copy_[0], PatchConv) and isinstance(copy_[1], conv_cls)
    ref = tower[0].float()
    one = torch.randn(7, 3, *kernel)
    two = torch.randn(2, 3, *[2 * k for k in kernel])
    for x in (one, two):
        want = torch.nn.functional.conv3d if conv_cls is torch.nn.Conv3d else torch.nn.functional.conv2d
        expect = want(x.double(), ref.weight.double(), ref.bias.double(), stride=kernel)
        got = copy_[0](x)
        assert got.shape == expect.shape and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expect, rtol=1e-5, atol=1e-5)
