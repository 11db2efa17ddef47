"""perceiver_np against an independent PyTorch (autograd) reference, float64.

``tests/torch_reference.py`` implements the model from docs/architecture.md as plain
torch functions over the same flat parameter dict. Here every parameter is randomised (biases and
LayerNorm parameters too), perceiver_np runs forward and its hand-written backward with a random
upstream gradient ``dy``, torch autograd differentiates ``sum(y * dy)``, and the forward, every
parameter gradient and ``dx`` must agree normwise to ``FLOAT64_RTOL``.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import pytest

import perceiver_np as pnp
from perceiver_np.tolerances import FLOAT64_RTOL

from .helpers import small_opts

TORCH_REASON = "the torch reference needs torch: pip install -e '.[compare]'"
torch = pytest.importorskip("torch", reason=TORCH_REASON)

from . import torch_reference as ref  # noqa: E402  (only once torch is known to be there)

#: The key-projection biases have an exact gradient of 0: adding a constant vector to every key
#: adds the same number q . b_k to every logit of a softmax row, which the softmax ignores (a
#: masked logit is filled, not shifted, so this holds with masks too). Both implementations
#: return rounding noise there, ~U64 times the gradients that cancel, so comparing the two
#: noises relative to their own size is meaningless. Their difference is compared against this
#: fraction of the largest gradient of the whole model instead: still ~1e-13 of it at the
#: FLOAT64_RTOL bar, while a real bias-gradient bug is O(1) of the gradients around it.
ZERO_GRADIENT_FLOOR = 1e-3

#: The options of the reference's ``forward``, taken from perceiver_np's config by name.
REF_OPTIONS = [
    name for name, p in inspect.signature(ref.forward).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("queries", "fused")
]

#: "Clearly different": a gap this many times the tolerance is no rounding difference.
DISTINCT = 1e3 * FLOAT64_RTOL

B, N = 3, 7


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One BLAS and one torch thread per test: the models here are small, and on the two shared
    cores the thread pools of OpenBLAS, torch and Numba oversubscribe them (the float64 seed
    model's forward and backward took ~4 s with two BLAS threads under load, 0.15 s with one).
    Per test, not per module: limits entered once before Numba and torch had started their pools
    left the module at ~11 s instead of ~5 s. Only the speed changes (and, through the summation
    order, the rounding)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with contextlib.ExitStack() as stack:
        with contextlib.suppress(ImportError):
            from threadpoolctl import threadpool_limits

            stack.enter_context(threadpool_limits(1, user_api="blas"))
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def zero_gradient(name: str) -> bool:
    return name.endswith("attn.k.bias")


def ref_options(cfg: pnp.PerceiverConfig, **changes: Any) -> dict[str, Any]:
    opts = {name: getattr(cfg, name) for name in REF_OPTIONS}
    opts.update(changes)
    return opts


def randomise(model: pnp.Perceiver, rng: np.random.Generator) -> None:
    """Every parameter random and O(1) in effect: weights N(0, 1/fan_in), so activations stay O(1)
    and the softmaxes are neither uniform nor saturated; LayerNorm gamma around 1, biases and
    beta non-zero (a zero bias would hide a wrong or missing bias term)."""
    for name, value in model.params.items():
        noise = rng.standard_normal(value.shape)
        if name.endswith(".weight"):
            value = noise / np.sqrt(value.shape[0])
        elif name.endswith(".gamma"):
            value = 1.0 + 0.5 * noise
        elif name.endswith((".bias", ".beta")):
            value = 0.5 * noise
        else:  # latents, decoder.queries
            value = noise
        model.params[name] = value


def make_mask(kind: str, b: int, n: int) -> np.ndarray | None:
    """None; or sample 0 all visible, samples 1 .. b-2 with scattered padding, the last with no
    visible key at all."""
    if kind == "none":
        return None
    assert kind == "masked"
    mask = np.ones((b, n), dtype=bool)
    for i in range(1, b - 1):
        mask[i, i % 2 :: 2] = False  # every other position, starting at 0 or 1
        mask[i, -1] = False
    mask[-1] = False
    return mask


def normwise(ours: np.ndarray, theirs: np.ndarray, scale: float | None = None) -> float:
    """max|ours - theirs| / max|theirs| (or / ``scale``)."""
    diff = float(np.max(np.abs(ours - theirs)))
    denom = float(np.max(np.abs(theirs))) if scale is None else scale
    if denom == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / denom


class Run(NamedTuple):
    model: pnp.Perceiver
    x: np.ndarray
    mask: np.ndarray | None
    y: np.ndarray  # perceiver_np
    grads: dict[str, np.ndarray]
    dx: np.ndarray
    ty: np.ndarray  # torch
    tgrads: dict[str, np.ndarray]
    tdx: np.ndarray


def run_both(opts: dict[str, Any], mask_kind: str, seed: int, b: int = B, n: int = N) -> Run:
    rng = np.random.default_rng(seed)
    model = pnp.build(**opts)
    randomise(model, rng)
    x = rng.standard_normal((b, n, model.config.input_dim))
    mask = make_mask(mask_kind, b, n)
    y, cache = model.forward(x, mask, training=False)
    dy = rng.standard_normal(y.shape)
    grads, dx = model.backward(dy, cache)

    tparams = {k: torch.from_numpy(v.copy()).requires_grad_(True) for k, v in model.params.items()}
    tx = torch.from_numpy(x.copy()).requires_grad_(True)
    tmask = None if mask is None else torch.from_numpy(mask)
    ty = ref.forward(tparams, tx, tmask, **ref_options(model.config))
    assert ty.dtype == torch.float64
    loss = (ty * torch.from_numpy(dy)).sum()
    *tg, tdx = torch.autograd.grad(loss, [*tparams.values(), tx])
    tgrads = {k: g.numpy() for k, g in zip(tparams, tg, strict=True)}
    return Run(model, x, mask, y, grads, dx, ty.detach().numpy(), tgrads, tdx.numpy())


def errors(run: Run) -> dict[str, float]:
    """Normwise relative error of the forward, every parameter gradient and dx."""
    gmax = max(float(np.max(np.abs(g))) for g in [*run.tgrads.values(), run.tdx])
    assert set(run.grads) == set(run.tgrads) == set(run.model.params)
    out = {"y": normwise(run.y, run.ty), "dx": normwise(run.dx, run.tdx)}
    for name, tg in run.tgrads.items():
        scale = ZERO_GRADIENT_FLOOR * gmax if zero_gradient(name) else None
        out[name] = normwise(run.grads[name], tg, scale)
    return out


def assert_agree(run: Run) -> dict[str, float]:
    err = errors(run)
    worst = sorted(err.items(), key=lambda kv: -kv[1])[:5]
    assert worst[0][1] <= FLOAT64_RTOL, f"worst relative errors: {worst}"
    # Not vacuous: every gradient is really there, except the key biases', which really is 0.
    gmax = max(float(np.max(np.abs(g))) for g in [*run.tgrads.values(), run.tdx])
    for name, tg in run.tgrads.items():
        size = float(np.max(np.abs(tg)))
        if zero_gradient(name):
            assert size <= FLOAT64_RTOL * gmax, (name, size, gmax)
            assert float(np.max(np.abs(run.grads[name]))) <= FLOAT64_RTOL * gmax, name
        else:  # far above the rounding noise, ~1e-16 of gmax, that the key biases show
            assert size > DISTINCT * gmax, (name, size, gmax)
    assert float(np.max(np.abs(run.tdx))) > DISTINCT * gmax
    return err


def assert_mask_respected(run: Run) -> None:
    """Padded positions and the sample with no visible key get exactly zero input gradient, in
    both implementations, and that sample's output does not depend on its input."""
    assert run.mask is not None
    for dx in (run.dx, run.tdx):
        assert np.all(dx[~run.mask] == 0.0)
        assert np.all(dx[-1] == 0.0)
        assert np.any(dx[run.mask] != 0.0)
    x2 = run.x.copy()
    x2[-1] = 3.0 * x2[-1] + 1.0
    assert np.array_equal(run.model.forward(x2, run.mask)[0][-1], run.y[-1])
    # and the padding matters: the same input unmasked gives another output
    assert normwise(run.model(run.x)[1], run.y[1]) > DISTINCT


# ---- the cases -------------------------------------------------------------------------------

#: (num_cross_layers, num_layers): the seed's single cross block, and three interleaved cross
#: blocks with groups (0,), (1,), (2, 3).
DEPTHS = [(1, 3), (3, 4)]

VARIANTS: dict[str, tuple[dict[str, Any], str]] = {
    "masked": ({}, "masked"),
    "no_mask": ({}, "none"),
    "plain_backend": ({"backend": "numpy"}, "masked"),
    "tanh_gelu_num_blocks_2": ({"gelu": "tanh", "num_blocks": 2}, "masked"),
    "channels_heads_widening": (
        {"qk_channels": 6, "v_channels": 4, "cross_heads": 1,
         "cross_widening_factor": 2, "self_widening_factor": 3},
        "masked",
    ),
    "raw_input_no_query_residual_no_final_norm": (
        {"input_projection": False, "use_query_residual": False, "final_norm": False,
         "cross_heads": 1},
        "masked",
    ),
    "classification": ({"decoder": "classification", "output_dim": 3}, "masked"),
    "query_decoder": (
        {"decoder": "query", "num_outputs": 4, "query_dim": 6, "output_dim": 2,
         "decoder_heads": 2, "decoder_qk_channels": 4, "decoder_v_channels": 6,
         "decoder_widening_factor": 2, "decoder_query_residual": True,
         "gelu": "tanh", "num_blocks": 2},
        "masked",
    ),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_reference_equals_the_plain_reference(variant: str) -> None:
    """The benchmark's baseline (``fused=True``: F.linear, F.layer_norm, F.gelu, SDPA) computes
    the reference's function, masks and fully masked samples included, forward and backward."""
    extra, mask_kind = VARIANTS[variant]
    rng = np.random.default_rng(len(variant))
    model = pnp.build(**small_opts(num_layers=4, num_cross_layers=3, **extra))
    randomise(model, rng)
    x = torch.from_numpy(rng.standard_normal((B, N, model.config.input_dim)))
    mask = make_mask(mask_kind, B, N)
    tmask = None if mask is None else torch.from_numpy(mask)
    outs = []
    for fused in (False, True):
        tparams = {k: torch.from_numpy(v.copy()).requires_grad_(True) for k, v in model.params.items()}
        y = ref.forward(tparams, x, tmask, fused=fused, **ref_options(model.config))
        dy = torch.from_numpy(np.random.default_rng(7).standard_normal(tuple(y.shape)))
        grads = torch.autograd.grad((y * dy).sum(), list(tparams.values()))
        outs.append((y.detach().numpy(), [g.numpy() for g in grads]))
    (y0, g0), (y1, g1) = outs
    assert normwise(y1, y0) <= FLOAT64_RTOL
    # Relative to the tensor, but never to less than ZERO_GRADIENT_FLOOR of the largest gradient:
    # the two differ only in summation order, and a tensor far below that (1e-7 of the largest,
    # in one of these models a nearly saturated softmax's query weights) is a cancellation whose
    # rounding is relative to the terms that cancelled.
    gmax = max(float(np.max(np.abs(g))) for g in g0)
    for name, a, b in zip(model.params, g1, g0, strict=True):
        scale = max(float(np.max(np.abs(b))), ZERO_GRADIENT_FLOOR * gmax)
        assert normwise(a, b, scale) <= FLOAT64_RTOL, name


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize(("num_cross_layers", "num_layers"), DEPTHS, ids=["cross1", "cross3"])
def test_small_model_matches_torch(variant: str, num_cross_layers: int, num_layers: int) -> None:
    extra, mask_kind = VARIANTS[variant]
    opts = small_opts(num_layers=num_layers, num_cross_layers=num_cross_layers, **extra)
    run = run_both(opts, mask_kind, seed=100 * num_cross_layers + len(variant))
    assert_agree(run)
    if mask_kind == "masked":
        assert_mask_respected(run)


def test_seed_model_full_size_matches_torch() -> None:
    """The seed configuration (input_dim 287 and Edifice's defaults) in float64, N = 16."""
    run = run_both(dict(input_dim=287, dtype="float64"), "masked", seed=5, b=3, n=16)
    assert run.model.param_count == 4_039_936
    assert run.y.shape == (3, 256)
    assert_agree(run)
    assert_mask_respected(run)


@pytest.mark.parametrize(
    ("base", "flipped"),
    [
        ({"gelu": "exact"}, {"gelu": "tanh"}),
        ({"use_query_residual": True}, {"use_query_residual": False}),
        ({"num_blocks": 2}, {"num_blocks": 1}),
        ({"decoder": "query", "num_outputs": 2, "output_dim": 2, "decoder_query_residual": False},
         {"decoder_query_residual": True}),
    ],
    ids=["gelu", "query_residual", "num_blocks", "decoder_query_residual"],
)
def test_agreement_is_not_vacuous(base: dict[str, Any], flipped: dict[str, Any]) -> None:
    """Each switch changes the output far beyond the tolerance: the reference run with the switch
    flipped (same parameters) disagrees with perceiver_np, the right setting agrees."""
    rng = np.random.default_rng(11)
    model = pnp.build(**small_opts(num_layers=4, num_cross_layers=3, **base))
    randomise(model, rng)
    x = rng.standard_normal((2, N, 5))
    y = model(x)
    tparams = {k: torch.from_numpy(v) for k, v in model.params.items()}
    with torch.no_grad():
        right = ref.forward(tparams, torch.from_numpy(x), **ref_options(model.config)).numpy()
        wrong = ref.forward(tparams, torch.from_numpy(x), **ref_options(model.config, **flipped))
    assert normwise(y, right) <= FLOAT64_RTOL
    assert normwise(y, wrong.numpy()) > DISTINCT


def test_self_groups_match_config() -> None:
    """The reference's own grouping (from docs/architecture.md) equals perceiver_np's schedule."""
    for num_layers in range(1, 10):
        for num_cross in range(1, num_layers + 1):
            for num_blocks in (1, 2):
                cfg = pnp.PerceiverConfig(
                    input_dim=3, num_layers=num_layers, num_cross_layers=num_cross, num_blocks=num_blocks
                )
                groups = ref.self_groups(num_layers, num_cross)
                assert [list(g) for g in cfg.self_groups] == groups
                expected = []
                for c, group in enumerate(groups):
                    expected += [("cross", c)] + [("self", j) for _ in range(num_blocks) for j in group]
                assert list(cfg.schedule) == expected
    assert ref.self_groups(4, 3) == [[0], [1], [2, 3]]  # the example of docs/architecture.md
    with pytest.raises(ValueError):
        ref.self_groups(2, 3)


def test_reference_layers_match_torch_builtins() -> None:
    """The reference's hand-written LayerNorm, GELUs and attention equal torch's own."""
    g = torch.Generator().manual_seed(0)
    f = torch.nn.functional
    x = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    p = {"n.gamma": torch.randn(8, generator=g, dtype=torch.float64),
         "n.beta": torch.randn(8, generator=g, dtype=torch.float64)}
    got = ref.layer_norm(x, p.__getitem__, "n")
    want = f.layer_norm(x, (8,), p["n.gamma"], p["n.beta"], eps=ref.LN_EPS)
    assert normwise(got.numpy(), want.numpy()) <= FLOAT64_RTOL
    for kind, approximate in (("exact", "none"), ("tanh", "tanh")):
        got = ref.gelu(3 * x, kind)
        assert normwise(got.numpy(), f.gelu(3 * x, approximate=approximate).numpy()) <= FLOAT64_RTOL

    # attention: 2 heads, qk 6, v 4, 3 queries over 5 keys, sample 1 with two padded keys
    heads, xq = 2, torch.randn(2, 3, 8, generator=g, dtype=torch.float64)
    shapes = {"q": (8, 6), "k": (8, 6), "v": (8, 4), "out": (4, 8)}
    w = {}
    for k, (i, o) in shapes.items():
        w[f"a.{k}.weight"] = torch.randn(i, o, generator=g, dtype=torch.float64)
        w[f"a.{k}.bias"] = torch.randn(o, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, [1, 3]] = False
    got = ref.mha(xq, x, w.__getitem__, "a", heads, mask)

    def heads_of(t: Any) -> Any:
        return t.reshape(2, t.shape[1], heads, -1).transpose(1, 2)

    o = f.scaled_dot_product_attention(
        heads_of(xq @ w["a.q.weight"] + w["a.q.bias"]),
        heads_of(x @ w["a.k.weight"] + w["a.k.bias"]),
        heads_of(x @ w["a.v.weight"] + w["a.v.bias"]),
        attn_mask=mask[:, None, None, :],
    )
    want = o.transpose(1, 2).reshape(2, 3, 4) @ w["a.out.weight"] + w["a.out.bias"]
    assert normwise(got.numpy(), want.numpy()) <= FLOAT64_RTOL

    # no visible key: all-zero weights, so the output is the output projection's bias
    none = torch.zeros(2, 5, dtype=torch.bool)
    got = ref.mha(xq, x, w.__getitem__, "a", heads, none)
    assert torch.equal(got, w["a.out.bias"].expand(2, 3, 8))


def test_reference_rejects_unused_parameters() -> None:
    """The reference pins the schema: a parameter it does not use is an error."""
    model = pnp.build(**small_opts())
    tparams = {k: torch.from_numpy(v) for k, v in model.params.items()}
    tparams["self.9.norm.gamma"] = tparams["self.0.norm.gamma"]
    with pytest.raises(KeyError, match=r"self\.9\.norm\.gamma"):
        ref.forward(tparams, torch.zeros(1, 2, 5, dtype=torch.float64), **ref_options(model.config))
