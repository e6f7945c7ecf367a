"""mmserve's fix of vLLM's CPU LoRA kernels (``engines.vllm_internals.register_cpu_lora_fix``): a token without an
adapter (slot -1) gets none, in a batch where others have one; against a reference computed
token by token. The same runs for real in tests/integration/vllm/test_lora.py (base and adapter
requests batched together answer as they do alone)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from engines import vllm_internals as vllm_cpu_lora  # noqa: E402

SLOTS, RANK, HIDDEN, OUT = 2, 4, 8, 6
INDICES = torch.tensor([0, -1, 1, -1, 0])


def _ops():
    """vLLM's kernels as it ships them (this process may have loaded the plugin: a test that
    builds vLLM's engine arguments makes vLLM load its plugins)."""
    from types import SimpleNamespace

    from vllm.lora.ops.torch_ops import lora_ops

    return SimpleNamespace(**{name: getattr(getattr(lora_ops, name), "__wrapped__", getattr(lora_ops, name))
                              for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")})


def test_the_pinned_vllm_still_gives_slot_minus_1_the_last_adapter():
    """If this fails, vLLM has fixed its kernels: the plugin leaves them alone, and can go."""
    assert vllm_cpu_lora.aliases_last_slot(_ops().bgmv_shrink)
    assert not vllm_cpu_lora.aliases_last_slot(vllm_cpu_lora._shrink(_ops().bgmv_shrink))


def test_shrink_gives_tokens_without_an_adapter_zero():
    torch.manual_seed(0)
    x, a = torch.randn(len(INDICES), HIDDEN), torch.randn(SLOTS, 1, RANK, HIDDEN)
    out = torch.full((len(INDICES), RANK), 7.0)
    vllm_cpu_lora._shrink(_ops().bgmv_shrink)(x, a, out, INDICES, 0.5)
    for row, slot in enumerate(INDICES.tolist()):
        want = torch.zeros(RANK) if slot < 0 else 0.5 * a[slot, 0] @ x[row]
        assert torch.allclose(out[row], want, atol=1e-5), row


@pytest.mark.parametrize("add", [True, False])
def test_expand_adds_nothing_to_tokens_without_an_adapter(add):
    torch.manual_seed(1)
    x, b = torch.randn(len(INDICES), RANK), torch.randn(SLOTS, 1, OUT, RANK)
    before = torch.randn(len(INDICES), OUT)
    out = before.clone()
    vllm_cpu_lora._expand(_ops().bgmv_expand)(x, b, out, INDICES, add)
    for row, slot in enumerate(INDICES.tolist()):
        delta = torch.zeros(OUT) if slot < 0 else b[slot, 0] @ x[row]
        want = before[row] + delta if add else delta
        assert torch.allclose(out[row], want, atol=1e-5), row


@pytest.mark.parametrize("add", [True, False])
def test_expand_slice_touches_only_its_slice_and_only_for_adapted_tokens(add):
    torch.manual_seed(2)
    x, b = torch.randn(len(INDICES), RANK), torch.randn(SLOTS, 1, 3, RANK)
    before = torch.randn(len(INDICES), OUT)
    out = before.clone()
    vllm_cpu_lora._expand_slice(_ops().bgmv_expand_slice)(x, b, out, INDICES, 2, 3, add)
    for row, slot in enumerate(INDICES.tolist()):
        want = before[row].clone()
        delta = torch.zeros(3) if slot < 0 else b[slot, 0] @ x[row]
        want[2:5] = want[2:5] + delta if add else delta
        assert torch.allclose(out[row], want, atol=1e-5), row


@pytest.mark.parametrize("add", [True, False])
def test_a_batch_without_adapters_gets_none(add):
    none = torch.tensor([-1, -1, -1])
    x, a, b = torch.randn(3, HIDDEN), torch.randn(SLOTS, 1, RANK, HIDDEN), torch.randn(SLOTS, 1, OUT, RANK)
    shrunk = torch.full((3, RANK), 7.0)
    vllm_cpu_lora._shrink(_ops().bgmv_shrink)(x, a, shrunk, none, 1.0)
    assert not shrunk.any()
    before = torch.randn(3, OUT)
    out = before.clone()
    vllm_cpu_lora._expand(_ops().bgmv_expand)(torch.randn(3, RANK), b, out, none, add)
    assert torch.equal(out, before if add else torch.zeros(3, OUT))
    out = before.clone()
    vllm_cpu_lora._expand_slice(_ops().bgmv_expand_slice)(torch.randn(3, RANK), b[:, :, :3], out, none, 2, 3, add)
    want = before.clone()
    if not add:
        want[:, 2:5] = 0
    assert torch.equal(out, want)
