"""verify.record_haiku, verify.record_flax and verify.deepmind_record_names: DeepMind's own
Perceiver (Haiku, vendored in tests/third_party/deepmind_perceiver) and a small Flax linen port,
each loaded with a perceiver_np model's weights and run in float64, recorded under the golden
names, agree with that model's golden file tensor by tensor (verify.compare's float64 bar,
GOLDEN_FLOAT64_RTOL); a weight perturbed by 1e-3 is named at its own layer's output. JAX's
64-bit mode is on only inside each test (jax.enable_x64), never process-wide."""

from __future__ import annotations

import importlib
import re
from typing import Any

import numpy as np
import pytest

import perceiver_np as pnp
from perceiver_np import interop, presets, verify

REASON = "record_haiku / record_flax need jax, dm-haiku and flax: pip install -e '.[compare]'"
jax = pytest.importorskip("jax", reason=REASON)
hk = pytest.importorskip("haiku", reason=REASON)
nn = pytest.importorskip("flax.linen", reason=REASON)
traverse_util = pytest.importorskip("flax.traverse_util", reason=REASON)
jnp = jax.numpy
deepmind = importlib.import_module("tests.third_party.deepmind_perceiver.perceiver")


@pytest.fixture(autouse=True)
def x64() -> Any:
    with jax.enable_x64(True):
        yield


# ---------------------------------------------------------------------------------------------
# DeepMind's Perceiver
# ---------------------------------------------------------------------------------------------

#: (PerceiverEncoder kwargs, decoder kwargs, input channels C): a classification decoder after a
#: self block shared over 2 repeats (self.0.use0/use1); a basic decoder with 2 queries after two
#: self blocks, 2 cross heads, widening 2, the q-shaped cross-attention and a query residual.
DEEPMIND = {
    "classification": (
        dict(num_z_channels=8, z_index_dim=4, num_blocks=2, num_self_attends_per_block=1,
             num_self_attend_heads=2),
        dict(num_classes=3, num_z_channels=8, trainable_position_encoding_kwargs=dict(num_channels=6)),
        5),
    "basic": (
        dict(num_z_channels=8, z_index_dim=4, num_blocks=1, num_self_attends_per_block=2,
             num_self_attend_heads=4, num_cross_attend_heads=2, cross_attend_widening_factor=2,
             self_attend_widening_factor=2, cross_attention_shape_for_attn="q"),
        dict(output_num_channels=3, output_index_dims=(2,), num_z_channels=8, num_heads=2,
             use_query_residual=True, trainable_position_encoding_kwargs=dict(num_channels=8)),
        6),
}


def randomized(model: pnp.Perceiver, seed: int) -> pnp.Perceiver:
    """``model`` with every parameter moved off its initial value (biases and LayerNorms too, so
    that a misplaced one shows)."""
    rng = np.random.default_rng(seed)
    return pnp.Perceiver(model.config, {k: v + 0.1 * rng.standard_normal(v.shape)
                                        for k, v in model.params.items()})


def golden_run(tmp_path: Any, case: str, masked: bool) -> tuple[Any, pnp.Perceiver, dict[str, np.ndarray]]:
    """(the golden file, the perceiver_np model of DeepMind's arguments ``DEEPMIND[case]``, the
    file's arrays): a [2, 7, C] input, with ``masked`` the second sample keeping 4 positions."""
    encoder_kwargs, decoder_kwargs, c = DEEPMIND[case]
    opts = presets.from_deepmind(encoder_kwargs, decoder_kwargs, input_dim=c)
    model = randomized(pnp.build(**opts, dtype="float64", seed=3), seed=4)
    x = np.random.default_rng(0).standard_normal((2, 7, c))
    mask = np.arange(7) < np.array([[7], [4]]) if masked else None
    golden = verify.write_golden(tmp_path / "golden.npz", model, x, mask, seed=1)
    with np.load(golden) as g:
        arrays = {k: g[k] for k in g.files}
    return golden, model, arrays


def deepmind_transformed(encoder_kwargs: dict[str, Any], decoder_kwargs: dict[str, Any]) -> Any:
    """DeepMind's model as its colabs build it: ``perceiver.Perceiver`` of an encoder and a decoder."""
    def forward(inputs: Any, input_mask: Any = None) -> Any:
        decoder = (deepmind.ClassificationDecoder(**decoder_kwargs) if "num_classes" in decoder_kwargs
                   else deepmind.BasicDecoder(**decoder_kwargs))
        model = deepmind.Perceiver(encoder=deepmind.PerceiverEncoder(**encoder_kwargs), decoder=decoder)
        return model(inputs, is_training=False, input_mask=input_mask)
    return hk.transform(forward)


def deepmind_inputs(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    inputs = {"inputs": arrays["input/x"]}
    if "input/mask" in arrays:
        inputs["input_mask"] = arrays["input/mask"]  # DeepMind's input_mask: True/1 = keep, as ours
    return inputs


def record_deepmind(golden: Any, arrays: dict[str, np.ndarray], tree: Any, case: str
                    ) -> dict[str, np.ndarray]:
    encoder_kwargs, decoder_kwargs, _ = DEEPMIND[case]
    config, _, _ = verify.read_golden(golden)
    acts, names = verify.deepmind_record_names(config)
    return verify.record_haiku(deepmind_transformed(encoder_kwargs, decoder_kwargs), tree,
                               deepmind_inputs(arrays), arrays["loss/dy"], activations=acts,
                               param_names=names)


@pytest.mark.parametrize(("case", "masked"), [("classification", True), ("classification", False),
                                              ("basic", True)])
def test_deepmind_matches_its_golden_file(tmp_path, case, masked):
    golden, model, arrays = golden_run(tmp_path, case, masked)
    rec = record_deepmind(golden, arrays, interop.to_haiku(model), case)
    np.savez(tmp_path / "theirs.npz", **rec)
    report = verify.compare(golden, tmp_path / "theirs.npz", allow_missing=True)
    assert report.ok, str(report)
    _, _, meta = verify.read_golden(golden)
    # every activation but the attention scores and probabilities (DeepMind's attend is a
    # function, no module), every parameter's gradient and the input's
    unexposed = [n for n in meta["activations"] if n.endswith((".attn.scores", ".attn.probs"))]
    assert sorted(report.missing) == sorted(f"act/{n}" for n in unexposed)
    assert report.compared == {"activations": len(meta["activations"]) - len(unexposed),
                               "gradients": len(meta["gradients"]), "loss": 1,
                               "missing": len(unexposed)}
    assert report.extra == ()
    acts, names = verify.deepmind_record_names(model.config)
    assert set(names) == {n for n in meta["gradients"] if n != "x"}
    assert list(rec) == ([f"act/{n}" for n in acts] + ["act/output", "loss", "loss/dy"]
                         + [f"grad/{n}" for n in names] + ["grad/x"])


@pytest.mark.parametrize(("module", "param", "index", "layer"), [
    ("perceiver_encoder/~/self_attention/mlp/linear", "w", (0, 3), "act/self.0.use0.ffn.up.out"),
    ("classification_decoder/~/basic_decoder/cross_attention/layer_norm_2", "offset", (4,),
     "act/decoder.ffn_norm.out"),
])
def test_a_perturbed_deepmind_weight_is_named_first(tmp_path, module, param, index, layer):
    golden, model, arrays = golden_run(tmp_path, "classification", True)
    tree = interop.to_haiku(model)
    tree[module][param][index] += 1e-3
    np.savez(tmp_path / "theirs.npz", **record_deepmind(golden, arrays, tree, "classification"))
    report = verify.compare(golden, tmp_path / "theirs.npz", allow_missing=True)
    assert not report.ok
    assert report.first_break is not None and report.first_break.name == layer


def test_deepmind_record_names_refuse_what_deepmind_cannot_hold():
    config = pnp.build(**presets.deepmind(input_dim=5, latent_dim=8, num_latents=4, num_layers=2,
                                          num_cross_layers=2, num_blocks=1)).config
    with pytest.raises(interop.InteropError, match="num_cross_layers=2"):
        verify.deepmind_record_names(config)


# ---------------------------------------------------------------------------------------------
# A Flax linen port: what a user might write
# ---------------------------------------------------------------------------------------------

LN_EPS = 1e-5  # DeepMind's, HF's and perceiver_np's LayerNorm epsilon


class FlaxAttention(nn.Module):
    """Multi-head attention, q/k/v widths those of the key/value input: [B, M, Cq], [B, N, Ckv]
    (and a keep-mask [B, N]) -> [B, M, out]. Sows the scaled logits and the probabilities."""
    heads: int
    out: int

    @nn.compact
    def __call__(self, xq: Any, xkv: Any, mask: Any = None) -> Any:
        b, m, n, width = xq.shape[0], xq.shape[1], xkv.shape[1], xkv.shape[-1]
        q = nn.Dense(width, name="q")(xq).reshape(b, m, self.heads, -1)
        k = nn.Dense(width, name="k")(xkv).reshape(b, n, self.heads, -1)
        v = nn.Dense(width, name="v")(xkv).reshape(b, n, self.heads, -1)
        scores = jnp.einsum("bmhd,bnhd->bhmn", q, k) / np.sqrt(width // self.heads)
        if mask is not None:
            scores = jnp.where(mask[:, None, None, :], scores, -1e30)
        probs = jax.nn.softmax(scores, axis=-1)
        self.sow("intermediates", "scores", scores)
        self.sow("intermediates", "probs", probs)
        heads = jnp.einsum("bhmn,bnhd->bmhd", probs, v).reshape(b, m, width)
        return nn.Dense(self.out, name="out")(heads)


class FlaxMLP(nn.Module):
    @nn.compact
    def __call__(self, x: Any) -> Any:
        h = nn.gelu(nn.Dense(x.shape[-1], name="up")(x), approximate=True)  # DeepMind's tanh GELU
        return nn.Dense(x.shape[-1], name="down")(h)


class FlaxBlock(nn.Module):
    """Pre-LayerNorm attention and MLP, residuals around both (the query residual optional);
    a cross block when given ``x``, a self block otherwise."""
    heads: int
    residual: bool = True

    @nn.compact
    def __call__(self, z: Any, x: Any = None, mask: Any = None) -> Any:
        zn = nn.LayerNorm(epsilon=LN_EPS, name="norm" if x is None else "q_norm")(z)
        kv = zn if x is None else nn.LayerNorm(epsilon=LN_EPS, name="kv_norm")(x)
        a = FlaxAttention(self.heads, z.shape[-1], name="attn")(zn, kv, mask)
        h = z + a if self.residual else a
        return h + FlaxMLP(name="ffn")(nn.LayerNorm(epsilon=LN_EPS, name="ffn_norm")(h))


class FlaxPerceiver(nn.Module):
    """DeepMind's Perceiver with a classification decoder, in Flax: [B, N, C] -> [B, classes]."""
    num_latents: int
    latent_dim: int
    cross_heads: int
    self_heads: int
    num_layers: int
    num_blocks: int
    query_dim: int
    decoder_heads: int
    num_classes: int

    @nn.compact
    def __call__(self, x: Any, mask: Any = None) -> Any:
        latents = self.param("latents", nn.initializers.normal(0.02), (self.num_latents, self.latent_dim))
        z = jnp.broadcast_to(latents, (x.shape[0], *latents.shape))
        z = FlaxBlock(self.cross_heads, name="cross0")(z, x, mask)
        blocks = [FlaxBlock(self.self_heads, name=f"self{j}") for j in range(self.num_layers)]
        for _ in range(self.num_blocks):  # the self blocks are shared across the repeats
            for block in blocks:
                z = block(z)
        queries = self.param("queries", nn.initializers.normal(0.02), (1, self.query_dim))
        queries = jnp.broadcast_to(queries, (x.shape[0], 1, self.query_dim))
        u = FlaxBlock(self.decoder_heads, residual=False, name="decoder")(queries, z)
        return nn.Dense(self.num_classes, name="output")(u)[:, 0]


def flax_path(ours: str) -> str:
    """Our parameter name -> its path in the port's params: ``cross.0.attn.q.weight`` ->
    ``cross0/attn/q/kernel``, ``self.1.ffn_norm.gamma`` -> ``self1/ffn_norm/scale``."""
    special = {"latents": "latents", "decoder.queries": "queries", "decoder.output.weight": "output/kernel",
               "decoder.output.bias": "output/bias"}
    if ours in special:
        return special[ours]
    *path, leaf = re.sub(r"^(cross|self)\.(\d+)\.", r"\1\2.", ours).split(".")
    return "/".join([*path, {"gamma": "scale", "beta": "bias", "weight": "kernel", "bias": "bias"}[leaf]])


#: Our block-local activation names -> the port's tap under the block.
FLAX_TAPS = {
    "q_norm.out": "q_norm", "kv_norm.out": "kv_norm", "norm.out": "norm",
    "attn.q.out": "attn/q", "attn.k.out": "attn/k", "attn.v.out": "attn/v",
    "attn.scores": "attn:scores", "attn.probs": "attn:probs",  # sown
    "attn.heads.out": ("attn/out", "input"), "attn.out": "attn/out",
    "attn_residual.out": ("ffn_norm", "input"), "ffn_norm.out": "ffn_norm",
    "ffn.up.out": "ffn/up", "ffn.act.out": ("ffn/down", "input"), "ffn.down.out": "ffn/down",
    "out": "",
}


def flax_taps(golden_activations: list[str]) -> dict[str, Any]:
    """The port's ``activations`` for record_flax: every golden activation, the sown attention
    scores and probabilities included (the u-th call of a shared self block for use u)."""
    acts: dict[str, Any] = {"input": ("cross0/kv_norm", "input")}
    for name in golden_activations:
        m = re.fullmatch(r"(cross\.0|self\.(\d+)(?:\.use(\d+))?|decoder)\.(.+)", name)
        if m is None:
            continue  # input, output
        block = {"cross.0": "cross0", "decoder": "decoder"}.get(m[1], f"self{m[2]}")
        tap = FLAX_TAPS[m[4]]
        where, sub = ("output", tap) if isinstance(tap, str) else (tap[1], tap[0])
        path, _, key = sub.partition(":")
        module = f"{block}/{path}" if path else block
        acts[name] = (f"{module}:{key}" if key else module, where, int(m[3] or 0))
    return acts


def flax_port(model: pnp.Perceiver) -> tuple[Any, dict[str, Any], dict[str, str]]:
    """(the port, its variables holding ``model``'s weights, our name -> the port's path)."""
    c = model.config
    port = FlaxPerceiver(num_latents=c.num_latents, latent_dim=c.latent_dim, cross_heads=c.cross_num_heads,
                         self_heads=c.num_heads, num_layers=c.num_layers, num_blocks=c.num_blocks,
                         query_dim=c.query_dim, decoder_heads=c.decoder_heads, num_classes=c.output_dim)
    names = {ours: flax_path(ours) for ours in model.params}
    params = traverse_util.unflatten_dict({tuple(path.split("/")): np.array(model.params[ours])
                                           for ours, path in names.items()})
    fresh = jax.eval_shape(port.init, jax.random.PRNGKey(0), jnp.zeros((1, 2, c.input_dim)))["params"]
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, fresh)  # all loaded, shapes right
    return port, {"params": params}, names


def record_flax_port(golden: Any, arrays: dict[str, np.ndarray], port: Any, variables: Any,
                     names: dict[str, str]) -> dict[str, np.ndarray]:
    _, _, meta = verify.read_golden(golden)
    acts = flax_taps(meta["activations"])
    inputs = {"x": arrays["input/x"], "mask": arrays.get("input/mask")}
    return verify.record_flax(port, variables, inputs, arrays["loss/dy"], activations=acts, param_names=names)


FLAX_CASE = "classification"  # the port is of DeepMind's classification model


def test_flax_port_matches_its_golden_file_with_nothing_missing(tmp_path):
    golden, model, arrays = golden_run(tmp_path, FLAX_CASE, True)
    port, variables, names = flax_port(model)
    rec = record_flax_port(golden, arrays, port, variables, names)
    np.savez(tmp_path / "theirs.npz", **rec)
    report = verify.compare(golden, tmp_path / "theirs.npz")  # scores and probabilities too
    assert report.ok, str(report)
    _, _, meta = verify.read_golden(golden)
    assert report.missing == () and report.extra == ()
    assert report.compared == {"activations": len(meta["activations"]), "gradients": len(meta["gradients"]),
                               "loss": 1, "missing": 0}
    assert report.masked_scores == ("act/cross.0.attn.scores",)


def test_a_perturbed_flax_weight_is_named_first(tmp_path):
    path, index, layer = "self0/attn/v/kernel", (0, 1), "act/self.0.use0.attn.v.out"
    golden, model, arrays = golden_run(tmp_path, FLAX_CASE, True)
    port, variables, names = flax_port(model)
    node = variables["params"]
    for key in path.split("/"):
        node = node[key]
    node[index] += 1e-3
    np.savez(tmp_path / "theirs.npz", **record_flax_port(golden, arrays, port, variables, names))
    report = verify.compare(golden, tmp_path / "theirs.npz")
    assert not report.ok
    assert report.first_break is not None and report.first_break.name == layer


# ---------------------------------------------------------------------------------------------
# The API on small functions: every option, every error
# ---------------------------------------------------------------------------------------------


class Scaled(hk.Module):
    """2 * tanh(x @ W + b), the tanh in a method of its own."""

    def __call__(self, x: Any) -> Any:
        return 2.0 * self.inner(x)

    def inner(self, x: Any) -> Any:
        return jnp.tanh(hk.Linear(2, name="lin")(x))


def test_haiku_taps_gradients_state_and_rng_free_apply():
    x = np.random.default_rng(0).standard_normal((4, 3))
    dy = np.random.default_rng(1).standard_normal((4, 2))
    fn = hk.transform(lambda x: Scaled()(x))
    params = jax.tree.map(np.asarray, fn.init(jax.random.PRNGKey(0), jnp.asarray(x)))
    lin = "scaled/~inner/lin"  # Haiku's name of a module made in the method inner
    w, b = params[lin]["w"], params[lin]["b"]
    rec = verify.record_haiku(fn, params, (x,), dy,
                              activations={"lin.in": (lin, "input"), "lin.out": lin, "inner": "scaled:inner",
                                           "again": ("scaled:inner", "output", 0)},
                              param_names={"lin.weight": (lin, "w"), "lin.bias": (lin, "b")})
    h = x @ w + b
    np.testing.assert_allclose(rec["act/lin.in"], x)
    np.testing.assert_allclose(rec["act/lin.out"], h)
    np.testing.assert_allclose(rec["act/inner"], np.tanh(h))
    np.testing.assert_allclose(rec["act/output"], 2 * np.tanh(h))
    dh = 2 * dy * (1 - np.tanh(h) ** 2)
    np.testing.assert_allclose(rec["grad/lin.weight"], x.T @ dh)  # [in, out], as ours
    np.testing.assert_allclose(rec["grad/lin.bias"], dh.sum(0))
    np.testing.assert_allclose(rec["grad/x"], dh @ w.T)
    assert float(rec["loss"]) == pytest.approx(float(np.sum(dy * 2 * np.tanh(h))))
    assert all(v.dtype == np.float64 for v in rec.values())

    # without an apply rng, with state, and with no floating input (no grad/x)
    def counted(x: Any) -> Any:
        hk.set_state("calls", hk.get_state("calls", [], init=jnp.zeros, dtype=jnp.int32) + 1)
        return Scaled()(x)

    stateful = hk.without_apply_rng(hk.transform_with_state(counted))
    _, state = stateful.init(jax.random.PRNGKey(0), jnp.asarray(x))
    again = verify.record_haiku(stateful, params, {"x": x}, dy, activations={}, param_names={}, state=state)
    np.testing.assert_allclose(again["act/output"], rec["act/output"])
    np.testing.assert_allclose(again["grad/x"], rec["grad/x"])
    ids = verify.record_haiku(hk.transform(lambda i: Scaled()(jax.nn.one_hot(i, 3, dtype=jnp.float64))),
                              params, (np.array([0, 2, 1, 1]),), dy, activations={}, param_names={})
    assert "grad/x" not in ids and ids["act/output"].shape == (4, 2)


def test_haiku_errors_name_the_argument():
    x = np.ones((4, 3))
    dy = np.ones((4, 2))
    fn = hk.transform(lambda x: Scaled()(x))
    params = jax.tree.map(np.asarray, fn.init(jax.random.PRNGKey(0), jnp.asarray(x)))

    def record(**kw: Any) -> Any:
        a = dict(fn=fn, params=params, inputs=(x,), dy=dy, activations={}, param_names={}) | kw
        return verify.record_haiku(a.pop("fn"), a.pop("params"), a.pop("inputs"), a.pop("dy"), **a)

    with jax.enable_x64(False), pytest.raises(RuntimeError, match=r"jax_enable_x64.*does not change"):
        record()
    with pytest.raises(ValueError, match=r"params: expected float64 arrays, got 2 .*\['b'\] float32"):
        record(params=jax.tree.map(lambda a: a.astype(np.float32), params))
    with pytest.raises(ValueError, match=r"param_names: no such .* w -> \('scaled/~inner/lin', 'kernel'\)"):
        record(param_names={"w": ("scaled/~inner/lin", "kernel")})
    with pytest.raises(ValueError, match=r"never recorded .*twice \(scaled/~inner/lin:__call__, call 1\)"):
        record(activations={"twice": ("scaled/~inner/lin", "output", 1)})
    with pytest.raises(ValueError, match=r"activations\['bad'\]: expected"):
        record(activations={"bad": ("scaled/~inner/lin", "middle")})
    with pytest.raises(ValueError, match=r"dy: shape \(4, 3\) does not fit the output \(4, 2\)"):
        record(dy=np.ones((4, 3)))
    with pytest.raises(TypeError, match="fn: expected a Haiku-transformed function"):
        record(fn=lambda x: x)
    with pytest.raises(TypeError, match="inputs: expected a dict"):
        record(inputs=[x])
    with pytest.raises(TypeError, match="output must be one array"):
        record(fn=hk.transform(lambda x: (Scaled()(x), x)))


def test_flax_inputs_sown_values_and_errors():
    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            h = nn.Dense(2, name="lin")(x)
            self.sow("intermediates", "h2", h * h)
            return jnp.tanh(h)

    x = np.random.default_rng(0).standard_normal((4, 3))
    dy = np.random.default_rng(1).standard_normal((4, 2))
    module = Tiny()
    # Flax creates float32 parameters (param_dtype) even in 64-bit mode: record_flax refuses them
    variables = jax.tree.map(lambda a: np.asarray(a, dtype=np.float64),
                             module.init(jax.random.PRNGKey(0), jnp.asarray(x)))
    w, b = variables["params"]["lin"]["kernel"], variables["params"]["lin"]["bias"]
    names = {"lin.weight": "lin/kernel", "lin.bias": "lin/bias"}
    rec = verify.record_flax(module, variables, (x,), dy, param_names=names,
                             activations={"in": ("lin", "input"), "lin": "lin", "h2": ":h2", "top": ""})
    h = x @ w + b
    np.testing.assert_allclose(rec["act/in"], x)
    np.testing.assert_allclose(rec["act/lin"], h)
    np.testing.assert_allclose(rec["act/h2"], h * h)
    np.testing.assert_allclose(rec["act/top"], np.tanh(h))
    dh = dy * (1 - np.tanh(h) ** 2)
    np.testing.assert_allclose(rec["grad/lin.weight"], x.T @ dh)
    np.testing.assert_allclose(rec["grad/lin.bias"], dh.sum(0))
    np.testing.assert_allclose(rec["grad/x"], dh @ w.T)

    with jax.enable_x64(False), pytest.raises(RuntimeError, match="jax_enable_x64"):
        verify.record_flax(module, variables, (x,), dy, activations={}, param_names={})
    f32 = module.init(jax.random.PRNGKey(0), jnp.asarray(x))
    with pytest.raises(ValueError, match=r"variables\['params'\]: expected float64 .*\['bias'\] float32"):
        verify.record_flax(module, f32, (x,), dy, activations={}, param_names={})
    with pytest.raises(ValueError, match="param_names: no such path"):
        verify.record_flax(module, variables, (x,), dy, activations={}, param_names={"w": "lin/w"})
    with pytest.raises(ValueError, match=r"never recorded .*gone \(lin:__call__, call 1\)"):
        verify.record_flax(module, variables, (x,), dy, activations={"gone": ("lin", "output", 1)},
                           param_names={})
    with pytest.raises(TypeError, match=r"module: expected a flax\.linen Module"):
        verify.record_flax(lambda x: x, variables, (x,), dy, activations={}, param_names={})
