"""lucidrains' perceiver-pytorch (the real package from PyPI) against perceiver_np: from_lucidrains
copies a live Perceiver / PerceiverIO into a model that gives its outputs in float64 to
FLOAT64_RTOL and every gradient to INTEROP_GRAD_RTOL, with and without a mask (a fully masked
sample included), at several configurations; record_lucidrains records it under the golden
names so that compare finds zero breaks, and names a perturbed weight first at its own layer."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import perceiver_np as pnp
from perceiver_np import lucidrains, verify
from perceiver_np.tolerances import FLOAT64_RTOL, INTEROP_GRAD_RTOL

from .helpers import assert_same_gradients

REASON = "the lucidrains cross-checks need perceiver-pytorch and torch: pip install -e '.[compare]'"
torch = pytest.importorskip("torch", reason=REASON)
pp = pytest.importorskip("perceiver_pytorch", reason=REASON)

#: (class, constructor arguments, input grid). Small, but every switch of their structure:
#: Fourier-encoded 2-D and 1-D grids, several self blocks per cross block, tied layers (depth 3:
#: the second block is reused), no classifier head, several heads on each side; PerceiverIO with
#: its output Linear and decoder feed-forward, and tied without either.
CASES: dict[str, tuple[str, dict[str, Any], tuple[int, ...]]] = {
    "perceiver-2d": ("Perceiver", dict(num_freq_bands=3, depth=2, max_freq=6.0, input_channels=3,
                                       input_axis=2, num_latents=5, latent_dim=16, cross_heads=1,
                                       cross_dim_head=8, latent_heads=2, latent_dim_head=4,
                                       num_classes=7, self_per_cross_attn=2), (4, 3)),
    "perceiver-tied": ("Perceiver", dict(num_freq_bands=2, depth=3, max_freq=4.0, input_channels=2,
                                         input_axis=1, num_latents=4, latent_dim=8, cross_heads=2,
                                         cross_dim_head=4, latent_heads=2, latent_dim_head=3,
                                         weight_tie_layers=True, final_classifier_head=False), (6,)),
    "perceiver-raw": ("Perceiver", dict(num_freq_bands=2, depth=1, max_freq=4.0, input_channels=5,
                                        input_axis=1, num_latents=3, latent_dim=8, cross_dim_head=6,
                                        latent_heads=1, latent_dim_head=8, num_classes=4,
                                        fourier_encode_data=False), (6,)),
    "io": ("PerceiverIO", dict(depth=2, dim=5, queries_dim=6, logits_dim=3, num_latents=4, latent_dim=8,
                               cross_heads=2, cross_dim_head=3, latent_heads=2, latent_dim_head=4,
                               decoder_ff=True), (6,)),
    "io-tied": ("PerceiverIO", dict(depth=3, dim=4, queries_dim=5, num_latents=3, latent_dim=8,
                                    cross_dim_head=4, latent_heads=2, latent_dim_head=2,
                                    weight_tie_layers=True), (5,)),
}


def their_model(case: str) -> tuple[Any, tuple[int, ...]]:
    cls, kwargs, grid = CASES[case]
    torch.manual_seed(0)
    module = getattr(pp, cls)(**kwargs).double()
    with torch.no_grad():  # move LayerNorm gammas/betas and biases off their initial values
        for p in module.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return module, grid


def inputs(case: str, model: pnp.Perceiver, grid: tuple[int, ...], masked: bool
           ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    rng = np.random.default_rng(1)
    n = int(np.prod(grid))
    x = rng.standard_normal((3, n, model.config.input_dim))
    mask = None
    if masked:  # partial, fully masked, whole
        mask = np.stack([np.arange(n) % 3 != 1, np.zeros(n, bool), np.ones(n, bool)])
    queries = None
    if model.config.decoder == "query":
        queries = rng.standard_normal((3, 2, model.config.decoder_query_channels))
    return x, mask, queries


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("case", list(CASES))
def test_outputs_and_gradients_equal_perceiver_pytorch(case, masked):
    module, grid = their_model(case)
    model = lucidrains.from_lucidrains(module, index_dims=grid)
    assert model.param_count == sum(p.numel() for p in module.parameters())
    x, mask, queries = inputs(case, model, grid, masked)
    module.eval()
    xt = torch.from_numpy(x).requires_grad_()
    data = xt.reshape(x.shape[0], *grid, x.shape[-1]) if model.config.input_fourier != "none" else xt
    kwargs: dict[str, Any] = {}
    if mask is not None:
        kwargs["mask"] = torch.from_numpy(mask)
    if queries is not None:
        kwargs["queries"] = torch.from_numpy(queries)
    y_theirs = module(data, **kwargs)
    y, cache = model.forward(x, mask, queries=queries)
    assert rel(y, y_theirs.detach().numpy()) <= FLOAT64_RTOL
    assert rel(model(x, mask, queries=queries), y_theirs.detach().numpy()) <= FLOAT64_RTOL  # the engine
    dy = np.random.default_rng(2).standard_normal(y.shape)
    grads, dx = model.backward(dy, cache)
    names = lucidrains.lucidrains_name_map(model.config)
    by_name = dict(module.named_parameters())
    wrt = list(dict.fromkeys(t if isinstance(t, str) else t[0] for t in names.values()))
    theirs_g = torch.autograd.grad((y_theirs * torch.from_numpy(dy)).sum(), [by_name[n] for n in wrt] + [xt])
    g_of = dict(zip(wrt, (g.numpy() for g in theirs_g), strict=False))
    want = {}
    for ours, t in names.items():
        g = g_of[t] if isinstance(t, str) else g_of[t[0]][t[1]:t[2]]
        want[ours] = g.T if ours.endswith(".weight") and g.ndim == 2 else g
    want["x"] = theirs_g[-1].numpy()
    assert_same_gradients({**grads, "x": dx}, want, INTEROP_GRAD_RTOL)


@pytest.mark.parametrize("case", ["perceiver-2d", "perceiver-tied", "io-tied"])
def test_recorded_run_compares_with_zero_breaks(tmp_path, case):
    module, grid = their_model(case)
    model = lucidrains.from_lucidrains(module, index_dims=grid)
    x, mask, queries = inputs(case, model, grid, masked=True)
    golden = verify.write_golden(tmp_path / "golden.npz", model, x, mask, queries=queries, seed=1)
    with np.load(golden) as g:
        dy = g["loss/dy"]
    theirs = lucidrains.record_lucidrains(module, x, dy, mask=mask, queries=queries, index_dims=grid)
    np.savez(tmp_path / "theirs.npz", **theirs)
    report = verify.compare(golden, tmp_path / "theirs.npz", allow_missing=True)
    assert report.ok, str(report)
    assert report.compared["gradients"] == len(model.params) + 1  # every parameter and x
    recorded = [k for k in theirs if k.startswith("act/")]
    assert len(recorded) >= 8 * len(model.config.schedule)  # most activations are recorded, not skipped
    assert report.extra == ()


@pytest.mark.parametrize(("case", "weight", "layer"), [
    ("perceiver-2d", "layers.0.self_attns.1.1.fn.net.0.weight", "act/self.1.ffn.up.out"),
    ("perceiver-2d", "layers.1.cross_attn.fn.to_q.weight", "act/cross.1.attn.q.out"),
    ("perceiver-tied", "layers.1.cross_attn.fn.to_out.weight", "act/cross.1.use0.attn.out"),
    ("io", "decoder_cross_attn.norm.weight", "act/decoder.q_norm.out"),
])
def test_a_perturbed_weight_is_named_first(tmp_path, case, weight, layer):
    module, grid = their_model(case)
    model = lucidrains.from_lucidrains(module, index_dims=grid)
    x, mask, queries = inputs(case, model, grid, masked=False)
    golden = verify.write_golden(tmp_path / "golden.npz", model, x, mask, queries=queries, seed=1)
    with torch.no_grad():
        p = module.get_parameter(weight)
        p.view(-1)[1] += 1e-3 * p.abs().max()
    with np.load(golden) as g:
        dy = g["loss/dy"]
    np.savez(tmp_path / "theirs.npz", **lucidrains.record_lucidrains(
        module, x, dy, mask=mask, queries=queries, index_dims=grid))
    report = verify.compare(golden, tmp_path / "theirs.npz", allow_missing=True)
    assert report.first_break is not None and report.first_break.name == layer, str(report)


def test_fourier_features_are_theirs_channel_for_channel():
    from perceiver_pytorch.perceiver_pytorch import fourier_encode

    grid, bands, max_freq = (4, 3), 5, 7.0
    axes = [torch.linspace(-1.0, 1.0, steps=n, dtype=torch.float64) for n in grid]
    pos = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    theirs = fourier_encode(pos, max_freq, bands).reshape(*grid, -1).reshape(-1, len(grid) * (2 * bands + 1))
    ours = pnp.position.lucidrains_fourier_encoding(grid, bands, max_freq, dtype="float64")
    assert np.abs(ours - theirs.numpy()).max() <= 4 * np.finfo(np.float64).eps * np.pi * max_freq / 2


def test_presets_check_their_arguments():
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['num_clases'\]"):
        pnp.presets.from_lucidrains(dict(num_freq_bands=2, depth=1, max_freq=4.0, num_clases=3), (4, 4))
    with pytest.raises(ValueError, match=r"missing required argument\(s\) \['max_freq'\]"):
        pnp.presets.from_lucidrains(dict(num_freq_bands=2, depth=1), (4, 4))
    with pytest.raises(ValueError, match="index_dims: fourier_encode_data needs the input grid, 2 axes"):
        pnp.presets.from_lucidrains(dict(num_freq_bands=2, depth=1, max_freq=4.0), (16,))
    with pytest.raises(ValueError, match=r"inverted_cross_attn.*not supported"):
        pnp.presets.from_lucidrains(dict(num_freq_bands=2, depth=1, max_freq=4.0, inverted_cross_attn=True),
                                    (4, 4))
    with pytest.raises(ValueError, match=r"attn_residual.*not supported"):
        pnp.presets.from_lucidrains_io(dict(depth=1, dim=3, queries_dim=3, attn_residual=True))


def test_from_lucidrains_refuses_what_it_cannot_compute():
    module = pp.Perceiver(num_freq_bands=2, depth=1, max_freq=4.0, input_channels=3, num_latents=3,
                          latent_dim=8, num_classes=2, attn_residual=True, attn_residual_rank=2)
    with pytest.raises(ValueError, match="attn_residual"):
        lucidrains.from_lucidrains(module, index_dims=(2, 2))
    with pytest.raises(TypeError, match="expected a perceiver_pytorch Perceiver or PerceiverIO"):
        lucidrains.from_lucidrains(torch.nn.Linear(2, 2))
