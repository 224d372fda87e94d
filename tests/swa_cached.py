"""Attention over a KV cache then a block, the TTT suffix's pattern: shared by the CPU and GPU kernel tests."""
import torch

from ttt_e2e.kernels.swa import swa_reference


def cached_reference(q, k_cache, v_cache, k, v, window, q_pos0, k_pos0):
    keys, values = torch.cat((k_cache, k), 2), torch.cat((v_cache, v), 2)
    return swa_reference(q, keys, values, window, q_pos0, k_pos0), keys, values


def inner_then_outer(fn, q, k, v, k_cache, v_cache, cot, window, q_pos0):
    """TTT's pattern: the inner gradient (torch.func) w.r.t. the block's q, k, v, for which the cache is a
    constant, then the gradient w.r.t. everything, the cache included, of a functional of that inner gradient,
    of the output and of the returned concatenations (the next mini-batch's cache). cot: 7 cotangents (inner
    loss, gq, gk, gv, o, keys, values); None leaves that term out."""
    k_pos0 = q_pos0 - k_cache.shape[2]

    def inner(q_, k_, v_, kc_, vc_):
        o, _, _ = fn(q_, kc_, vc_, k_, v_, window, q_pos0, k_pos0)
        return (o * cot[0].to(o.dtype)).sum()

    def outer(q_, k_, v_, kc_, vc_):
        gq, gk, gv = torch.func.grad(inner, argnums=(0, 1, 2))(q_, k_, v_, kc_, vc_)
        o, keys, values = fn(q_, kc_, vc_, k_, v_, window, q_pos0, k_pos0)
        terms = zip((gq, gk, gv, o, keys, values), cot[1:])
        return sum((x * c.to(x.dtype)).sum() for x, c in terms if c is not None)

    return torch.func.grad(outer, argnums=(0, 1, 2, 3, 4))(q, k, v, k_cache, v_cache)
