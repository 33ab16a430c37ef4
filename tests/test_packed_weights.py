"""dcnv2.ops.packed_weights: the CPU forward reuses a packed weight only while the weight is unchanged."""
from __future__ import annotations

import pytest
import torch

from dcnv2.ops import deform_conv2d, packed_weights, packed_weights_info, reference
from dcnv2.ops._native import HAS_NATIVE
from dcnv2.ops.weight_cache import PackedWeightsInfo

pytestmark = pytest.mark.skipif(not HAS_NATIVE, reason="the C++ extension is not built")


def case(seed: int = 0, C: int = 16, Cout: int = 8, groups: int = 1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, C, 9, 11, generator=g, dtype=dtype)
    w = torch.randn(Cout, C // groups, 3, 3, generator=g, dtype=dtype)
    off = torch.randn(2, 18, 9, 11, generator=g, dtype=dtype) * 2
    mask = torch.rand(2, 9, 9, 11, generator=g, dtype=dtype)
    return x, w, off, mask


def conv(x, w, off, mask):
    return deform_conv2d(x, off, w, None, padding=(1, 1), mask=mask)


def oracle(x, w, off, mask):
    d = torch.float64
    return reference.deform_conv2d(x.to(d), off.to(d), w.to(d), None, (1, 1), (1, 1), (1, 1), mask.to(d))


def check(out, x, w, off, mask):
    torch.testing.assert_close(out.to(torch.float64), oracle(x, w, off, mask), rtol=1e-4, atol=1e-4)


def test_the_second_call_reuses_the_packed_weight_and_gives_the_same_output():
    x, w, off, mask = case()
    plain = conv(x, w, off, mask)
    assert packed_weights_info() == PackedWeightsInfo(False, 0, 0, 0, 0)
    with packed_weights():
        first = conv(x, w, off, mask)
        second = conv(x, w, off, mask)
        info = packed_weights_info()
    assert (info.enabled, info.entries, info.hits, info.misses) == (True, 1, 1, 1)
    assert info.bytes >= w.numel() * 4
    assert torch.equal(first, second)
    torch.testing.assert_close(first, plain, rtol=1e-5, atol=1e-5)
    check(first, x, w, off, mask)


def test_the_cache_empties_and_turns_off_when_the_outermost_block_exits():
    x, w, off, mask = case()
    with packed_weights():
        with packed_weights():
            conv(x, w, off, mask)
        assert packed_weights_info().entries == 1  # the outer block still holds it
        conv(x, w, off, mask)
        assert packed_weights_info().hits == 1
    info = packed_weights_info()
    assert not info.enabled and info.entries == 0 and info.bytes == 0
    conv(x, w, off, mask)  # off: nothing is stored
    assert packed_weights_info().entries == 0


def test_an_in_place_change_of_the_weight_is_seen():
    x, w, off, mask = case()
    with packed_weights():
        conv(x, w, off, mask)
        with torch.no_grad():
            w.mul_(-0.5)
        out = conv(x, w, off, mask)
        halved = w.detach().clone()
        with torch.no_grad():
            w[0].zero_()  # through a view: the view shares the version counter
        out_view = conv(x, w, off, mask)
        info = packed_weights_info()
    assert info.hits == 0 and info.misses == 3 and info.entries == 1  # replaced, not piled up
    check(out, x, halved, off, mask)
    check(out_view, x, w, off, mask)
    assert out_view[:, 0].abs().max() == 0


def test_a_new_storage_or_a_new_tensor_is_never_taken_for_the_old_weight():
    x, w, off, mask = case()
    with packed_weights():
        conv(x, w, off, mask)
        other = torch.randn_like(w)
        w.data = other  # new storage behind the same tensor object
        check(conv(x, w, off, mask), x, other, off, mask)
        del w
        for seed in range(1, 4):  # fresh tensors, possibly at the freed addresses
            _, w2, _, _ = case(seed)
            check(conv(x, w2, off, mask), x, w2, off, mask)
            del w2
        assert packed_weights_info().hits == 0


def test_training_inside_the_block_uses_each_step_s_weight():
    x, w, off, mask = case()
    w.requires_grad_(True)
    opt = torch.optim.SGD([w], lr=0.1)
    with packed_weights():
        for _ in range(3):
            out = conv(x, w, off, mask)
            check(out, x, w.detach(), off, mask)
            opt.zero_grad()
            out.square().mean().backward()
            opt.step()
        assert packed_weights_info().hits == 0


def test_weights_made_in_inference_mode_are_never_cached():
    with torch.inference_mode():
        x, w, off, mask = case()
        with packed_weights():
            a = conv(x, w, off, mask)
            w.mul_(2)  # an inference tensor changes in place without a version counter
            b = conv(x, w, off, mask)
            assert packed_weights_info().entries == 0
    check(a, x, w / 2, off, mask)
    check(b, x, w, off, mask)


def test_groups_bfloat16_and_thread_counts_get_their_own_entries():
    x, w, off, mask = case(C=16, Cout=8, groups=2)
    threads = torch.get_num_threads()
    with packed_weights():
        check(conv(x, w, off, mask), x, w, off, mask)
        xb, wb = x.bfloat16(), w.bfloat16()
        ob = conv(xb, wb, off.bfloat16(), mask.bfloat16())
        torch.testing.assert_close(ob.double(), oracle(x, w, off, mask), rtol=0.05, atol=0.1)
        torch.set_num_threads(1)
        try:
            check(conv(x, w, off, mask), x, w, off, mask)
        finally:
            torch.set_num_threads(threads)
        assert packed_weights_info().entries >= 2


def test_the_cache_keeps_at_most_256_entries():
    x, _, off, mask = case()
    weights = [case(seed)[1] for seed in range(260)]
    with packed_weights():
        for w in weights:
            conv(x, w, off, mask)
        assert packed_weights_info().entries == 256
        check(conv(x, weights[0], off, mask), x, weights[0], off, mask)  # dropped, packed again
