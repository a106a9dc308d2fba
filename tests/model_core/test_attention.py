"""Attention backends agree: SDPA's math kernel vs its fused kernels, masked-concat vs log-sum-exp merge, and
flash-attn vs SDPA on CUDA where flash-attn imports."""

import pytest
import torch

from model_core import attention as attn


@pytest.fixture(autouse=True)
def restore_backend():
    before = attn.get_attention_backend()
    yield
    attn.set_attention_backend(before)


def qkv(batch=2, q_len=24, k_len=40, heads=3, dim=16, seed=0, dtype=torch.float32, device="cpu"):
    generator = torch.Generator(device="cpu").manual_seed(seed)
    make = lambda length: torch.randn(batch, length, heads, dim, generator=generator).to(device, dtype)  # noqa: E731
    return make(q_len), make(k_len), make(k_len)


def test_math_and_fused_sdpa_kernels_agree():
    query, key, value = qkv()
    attn.set_attention_backend("math")
    reference = attn.attention(query, key, value)
    attn.set_attention_backend("sdpa")
    torch.testing.assert_close(attn.attention(query, key, value), reference, atol=1e-5, rtol=1e-5)


def test_explicit_softmax_reference():
    query, key, value = qkv(seed=1)
    scores = torch.einsum("bqhd,bkhd->bhqk", query, key) / query.shape[-1] ** 0.5
    expected = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), value)
    torch.testing.assert_close(attn.attention(query, key, value), expected, atol=1e-5, rtol=1e-5)


def test_optional_keys_masked_concat_equals_lse_merge():
    """The SDPA path (concatenate + key mask) and the flash path (two partial attentions merged by log-sum-exp)
    compute the same thing; here both run on CPU (attention_lse falls back to exact math)."""
    query, key, value = qkv(seed=2)
    opt_key, opt_value = key[:, :12].flip(1) * 1.3, value[:, :12] - 0.5
    valid = torch.tensor([True, False])
    masked = attn.attention_with_optional_keys(query, key, value, opt_key, opt_value, valid)
    out_a, lse_a = attn.attention_lse(query, key, value)
    out_b, lse_b = attn.attention_lse(query, opt_key, opt_value)
    merged = attn.merge_partial_attention(out_a, lse_a, out_b, lse_b, valid)
    torch.testing.assert_close(merged, masked, atol=1e-5, rtol=1e-5)
    # row 1 ignores the optional block entirely; row 0 does not
    torch.testing.assert_close(masked[1], attn.attention(query[1:], key[1:], value[1:])[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(masked[0], attn.attention(query[:1], key[:1], value[:1])[0], atol=1e-3)


def test_unknown_backend_is_rejected_with_allowed_values():
    with pytest.raises(ValueError, match="allowed: auto, sdpa, math, flash"):
        attn.set_attention_backend("xformers")


@pytest.mark.gpu
@pytest.mark.skipif(not attn.flash_available(), reason="flash-attn does not import here")
def test_flash_attn_equals_sdpa_on_cuda():
    query, key, value = qkv(q_len=256, k_len=384, heads=4, dim=64, dtype=torch.bfloat16, device="cuda")
    attn.set_attention_backend("sdpa")
    reference = attn.attention(query, key, value).float()
    opt_key, opt_value = key[:, :128], value[:, :128]
    valid = torch.tensor([True, False], device="cuda")
    reference_opt = attn.attention_with_optional_keys(query, key, value, opt_key, opt_value, valid).float()
    attn.set_attention_backend("flash")
    torch.testing.assert_close(attn.attention(query, key, value).float(), reference, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(attn.attention_with_optional_keys(query, key, value, opt_key, opt_value, valid).float(),
                               reference_opt, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_sdpa_math_and_flash_kernels_agree_on_cuda():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    query, key, value = qkv(q_len=256, k_len=384, heads=4, dim=64, dtype=torch.bfloat16, device="cuda")
    attn.set_attention_backend("math")
    reference = attn.attention(query, key, value).float()
    attn.set_attention_backend("sdpa")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        fused = attn.attention(query, key, value).float()
    torch.testing.assert_close(fused, reference, atol=2e-2, rtol=2e-2)
