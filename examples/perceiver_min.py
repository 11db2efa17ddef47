"""A whole Perceiver in one file of plain NumPy: forward, backward, and a gradient check.

The seed architecture of perceiver_np (``pnp.build(input_dim=C)`` with its defaults), written
out to be read top to bottom; the shape letters are perceiver_np's (docs/architecture.md)::

    h = x @ W_in + b_in                 [B, N, C] -> [B, N, D]   the input projection
    z = latents                         [M, D] -> [B, M, D]      one array, broadcast over the batch
    z = CrossBlock(z, h, mask)          [B, M, D]                the latents read the inputs: O(N M)
    z = SelfBlock_j(z), j = 0 .. L-1    [B, M, D]                the latents read each other: O(M^2)
    y = mean_M(LayerNorm(z))            [B, M, D] -> [B, D]

    CrossBlock(z, h):  a = z + MHA(LN_q(z), LN_kv(h), mask);   y = a + FFN(LN_ffn(a))
    SelfBlock(z):      u = LN(z);  a = z + MHA(u, u);          y = a + FFN(LN_ffn(a))
    FFN(u) = GELU(u @ W_up + b_up) @ W_down + b_down           [.., D] -> [.., 4D] -> [.., D]

Every backward walks its forward in reverse; where one array feeds two places (a residual, the
shared LayerNorm output of a self block, the latents broadcast over the batch) its gradients
add. docs/backward.md derives each formula. Left out to stay short: dropout (the seed's 0.1
acts only in training), a sample whose every input is masked (perceiver_np gives it zero
attention; here it is refused) and every option besides the seed's. The parameters carry
perceiver_np's names (docs/params.md), so a perceiver_np model's ``params`` run here as they are.

``python examples/perceiver_min.py`` checks the gradients against finite differences, then the
output and every gradient against perceiver_np, and prints ``minimal: max rel err X`` last.
"""

from __future__ import annotations

import math
import sys

import numpy as np
from scipy.special import erf

LN_EPS = 1e-5  # LayerNorm's epsilon, added to the biased variance (perceiver_np.constants)
MASK_FILL = -1e30  # the score of a masked key: exp(MASK_FILL - max) is exactly 0
Params = dict[str, np.ndarray]


def init_params(c: int, d: int, m: int, num_layers: int, rng: np.random.Generator) -> Params:
    """Every parameter, by perceiver_np's name: weights [in, out] glorot-uniform, the latents
    [M, D] likewise, biases 0, LayerNorm gamma 1 and beta 0."""
    shapes = {"input_proj.weight": (c, d), "input_proj.bias": (d,), "latents": (m, d)}
    blocks = [("cross.0", ("q_norm", "kv_norm"))] + [(f"self.{j}", ("norm",)) for j in range(num_layers)]
    for block, norms in blocks:
        for norm in (*norms, "ffn_norm"):
            shapes |= {f"{block}.{norm}.gamma": (d,), f"{block}.{norm}.beta": (d,)}
        for name, n_in, n_out in [("attn.q", d, d), ("attn.k", d, d), ("attn.v", d, d),
                                  ("attn.out", d, d), ("ffn.up", d, 4 * d), ("ffn.down", 4 * d, d)]:
            shapes |= {f"{block}.{name}.weight": (n_in, n_out), f"{block}.{name}.bias": (n_out,)}
    shapes |= {"final_norm.gamma": (d,), "final_norm.beta": (d,)}
    params = {}
    for name, shape in shapes.items():
        if name.endswith(".weight") or name == "latents":
            limit = math.sqrt(6.0 / (shape[0] + shape[1]))
            params[name] = rng.uniform(-limit, limit, size=shape)
        else:
            params[name] = np.ones(shape) if name.endswith(".gamma") else np.zeros(shape)
    return params


# ---- the layers: each forward returns (y, cache); each backward takes (dy, cache), returns the
# ---- input's gradient and writes its parameters' gradients into g under their names ----------


def linear(x, p, name):
    return x @ p[f"{name}.weight"] + p[f"{name}.bias"], x  # [..., in] @ [in, out] -> [..., out]


def linear_back(dy, x, p, name, g):
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])  # -> [R, in], [R, out]
    g[f"{name}.weight"] = x2.T @ dy2  # [in, R] @ [R, out] -> [in, out]
    g[f"{name}.bias"] = dy2.sum(axis=0)  # [R, out] -> [out]
    return dy @ p[f"{name}.weight"].T  # [..., out] @ [out, in] -> [..., in]


def layernorm(x, p, name):
    xc = x - x.mean(axis=-1, keepdims=True)  # [..., F]
    rstd = 1.0 / np.sqrt((xc * xc).mean(axis=-1, keepdims=True) + LN_EPS)  # [..., F] -> [..., 1]
    xhat = xc * rstd
    return xhat * p[f"{name}.gamma"] + p[f"{name}.beta"], (xhat, rstd)


def layernorm_back(dy, cache, p, name, g):
    xhat, rstd = cache
    rows = tuple(range(dy.ndim - 1))
    g[f"{name}.gamma"] = (dy * xhat).sum(axis=rows)  # [..., F] -> [F]
    g[f"{name}.beta"] = dy.sum(axis=rows)  # [..., F] -> [F]
    dxhat = dy * p[f"{name}.gamma"]
    # xhat = (x - mean) * rstd, and both the mean and rstd depend on every x of the row
    return rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                   - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))


def gelu(x):
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))  # exact GELU: x Phi(x)


def gelu_back(dy, x):  # d/dx [x Phi(x)] = Phi(x) + x phi(x), phi the normal density
    return dy * (0.5 * (1.0 + erf(x / math.sqrt(2.0))) + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi))


def split_heads(t, heads):
    b, n, w = t.shape
    return t.reshape(b, n, heads, w // heads).transpose(0, 2, 1, 3)  # [B, L, H*dh] -> [B, H, L, dh]


def merge_heads(t):
    b, h, n, d = t.shape
    return t.transpose(0, 2, 1, 3).reshape(b, n, h * d)  # [B, H, L, dh] -> [B, L, H*dh]


def mha(xq, xkv, mask, p, name, heads):
    """Multi-head attention: queries from xq [B, M, D], keys and values from xkv [B, N, D]."""
    q, cq = linear(xq, p, f"{name}.q")  # [B, M, D] -> [B, M, D]
    k, ck = linear(xkv, p, f"{name}.k")  # [B, N, D] -> [B, N, D]
    v, cv = linear(xkv, p, f"{name}.v")  # [B, N, D] -> [B, N, D]
    q, k, v = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)  # -> [B, H, M|N, dh]
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = (q @ k.transpose(0, 1, 3, 2)) * scale  # [B, H, M, dh] @ [B, H, dh, N] -> [B, H, M, N]
    if mask is not None:
        s = np.where(mask[:, None, None, :], s, MASK_FILL)  # masked keys: weight exactly 0
    e = np.exp(s - s.max(axis=-1, keepdims=True))  # the max shift keeps exp() from overflowing
    prob = e / e.sum(axis=-1, keepdims=True)  # [B, H, M, N], each row sums to 1
    o = merge_heads(prob @ v)  # [B, H, M, N] @ [B, H, N, dh] -> [B, H, M, dh] -> [B, M, D]
    y, co = linear(o, p, f"{name}.out")  # [B, M, D] -> [B, M, D]
    return y, (cq, ck, cv, q, k, v, prob, scale, co)


def mha_back(dy, cache, p, name, g):
    cq, ck, cv, q, k, v, prob, scale, co = cache
    do = split_heads(linear_back(dy, co, p, f"{name}.out", g), q.shape[1])  # [B, M, D] -> [B, H, M, dh]
    dprob = do @ v.transpose(0, 1, 3, 2)  # [B, H, M, dh] @ [B, H, dh, N] -> [B, H, M, N]
    dv = prob.transpose(0, 1, 3, 2) @ do  # [B, H, N, M] @ [B, H, M, dh] -> [B, H, N, dh]
    # the softmax backward; a masked key has prob exactly 0, so its ds is exactly 0 too
    ds = prob * (dprob - (dprob * prob).sum(axis=-1, keepdims=True)) * scale  # [B, H, M, N]
    dq = ds @ k  # [B, H, M, N] @ [B, H, N, dh] -> [B, H, M, dh]
    dk = ds.transpose(0, 1, 3, 2) @ q  # [B, H, N, M] @ [B, H, M, dh] -> [B, H, N, dh]
    dxq = linear_back(merge_heads(dq), cq, p, f"{name}.q", g)  # [B, H, M, dh] -> [B, M, D]
    # xkv fed both the keys and the values: its two gradients add
    dxkv = (linear_back(merge_heads(dk), ck, p, f"{name}.k", g)  # [B, H, N, dh] -> [B, N, D]
            + linear_back(merge_heads(dv), cv, p, f"{name}.v", g))
    return dxq, dxkv


# ---- the blocks and the model -------------------------------------------------------------------


def ffn_sublayer(a, p, name):
    u, c_norm = layernorm(a, p, f"{name}.ffn_norm")
    pre, c_up = linear(u, p, f"{name}.ffn.up")  # [B, M, D] -> [B, M, 4D]
    f, c_down = linear(gelu(pre), p, f"{name}.ffn.down")  # [B, M, 4D] -> [B, M, D]
    return a + f, (c_norm, c_up, pre, c_down)


def ffn_sublayer_back(dy, cache, p, name, g):
    c_norm, c_up, pre, c_down = cache
    dpre = gelu_back(linear_back(dy, c_down, p, f"{name}.ffn.down", g), pre)  # [B, M, D] -> [B, M, 4D]
    du = linear_back(dpre, c_up, p, f"{name}.ffn.up", g)  # [B, M, 4D] -> [B, M, D]
    return dy + layernorm_back(du, c_norm, p, f"{name}.ffn_norm", g)  # a fed the residual and the LN


def cross_block(z, h, mask, p, name, heads):
    zq, c_q = layernorm(z, p, f"{name}.q_norm")  # [B, M, D]
    hk, c_kv = layernorm(h, p, f"{name}.kv_norm")  # [B, N, D]
    att, c_att = mha(zq, hk, mask, p, f"{name}.attn", heads)  # [B, M, D] x [B, N, D] -> [B, M, D]
    y, c_ffn = ffn_sublayer(z + att, p, name)
    return y, (c_q, c_kv, c_att, c_ffn)


def cross_block_back(dy, cache, p, name, g):
    c_q, c_kv, c_att, c_ffn = cache
    da = ffn_sublayer_back(dy, c_ffn, p, name, g)
    dzq, dhk = mha_back(da, c_att, p, f"{name}.attn", g)
    d_h = layernorm_back(dhk, c_kv, p, f"{name}.kv_norm", g)  # [B, N, D] (dh is the head width)
    return da + layernorm_back(dzq, c_q, p, f"{name}.q_norm", g), d_h  # z fed the residual and LN_q


def self_block(z, p, name, heads):
    u, c_norm = layernorm(z, p, f"{name}.norm")
    att, c_att = mha(u, u, None, p, f"{name}.attn", heads)  # [B, M, D] x [B, M, D] -> [B, M, D]
    y, c_ffn = ffn_sublayer(z + att, p, name)
    return y, (c_norm, c_att, c_ffn)


def self_block_back(dy, cache, p, name, g):
    c_norm, c_att, c_ffn = cache
    da = ffn_sublayer_back(dy, c_ffn, p, name, g)
    du_q, du_kv = mha_back(da, c_att, p, f"{name}.attn", g)
    return da + layernorm_back(du_q + du_kv, c_norm, p, f"{name}.norm", g)  # u fed q and k, v


def forward(p, x, mask, heads):
    """x [B, N, C], mask [B, N] bool (True = keep) or None -> (y [B, D], cache)."""
    if mask is not None and not mask.any(axis=1).all():
        raise ValueError("mask: every sample must keep at least one input (shape [B, N], True = keep)")
    h, c_in = linear(x, p, "input_proj")  # [B, N, C] -> [B, N, D]
    z = np.broadcast_to(p["latents"], (x.shape[0], *p["latents"].shape))  # [M, D] -> [B, M, D]
    z, c_cross = cross_block(z, h, mask, p, "cross.0", heads)
    c_self = []
    while f"self.{len(c_self)}.norm.gamma" in p:  # the self blocks self.0, self.1, ... of p
        z, c = self_block(z, p, f"self.{len(c_self)}", heads)
        c_self.append(c)
    z, c_final = layernorm(z, p, "final_norm")
    return z.mean(axis=1), (c_in, c_cross, c_self, c_final, z.shape)  # [B, M, D] -> [B, D]


def backward(dy, cache, p):
    """dy [B, D] -> (grads keyed like p, dx [B, N, C])."""
    c_in, c_cross, c_self, c_final, (b, m, d) = cache
    g: Params = {}
    dz = np.broadcast_to(dy[:, None, :] / m, (b, m, d))  # the mean pool: [B, D] -> [B, M, D]
    dz = layernorm_back(dz, c_final, p, "final_norm", g)
    for j in reversed(range(len(c_self))):
        dz = self_block_back(dz, c_self[j], p, f"self.{j}", g)
    dz, d_h = cross_block_back(dz, c_cross, p, "cross.0", g)
    g["latents"] = dz.sum(axis=0)  # one array was broadcast to B samples: [B, M, D] -> [M, D]
    return g, linear_back(d_h, c_in, p, "input_proj", g)  # [B, N, D] -> [B, N, C]


# ---- the checks ---------------------------------------------------------------------------------


def rel_err(a, b, scale, floor):
    """max |a - b| / max |b|, tensor by tensor; a gradient that is 0 in exact arithmetic (the key
    bias: it adds the same q.b_k to a whole row of scores, which the softmax ignores) is rounding
    noise on both sides and is measured against ``floor * scale``, scale the largest gradient."""
    return float(np.abs(a - b).max() / max(np.abs(b).max(), floor * scale))


def finite_differences(p, x, mask, heads, dy, name, index, step=2e-2, levels=3):
    """d sum(dy * y) / d tensor[index]: central differences at step, step/2, step/4,
    extrapolated to step 0 (Richardson: each pass removes the next even power of the step)."""
    t = x if name == "x" else p[name]
    orig = t[index]

    def central(s):
        t[index] = orig + s
        plus = np.sum(dy * forward(p, x, mask, heads)[0])
        t[index] = orig - s
        minus = np.sum(dy * forward(p, x, mask, heads)[0])
        t[index] = orig
        return (plus - minus) / (2 * s)  # = f' + c2 s^2 + c4 s^4 + ...

    row = [central(step / 2**i) for i in range(levels)]
    for j in range(1, levels):
        row = [(4**j * row[i + 1] - row[i]) / (4**j - 1) for i in range(len(row) - 1)]
    return row[0]


def report(check, errs):
    worst = max(errs, key=errs.__getitem__)
    print(f"{check}: {len(errs)} tensors, max rel err {errs[worst]:.1e} ({worst})")


def main() -> float:
    import perceiver_np as pnp  # for the checks only: the model above is NumPy and SciPy's erf

    floor = pnp.tolerances.GRADCHECK_FLOOR
    rng = np.random.default_rng(0)
    b, n, c, d, m, num_layers, heads = 2, 7, 5, 8, 4, 4, 2  # the seed's layout, small widths
    x = rng.standard_normal((b, n, c))  # [B, N, C]
    mask = np.ones((b, n), dtype=bool)  # [B, N]
    mask[1, 4:] = False  # sample 1: 4 inputs, then 3 of padding
    dy = rng.standard_normal((b, d))  # a random upstream gradient: all ones would hide bugs

    # 1. the gradients against finite differences, at 6 random entries of every tensor
    p = init_params(c, d, m, num_layers, rng)
    grads, dx = backward(dy, forward(p, x, mask, heads)[1], p)
    analytic = {"x": dx, **grads}
    scale = max(float(np.abs(a).max()) for a in analytic.values())
    fd = {}
    for name, a in analytic.items():
        idx = [np.unravel_index(i, a.shape) for i in rng.choice(a.size, min(a.size, 6), replace=False)]
        num = np.array([finite_differences(p, x, mask, heads, dy, name, i) for i in idx])
        fd[name] = rel_err(np.array([a[i] for i in idx]), num, scale, floor)
    report("finite differences", fd)

    # 2. the output and every gradient against perceiver_np, on a perceiver_np model's parameters
    model = pnp.build(input_dim=c, latent_dim=d, num_latents=m, num_layers=num_layers,
                      num_heads=heads, dtype="float64", backend="numpy")
    if model.params.keys() != p.keys():
        raise SystemExit("init_params must name exactly the parameters of perceiver_np's schema")
    y_ref, cache = model.forward(x, mask)
    grads_ref, dx_ref = model.backward(dy, cache)
    y, cache = forward(model.params, x, mask, heads)
    grads, dx = backward(dy, cache, model.params)
    ref = {"x": dx_ref, **grads_ref}
    scale = max(float(np.abs(a).max()) for a in ref.values())
    same = {"y": rel_err(y, y_ref, 1.0, 0.0)}
    same |= {name: rel_err(g, ref[name], scale, floor) for name, g in {"x": dx, **grads}.items()}
    report("perceiver_np", same)

    err = max(*fd.values(), *same.values())
    print(f"minimal: max rel err {err:.1e}")
    return err


if __name__ == "__main__":
    sys.exit(0 if main() <= 1e-8 else 1)
