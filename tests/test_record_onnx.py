"""verify.record_onnx: a torch port of the model laid out like our parameter schema (the layers
of tests/torch_reference.py in a module per parameter prefix and per block), exported by
``torch.onnx.export(..., dynamo=True)`` and run in ONNX Runtime and OpenVINO with its
intermediate values exposed, named through the export's module scopes (verify.onnx_record_names),
agrees with the model's golden file at the float32 tolerance; a weight scaled by 1 + 1e-3 in the
ONNX file is named at its own layer; OpenVINO's bf16 runs off the float32 bar and within
bf16's; Hugging Face's exported PerceiverModel is named by verify.hf_record_names' map; bad
files, names and inputs are refused with what was expected."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

import perceiver_np as pnp
from perceiver_np import verify
from perceiver_np.tolerances import GOLDEN_FLOAT32_RTOL, ONNX_BF16_RTOL, ONNX_PERTURBATION

REASON = "record_onnx needs torch, onnx, onnxscript and onnxruntime: pip install -e '.[compare]'"
torch = pytest.importorskip("torch", reason=REASON)
onnx = pytest.importorskip("onnx", reason=REASON)
pytest.importorskip("onnxscript", reason=REASON)  # torch.onnx.export(dynamo=True) translates with it
pytest.importorskip("onnxruntime", reason=REASON)

from . import torch_reference as ref  # noqa: E402  (only once torch is known to be there)

OV_REASON = "the OpenVINO runs need openvino: pip install -e '.[compare]'"

# input projection, a self block shared over 2 repeats (self.{j}.use0/use1), final norm, a
# query decoder; one cross head, two self heads
OPTS = dict(input_dim=5, latent_dim=8, num_latents=4, num_layers=2, num_blocks=2, num_heads=2,
            cross_heads=1, input_projection=True, final_norm=True, decoder="query", output_dim=3,
            num_outputs=2)
B, N = 2, 7


# --- the port: tests/torch_reference.py's layers, one module per parameter prefix ---------------


class Layer(torch.nn.Module):
    """A Linear (``weight`` [in, out], ``bias``) or LayerNorm (``gamma``, ``beta``) of the
    reference, over its own parameters: ``fn`` is ``ref.linear`` or ``ref.layer_norm``."""

    def __init__(self, fn: Any, params: dict[str, np.ndarray]) -> None:
        super().__init__()
        self.fn = fn
        for name, value in params.items():
            self.register_parameter(name, torch.nn.Parameter(torch.from_numpy(value)))

    def forward(self, x: Any) -> Any:
        return self.fn(x, lambda name: self.get_parameter(name.rpartition(".")[2]), "")


def linear(params: dict[str, np.ndarray], name: str) -> Layer:
    return Layer(ref.linear, {"weight": params[f"{name}.weight"], "bias": params[f"{name}.bias"]})


def norm(params: dict[str, np.ndarray], name: str) -> Layer:
    return Layer(ref.layer_norm, {"gamma": params[f"{name}.gamma"], "beta": params[f"{name}.beta"]})


class Attention(torch.nn.Module):
    """ref.mha with the projections as the submodules q, k, v and out."""

    def __init__(self, params: dict[str, np.ndarray], prefix: str, heads: int) -> None:
        super().__init__()
        for name in ("q", "k", "v", "out"):
            self.add_module(name, linear(params, f"{prefix}.{name}"))
        self.heads = heads

    def forward(self, xq: Any, xkv: Any, mask: Any = None) -> Any:
        q = ref.split_heads(self.q(xq), self.heads)  # [B, H, M, dh]
        k = ref.split_heads(self.k(xkv), self.heads)  # [B, H, N, dh]
        v = ref.split_heads(self.v(xkv), self.heads)  # [B, H, N, dv]
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # [B, H, M, N]
        if mask is not None:  # every sample here keeps a key: no all-masked row to zero
            scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)
        o = torch.softmax(scores, dim=-1) @ v
        b, h, m, dv = o.shape
        return self.out(o.transpose(1, 2).reshape(b, m, h * dv))


class FFN(torch.nn.Module):
    def __init__(self, params: dict[str, np.ndarray], prefix: str, gelu: str) -> None:
        super().__init__()
        self.up, self.down, self.gelu = linear(params, f"{prefix}.up"), linear(params, f"{prefix}.down"), gelu

    def forward(self, x: Any) -> Any:
        return self.down(ref.gelu(self.up(x), self.gelu))


class Block(torch.nn.Module):
    """ref.cross_block (with ``h``) or ref.self_block, its layers as submodules."""

    def __init__(self, params: dict[str, np.ndarray], prefix: str, *, heads: int, gelu: str,
                 cross: bool, query_residual: bool = True) -> None:
        super().__init__()
        for name in (("q_norm", "kv_norm") if cross else ("norm",)) + ("ffn_norm",):
            self.add_module(name, norm(params, f"{prefix}.{name}"))
        self.attn = Attention(params, f"{prefix}.attn", heads)
        self.ffn = FFN(params, f"{prefix}.ffn", gelu)
        self.query_residual = query_residual

    def forward(self, z: Any, h: Any = None, mask: Any = None) -> Any:
        if h is None:
            u = self.norm(z)
            a = z + self.attn(u, u)
        else:
            att = self.attn(self.q_norm(z), self.kv_norm(h), mask)
            a = z + att if self.query_residual else att
        return a + self.ffn(self.ffn_norm(a))


class SchemaPort(torch.nn.Module):
    """ref.forward as modules named like ``model.params`` (input projection, a query decoder)."""

    def __init__(self, model: pnp.Perceiver) -> None:
        super().__init__()
        c, p = model.config, model.params
        self.config = c
        self.input_proj = linear(p, "input_proj")
        self.latents = torch.nn.Parameter(torch.from_numpy(p["latents"]))
        self.cross = torch.nn.ModuleDict({str(i): Block(
            p, f"cross.{i}", heads=c.cross_heads, gelu=c.gelu, cross=True,
            query_residual=c.use_query_residual) for i in range(c.num_cross_layers)})
        self.add_module("self", torch.nn.ModuleDict({str(j): Block(
            p, f"self.{j}", heads=c.num_heads, gelu=c.gelu, cross=False) for j in range(c.num_layers)}))
        self.final_norm = norm(p, "final_norm")
        self.decoder = Block(p, "decoder", heads=c.decoder_heads, gelu=c.gelu, cross=True,
                             query_residual=c.decoder_query_residual)
        self.decoder.output = linear(p, "decoder.output")
        self.decoder.queries = torch.nn.Parameter(torch.from_numpy(p["decoder.queries"]))
        assert {k for k, _ in self.named_parameters()} == set(p)  # keyed like model.params

    def forward(self, x: Any, mask: Any) -> Any:
        c = self.config
        z = self.latents.expand(x.shape[0], *self.latents.shape)
        h = self.input_proj(x)
        for i, group in enumerate(ref.self_groups(c.num_layers, c.num_cross_layers)):
            z = self.cross[str(i)](z, h, mask)
            for _ in range(c.num_blocks):  # the repeats share the group's modules
                for j in group:
                    z = self.get_submodule(f"self.{j}")(z)
        z = self.final_norm(z)
        q = self.decoder.queries.expand(x.shape[0], *self.decoder.queries.shape)
        return self.decoder.output(self.decoder(q, z))


def export(module: Any, args: tuple[Any, ...], path: Path, **kwargs: Any) -> Path:
    """torch.onnx.export with the dynamo exporter, keeping input-independent modules (the
    latents' LayerNorm and query projection) as nodes: ``optimize=True`` folds them."""
    with warnings.catch_warnings():  # torch 2.13's exporter warns about its own internals
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec")
        torch.onnx.export(module, args, path, dynamo=True, optimize=False, verbose=False, **kwargs)
    return path


# --- the export, once for the module --------------------------------------------------------


class Exported(NamedTuple):
    model: pnp.Perceiver  # float32, the port's weights
    golden: Path
    onnx: Path
    arrays: dict[str, np.ndarray]  # the golden file
    meta: dict[str, Any]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    tmp = tmp_path_factory.mktemp("onnx")
    rng = np.random.default_rng(0)
    base = pnp.build(**OPTS, dtype="float32", seed=3)  # every parameter moved off its initial value
    model = base.with_params({k: (v + 0.3 * rng.standard_normal(v.shape)).astype(np.float32)
                              for k, v in base.params.items()})
    x = rng.standard_normal((B, N, OPTS["input_dim"]))
    mask = np.arange(N) < np.array([[N], [4]])  # sample 1 keeps its first 4 positions
    golden = verify.write_golden(tmp / "golden.npz", verify.cast(model, "float64"), x, mask, seed=1)
    port = SchemaPort(model).eval()
    path = export(port, (torch.from_numpy(x.astype(np.float32)), torch.from_numpy(mask)), tmp / "model.onnx",
                  input_names=["x", "mask"], output_names=["y"])
    _, arrays, meta = verify.read_golden(golden)
    return Exported(model, golden, path, arrays, meta)


def inputs(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"x": arrays["input/x"], "mask": arrays["input/mask"]}


def record_and_compare(e: Exported, path: Path, tmp_path: Path, **kwargs: Any
                       ) -> tuple[dict[str, np.ndarray], verify.CompareReport]:
    names = verify.onnx_record_names(path, e.meta["activations"])
    rec = verify.record_onnx(path, inputs(e.arrays), e.arrays["loss/dy"], activations=names, **kwargs)
    np.savez(tmp_path / "theirs.npz", **rec)
    return rec, verify.compare(e.golden, tmp_path / "theirs.npz", allow_missing=True)


def unexposed(meta: dict[str, Any]) -> list[str]:
    """The golden activations no module outputs: the attention scores and probabilities."""
    return [f"act/{n}" for n in meta["activations"] if n.endswith((".attn.scores", ".attn.probs"))]


RUNS = {"onnxruntime, as deployed": dict(runtime="onnxruntime", optimization="all"),
        "onnxruntime, unoptimised": dict(runtime="onnxruntime", optimization="disable"),
        "openvino f32": dict(runtime="openvino", precision="f32")}


@pytest.mark.parametrize("run", list(RUNS))
def test_the_exported_port_matches_its_golden_file(exported, tmp_path, run):
    if RUNS[run]["runtime"] == "openvino":
        pytest.importorskip("openvino", reason=OV_REASON)
    rec, report = record_and_compare(exported, exported.onnx, tmp_path, **RUNS[run])
    assert report.ok, str(report)
    hidden = unexposed(exported.meta)
    assert sorted(report.missing) == sorted(hidden + [f"grad/{n}" for n in exported.meta["gradients"]])
    assert report.compared == {"activations": len(exported.meta["activations"]) - len(hidden),
                               "gradients": 0, "loss": 1, "missing": len(report.missing)}
    assert report.forward_only and report.extra == () and report.mismatched == ()
    assert {row.dtype for row in report.rows} == {"float32"}  # held to the float32 tolerance
    assert {row.tolerance for row in report.rows} == {GOLDEN_FLOAT32_RTOL}
    meta = json.loads(rec["meta.json"].tobytes())
    ran = ({"optimization": RUNS[run]["optimization"]} if "optimization" in RUNS[run]
           else {"precision": "f32", "inference_precision": "f32"})
    assert meta == {"recorded_by": "perceiver_np.verify.record_onnx", "forward_only": True,
                    "model": str(exported.onnx), "runtime": RUNS[run]["runtime"], **ran, "output": "y",
                    "activations": verify.onnx_record_names(exported.onnx, exported.meta["activations"])}


def test_the_attention_named_by_hand(exported, tmp_path):
    """Values no module outputs are named from onnx_value_names: the probabilities are the
    Softmax in the attention module, the (masked) scores what it reads."""
    values = verify.onnx_value_names(exported.onnx)
    assert [(v.name, v.shape, v.dtype, v.op, v.inputs) for v in values[:2]] == [
        ("x", (B, N, OPTS["input_dim"]), "float32", "input", ()), ("mask", (B, N), "bool", "input", ())]
    acts = {}
    for v in values:
        if v.op == "Softmax" and v.scope in ("cross.0.attn", "decoder.attn"):
            block = v.scope.removesuffix(".attn")
            acts[f"{block}.attn.scores"], acts[f"{block}.attn.probs"] = v.inputs[0], v.name
    assert sorted(acts) == ["cross.0.attn.probs", "cross.0.attn.scores",
                            "decoder.attn.probs", "decoder.attn.scores"]
    by_name = {v.name: v for v in values}
    assert by_name[acts["cross.0.attn.probs"]].shape == (B, 1, OPTS["num_latents"], N)  # [B, H, M, N]
    rec = verify.record_onnx(exported.onnx, inputs(exported.arrays), activations=acts)
    np.savez(tmp_path / "theirs.npz", **rec)
    report = verify.compare(exported.golden, tmp_path / "theirs.npz", allow_missing=True)
    assert report.ok, str(report)
    assert sorted(row.name for row in report.rows) == sorted([*(f"act/{n}" for n in acts), "act/output"])
    assert report.masked_scores == ("act/cross.0.attn.scores",)  # the port fills finfo.min there
    assert "loss" in report.missing  # no dy given: no loss


def test_the_names_of_the_schema_port(exported):
    names = verify.onnx_record_names(exported.onnx, exported.meta["activations"])
    acts = [n for n in exported.meta["activations"] if f"act/{n}" not in unexposed(exported.meta)]
    assert list(names) == acts[:-1]  # in forward order, every activation a module outputs, not output
    assert names["input"] == "x"
    by_name = {v.name: v for v in verify.onnx_value_names(exported.onnx)}
    # each use of the shared block is a call of its own: distinct values, same module
    assert names["self.0.use0.ffn.up.out"] != names["self.0.use1.ffn.up.out"]
    assert by_name[names["self.0.use0.ffn.up.out"]].scope == by_name[names["self.0.use1.ffn.up.out"]].scope \
        == "self.0.ffn.up"
    assert by_name[names["cross.0.attn.q.out"]].shape == (B, OPTS["num_latents"], OPTS["latent_dim"])
    assert by_name[names["cross.0.attn.heads.out"]].op == "Reshape"  # the heads merged, read by attn.out
    taps = verify.schema_taps(exported.meta["activations"])
    assert verify.schema_taps(verify.golden_names(exported.model.config)) == taps  # act/..., grad/... skipped
    assert taps["input"] == ("input_proj", "input")
    assert taps["self.0.use1.out"] == ("self.0", "output", 1)
    assert taps["decoder.out"] == ("decoder.output", "input", 0)
    assert verify.onnx_module_names(exported.onnx, taps) == names
    # a graph input records what was fed to it, an initializer its constant
    rec = verify.record_onnx(exported.onnx, inputs(exported.arrays), activations={"in": "x", "w": "latents"})
    assert np.array_equal(rec["act/in"], exported.arrays["input/x"].astype(np.float32))  # float32, as fed
    assert rec["act/in"].dtype == np.float32
    assert np.array_equal(rec["act/w"], exported.model.params["latents"])
    with pytest.raises(ValueError, match=r"self.0.use2 \(self.0 ran 2 times, no call 2\)"):
        verify.onnx_module_names(exported.onnx, {"self.0.use2": ("self.0", "output", 2)})
    with pytest.raises(ValueError, match=r"cross.7 has no node"):
        verify.onnx_module_names(exported.onnx, {"a": "cross.7"})
    with pytest.raises(ValueError, match="expected a path"):
        verify.onnx_module_names(exported.onnx, {"a": ("cross.0", "middle")})


def test_an_optimised_export_leaves_out_the_folded_modules(exported, tmp_path):
    """onnxscript's optimizer (what torch.onnx.export's optimize=True runs) folds the modules
    that do not depend on the input, the latents' and the queries' LayerNorm and query
    projection, into constants: onnx_record_names leaves them out, the rest still compares,
    and onnx_module_names names the taps that found no node."""
    optimizer = pytest.importorskip("onnxscript.optimizer", reason=REASON)
    onnx.save(optimizer.optimize(onnx.load(str(exported.onnx))), str(tmp_path / "folded.onnx"))
    names = verify.onnx_record_names(tmp_path / "folded.onnx", exported.meta["activations"])
    folded = ["cross.0.q_norm.out", "cross.0.attn.q.out", "decoder.q_norm.out", "decoder.attn.q.out"]
    every = verify.onnx_record_names(exported.onnx, exported.meta["activations"])
    assert set(every) - set(names) == set(folded)
    _, report = record_and_compare(exported, tmp_path / "folded.onnx", tmp_path)
    assert report.ok, str(report)
    assert {f"act/{n}" for n in folded} <= set(report.missing)
    with pytest.raises(ValueError, match=r"taps: 4 found no value in .*cross.0.q_norm.out \(cross.0.q_norm "
                                         r"has no node\), cross.0.attn.q.out \(cross.0.attn.q has no node\)"):
        verify.onnx_module_names(tmp_path / "folded.onnx", verify.schema_taps(exported.meta["activations"]))


def test_a_graph_without_module_scopes(exported, tmp_path):
    """Another exporter's graph (here: the metadata removed) has no module paths: its values are
    listed with scope None, and naming them by module is refused with the way out."""
    graph = onnx.load(str(exported.onnx))
    for node in graph.graph.node:
        del node.metadata_props[:]
    onnx.save(graph, str(tmp_path / "plain.onnx"))
    values = verify.onnx_value_names(tmp_path / "plain.onnx")
    assert {v.scope for v in values} == {None}
    assert [v.name for v in values] == [v.name for v in verify.onnx_value_names(exported.onnx)]
    with pytest.raises(ValueError, match=r"no node carries its module path .*onnx_value_names\(path\)"):
        verify.onnx_record_names(tmp_path / "plain.onnx", exported.meta["activations"])


@pytest.mark.parametrize(("weight", "layer"), [
    ("self.0.ffn.up.weight", "act/self.0.use0.ffn.up.out"),
    ("cross.0.attn.k.weight", "act/cross.0.attn.k.out"),
    ("decoder.attn.v.weight", "act/decoder.attn.v.out"),
])
def test_a_perturbed_onnx_weight_is_named_first(exported, tmp_path, weight, layer):
    graph = onnx.load(str(exported.onnx))
    (init,) = [t for t in graph.graph.initializer if t.name == weight]
    value = onnx.numpy_helper.to_array(init) * np.float32(1 + ONNX_PERTURBATION)
    init.CopyFrom(onnx.numpy_helper.from_array(value, weight))
    onnx.save(graph, str(tmp_path / "bad.onnx"))
    _, report = record_and_compare(exported, tmp_path / "bad.onnx", tmp_path)
    assert not report.ok
    assert report.first_break is not None and report.first_break.name == layer, str(report)
    before = report.rows[:report.rows.index(report.first_break)]
    assert before and max(r.max_rel for r in before) < GOLDEN_FLOAT32_RTOL  # upstream: rounding only


def test_openvino_bf16_is_off_the_float32_bar_and_within_bf16s(exported, tmp_path):
    ov = pytest.importorskip("openvino", reason=OV_REASON)
    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no bf16 arithmetic (OPTIMIZATION_CAPABILITIES lacks BF16)")
    worst = {}
    for precision in ("f32", "bf16"):
        rec, report = record_and_compare(exported, exported.onnx, tmp_path, runtime="openvino",
                                         precision=precision)
        assert json.loads(rec["meta.json"].tobytes())["inference_precision"] == precision
        worst[precision] = max(r.max_rel for r in report.rows if r.name.startswith("act/"))
        assert report.ok is (precision == "f32"), str(report)
    assert worst["f32"] < GOLDEN_FLOAT32_RTOL < worst["bf16"] < ONNX_BF16_RTOL, worst


def test_hugging_face_exported_named_by_hf_record_names(tmp_path):
    """The map record_torch uses for HF's PerceiverModel names the values of its ONNX export."""
    transformers = pytest.importorskip("transformers", reason=REASON)
    from perceiver_np import interop

    model = pnp.build(**pnp.presets.hf(input_dim=5, latent_dim=8, num_latents=4, num_layers=2,
                                       cross_heads=1, num_heads=2), dtype="float64", seed=3)
    x = np.random.default_rng(0).standard_normal((B, N, 5))
    mask = np.arange(N) < np.array([[N], [4]])
    golden = verify.write_golden(tmp_path / "golden.npz", model, x, mask, seed=1)
    hf = transformers.PerceiverModel(transformers.PerceiverConfig(**interop.to_hf_config(model)[0])).eval()
    state = interop.to_hf_state_dict(model)
    hf.load_state_dict({k: torch.from_numpy(v.astype(np.float32)) for k, v in state.items()})
    path = export(hf, (), tmp_path / "hf.onnx", input_names=["inputs", "attention_mask"],
                  kwargs={"inputs": torch.from_numpy(x.astype(np.float32)),
                          "attention_mask": torch.from_numpy(mask.astype(np.int64))})
    config, arrays, meta = verify.read_golden(golden)
    names = verify.onnx_module_names(path, verify.hf_record_names(config)[0])
    rec = verify.record_onnx(path, {"inputs": arrays["input/x"], "attention_mask": arrays["input/mask"]},
                             arrays["loss/dy"], activations=names)
    assert rec["meta.json"].dtype == np.uint8 and rec["act/input"].dtype == np.float32
    np.savez(tmp_path / "theirs.npz", **rec)
    report = verify.compare(golden, tmp_path / "theirs.npz", allow_missing=True)
    assert report.ok, str(report)
    assert report.compared["activations"] == len(meta["activations"]) - len(unexposed(meta))


# --- compare and a forward-only recording ----------------------------------------------------


def test_compare_needs_the_forward_only_word_to_pass_without_gradients(exported, tmp_path):
    names = verify.onnx_record_names(exported.onnx, exported.meta["activations"])
    rec = verify.record_onnx(exported.onnx, inputs(exported.arrays), activations=names)
    np.savez(tmp_path / "said.npz", **rec)
    np.savez(tmp_path / "unsaid.npz", **{k: v for k, v in rec.items() if k != "meta.json"})
    said = verify.compare(exported.golden, tmp_path / "said.npz", allow_missing=True)
    unsaid = verify.compare(exported.golden, tmp_path / "unsaid.npz", allow_missing=True)
    assert said.ok and said.failures == () and "a forward-only run" in str(said)
    assert said.to_json()["forward_only"] is True
    assert not unsaid.ok and unsaid.failures == ("FAILED: no gradient was compared",)
    assert unsaid.rows == said.rows
    strict = verify.compare(exported.golden, tmp_path / "said.npz")  # the gradients are still missing
    assert not strict.ok and "missing from theirs" in strict.failures[0]
    np.savez(tmp_path / "broken.npz", **{**rec, "meta.json": np.frombuffer(b"{not json", dtype=np.uint8)})
    with pytest.raises(ValueError, match=r"meta\.json is not JSON"):
        verify.compare(exported.golden, tmp_path / "broken.npz", allow_missing=True)


# --- errors ------------------------------------------------------------------------------------


def test_bad_files_names_and_arguments_are_refused(exported, tmp_path):
    path, ins = exported.onnx, inputs(exported.arrays)
    name = verify.onnx_record_names(path, exported.meta["activations"])["cross.0.out"]
    acts = {"cross.0.out": name}
    with pytest.raises(FileNotFoundError, match="no ONNX model file at"):
        verify.record_onnx(tmp_path / "nothing.onnx", ins, activations={})
    (tmp_path / "junk.onnx").write_bytes(b"\x07not a model")
    with pytest.raises(ValueError, match=r"junk\.onnx: not a readable ONNX model"):
        verify.record_onnx(tmp_path / "junk.onnx", ins, activations={})
    (tmp_path / "empty.onnx").write_bytes(b"")  # parses: an empty ModelProto
    with pytest.raises(ValueError, match=r"empty\.onnx: not an ONNX model \(its graph has no output\)"):
        verify.onnx_value_names(tmp_path / "empty.onnx")
    with pytest.raises(ValueError, match=rf"not a value of .*cross.0.out -> '{name}x' \(close to '{name}x': "
                                         rf"{name}"):
        verify.record_onnx(path, ins, activations={"cross.0.out": f"{name}x"})
    with pytest.raises(TypeError, match=r"activations\['cross.0.out'\]: expected an ONNX value name, "
                                        r"got \('cross.0', 'output'\) \(a module tap goes through "):
        verify.record_onnx(path, ins, activations={"cross.0.out": ("cross.0", "output")})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match=r"takes \['x', 'mask'\]; missing \['mask'\], "
                                         r"unknown \['attention_mask'\]"):
        verify.record_onnx(path, {"x": ins["x"], "attention_mask": ins["mask"]}, activations=acts)
    with pytest.raises(ValueError, match=r"takes 2 inputs \['x', 'mask'\], got 1"):
        verify.record_onnx(path, (ins["x"],), activations=acts)
    with pytest.raises(TypeError, match="inputs: expected a dict"):
        verify.record_onnx(path, ins["x"], activations=acts)
    with pytest.raises(ValueError, match=r"inputs\['x'\]: expected \[2, 7, 5\] float32, "
                                         r"got \[2, 6, 5\] float64 \(another shape\)"):
        verify.record_onnx(path, {**ins, "x": ins["x"][:, :6]}, activations=acts)
    with pytest.raises(ValueError, match=r"inputs\['mask'\]: expected \[2, 7\] bool, got \[2, 7\] float64 "
                                         r"\(another kind of dtype\)"):
        verify.record_onnx(path, {**ins, "mask": ins["mask"].astype(float)}, activations=acts)
    with pytest.raises(ValueError, match=r"inputs\['mask'\]: .* int64 \(values the graph's dtype cannot "):
        verify.record_onnx(path, {**ins, "mask": 2 * ins["mask"].astype(np.int64)}, activations=acts)
    as_ints = verify.record_onnx(path, (ins["x"], ins["mask"].astype(np.int64)), activations=acts)  # exact
    as_bools = verify.record_onnx(path, ins, activations=acts)
    assert np.array_equal(as_ints["act/cross.0.out"], as_bools["act/cross.0.out"])
    with pytest.raises(ValueError, match=r"dy: shape \(2, 3\) does not fit the output 'y' \(2, 2, 3\)"):
        verify.record_onnx(path, ins, np.zeros((2, 3)), activations=acts)
    with pytest.raises(ValueError, match="output: not an output of"):
        verify.record_onnx(path, ins, activations=acts, output="z")
    with pytest.raises(ValueError, match="'output' is the graph output"):
        verify.record_onnx(path, ins, activations={"output": "y"})
    with pytest.raises(ValueError, match="runtime: expected one of"):
        verify.record_onnx(path, ins, activations=acts, runtime="tensorrt")
    with pytest.raises(ValueError, match="optimization: expected one of"):
        verify.record_onnx(path, ins, activations=acts, optimization="max")
    with pytest.raises(ValueError, match="OpenVINO has no optimisation levels"):
        verify.record_onnx(path, ins, activations=acts, runtime="openvino", optimization="basic")
    with pytest.raises(ValueError, match="ONNX Runtime runs the graph's own dtypes"):
        verify.record_onnx(path, ins, activations=acts, precision="bf16")
    with pytest.raises(ValueError, match="precision: expected one of"):
        verify.record_onnx(path, ins, activations=acts, runtime="openvino", precision="int8")


# --- the same port in float64 through record_torch (no export) -------------------------------


def record_port(e: Exported, port: Any, tmp_path: Path) -> verify.CompareReport:
    """``port`` recorded by record_torch under schema_taps' names (its parameters are named like
    ours and stored [in, out], so nothing is transposed) and compared with the golden file."""
    rec = verify.record_torch(port, inputs(e.arrays), e.arrays["loss/dy"],
                              activations=verify.schema_taps(e.meta["activations"]),
                              params={k: k for k in e.model.params}, transpose=lambda name: False)
    np.savez(tmp_path / "theirs.npz", **rec)
    return verify.compare(e.golden, tmp_path / "theirs.npz", allow_missing=True)


def test_the_port_through_record_torch_in_float64(exported, tmp_path):
    """The test suite's torch model, recorded by record_torch in float64: zero breaks at the
    float64 bar, every gradient compared; a 1e-3 change of one weight is named at its layer."""
    port = SchemaPort(verify.cast(exported.model, "float64")).double()
    report = record_port(exported, port, tmp_path)
    assert report.ok, str(report)
    assert report.compared["gradients"] == len(exported.model.params) + 1
    assert sorted(report.missing) == sorted(unexposed(exported.meta))
    with torch.no_grad():
        port.get_parameter("self.1.ffn.up.weight").view(-1)[2] += 1e-3
    report = record_port(exported, port, tmp_path)
    assert report.first_break is not None and report.first_break.name == "act/self.1.use0.ffn.up.out"
