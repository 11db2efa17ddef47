"""The runtimes a CPU user would pick instead of perceiver_np, each running the seed model with
perceiver_np's weights (``pnp.build(input_dim=287)``), for benchmarks/bench_model.py's workers.

Every system is a class with ``setup(kind, b, n, path)`` (build what the run needs for that
shape: not timed) and ``run() -> np.ndarray`` (one timed call). The model is the test suite's
PyTorch reference (tests/torch_reference.py, ``fused=True``: ``F.linear``, ``F.layer_norm``,
``F.gelu``, ``scaled_dot_product_attention``) wrapped as an ``nn.Module``; the others start from
it the way their users do:

- ``TorchCompile``: ``torch.compile`` of the module (inductor, the default mode), with
  ``freezing`` (weights folded in as constants, inference only) or without;
- ``OnnxRuntime``: ``torch.onnx.export`` (the dynamo exporter) of the module for the shape, run
  in an ``InferenceSession`` with every graph optimisation (``ORT_ENABLE_ALL``), ``threads``
  intra-op threads and one inter-op thread;
- ``OpenVino``: the same ONNX file compiled for the CPU with ``PERFORMANCE_HINT`` LATENCY or
  THROUGHPUT, ``INFERENCE_NUM_THREADS`` = threads and ``INFERENCE_PRECISION_HINT`` f32 (OpenVINO
  runs bf16 by default on CPUs that have it: f32 compares like with like);
- ``JaxJit``: the same model written in JAX (:func:`jax_forward`, ``jax.nn.dot_product_attention``),
  ``jax.jit`` compiled for the shape; XLA's CPU threads are set by flag to ``threads``.

A training step (cross-entropy over the pooled 256 features, backward, AdamW with the same decay
mask) runs for torch.compile only (``TorchCompile(frozen=False)``): the inference runtimes have no
backward.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SEED = {"input_dim": 287, "dtype": "float32"}


def inputs(b: int, n: int) -> np.ndarray:
    """x [b, n, 287] float32, the same in every worker of a shape."""
    return np.random.default_rng(n).standard_normal((b, n, SEED["input_dim"]), dtype=np.float32)


def labels(b: int) -> np.ndarray:
    return np.random.default_rng(b).integers(0, 256, size=b)


def seed_params() -> dict[str, np.ndarray]:
    sys.path.insert(0, str(ROOT))
    import perceiver_np as pnp

    return pnp.build(**SEED, dropout=0.0).params


def seed_module(params: dict[str, np.ndarray], trainable: bool = False) -> Any:
    """tests/torch_reference.py's fused forward as an ``nn.Module`` holding ``params`` (named with
    ``/`` for ``.``, which module attributes cannot contain)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from tests import torch_reference as ref

    class Seed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.names = list(params)
            self.p = torch.nn.ParameterDict({
                k.replace(".", "/"): torch.nn.Parameter(torch.from_numpy(v.copy()), requires_grad=trainable)
                for k, v in params.items()})

        def forward(self, x: Any) -> Any:
            tp = {k: self.p[k.replace(".", "/")] for k in self.names}
            return ref.forward(tp, x, fused=True)

    return Seed()


def adamw_step(named: dict[str, Any], loss_fn: Any, x: Any, y: Any) -> Any:
    """The training step every torch worker times: ``loss_fn(x, y)``, backward, and AdamW over
    ``named`` (our parameter name -> torch tensor) with perceiver_np's decay mask (weight decay
    0.01 on the weights, none on biases, norms and latents), lr 1e-4 -> step() -> [loss]."""
    import torch

    from perceiver_np.optim import default_decay_mask

    decay = [p for k, p in named.items() if default_decay_mask(k)]
    rest = [p for k, p in named.items() if not default_decay_mask(k)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                             {"params": rest, "weight_decay": 0.0}], lr=1e-4)

    def step() -> np.ndarray:
        loss = loss_fn(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return np.array([loss.item()])

    return step


class TorchCompile:
    def __init__(self, threads: int, frozen: bool) -> None:
        import torch

        torch.set_num_threads(threads)
        self.torch, self.frozen = torch, frozen
        self.params = seed_params()
        self.job: Any = None

    def setup(self, kind: str, b: int, n: int, path: str | None) -> None:
        torch = self.torch
        torch._dynamo.reset()
        torch._inductor.config.freezing = self.frozen
        if kind in ("infer", "stream"):
            module = seed_module(self.params).eval()
            compiled = torch.compile(module)
            x = torch.from_numpy(inputs(b, n) if kind == "infer" else np.load(path))

            def infer() -> np.ndarray:
                with torch.inference_mode():
                    return compiled(x).numpy()

            self.job = infer
            return
        if self.frozen:
            raise ValueError("freezing is for inference: a frozen graph has no trainable weights")
        module = seed_module(self.params, trainable=True)
        x, y = torch.from_numpy(inputs(b, n)), torch.from_numpy(labels(b))
        named = {k: module.p[k.replace(".", "/")] for k in self.params}
        loss_fn = torch.compile(lambda xb, yb: torch.nn.functional.cross_entropy(module(xb), yb))
        self.job = adamw_step(named, loss_fn, x, y)

    def run(self) -> np.ndarray:
        return np.asarray(self.job())


def export_onnx(b: int, n: int, directory: str) -> str:
    """The seed module exported for x [b, n, 287] to ``directory``/seed.onnx (dynamo exporter)."""
    import torch

    path = os.path.join(directory, "seed.onnx")
    module = seed_module(seed_params()).eval()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # its notes on absent torchvision ops
    with warnings.catch_warnings():  # torch's exporter warns about its own internals
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.from_numpy(inputs(b, n)),), path, dynamo=True,
                          input_names=["x"], output_names=["y"], verbose=False)
    return path


class OnnxRuntime:
    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.tmp = tempfile.TemporaryDirectory()
        self.job: Any = None

    def setup(self, kind: str, b: int, n: int, path: str | None) -> None:
        import onnxruntime as ort

        if kind not in ("infer", "stream"):
            raise ValueError("ONNX Runtime runs inference only")
        model = export_onnx(b, n, self.tmp.name)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads, opts.inter_op_num_threads = self.threads, 1
        session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        x = inputs(b, n) if kind == "infer" else np.load(path)
        self.job = lambda: session.run(["y"], {"x": x})[0]

    def run(self) -> np.ndarray:
        return np.asarray(self.job())


class OpenVino:
    def __init__(self, threads: int, hint: str) -> None:
        self.threads, self.hint = threads, hint
        self.tmp = tempfile.TemporaryDirectory()
        self.job: Any = None

    def setup(self, kind: str, b: int, n: int, path: str | None) -> None:
        import openvino as ov

        if kind not in ("infer", "stream"):
            raise ValueError("OpenVINO runs inference only")
        core = ov.Core()
        compiled = core.compile_model(core.read_model(export_onnx(b, n, self.tmp.name)), "CPU", {
            "PERFORMANCE_HINT": self.hint, "INFERENCE_NUM_THREADS": self.threads,
            "INFERENCE_PRECISION_HINT": "f32"})
        request = compiled.create_infer_request()
        x = inputs(b, n) if kind == "infer" else np.load(path)

        def infer() -> np.ndarray:
            request.infer({0: x})
            return np.array(request.get_output_tensor(0).data)

        self.job = infer

    def run(self) -> np.ndarray:
        return np.asarray(self.job())


def jax_forward(p: dict[str, Any], x: Any, *, layers: int = 4, heads: int = 4) -> Any:
    """The seed model in JAX (one cross block, ``layers`` self blocks, exact GELU, final
    LayerNorm, mean pool), as a JAX user would write it: x [B, N, C] -> [B, D]."""
    import jax
    import jax.numpy as jnp

    def lin(t: Any, name: str) -> Any:
        return t @ p[f"{name}.weight"] + p[f"{name}.bias"]

    def ln(t: Any, name: str) -> Any:
        mean = t.mean(-1, keepdims=True)
        var = ((t - mean) ** 2).mean(-1, keepdims=True)
        return (t - mean) * jax.lax.rsqrt(var + 1e-5) * p[f"{name}.gamma"] + p[f"{name}.beta"]

    def mha(xq: Any, xkv: Any, name: str) -> Any:
        def split(t: Any) -> Any:  # [B, S, H*d] -> [B, S, H, d], dot_product_attention's layout
            return t.reshape(*t.shape[:2], heads, -1)

        q, k, v = split(lin(xq, f"{name}.q")), split(lin(xkv, f"{name}.k")), split(lin(xkv, f"{name}.v"))
        o = jax.nn.dot_product_attention(q, k, v)  # [B, M, H, dv]
        return lin(o.reshape(*o.shape[:2], -1), f"{name}.out")

    def ffn(t: Any, name: str) -> Any:
        return lin(jax.nn.gelu(lin(t, f"{name}.up"), approximate=False), f"{name}.down")

    h = lin(x, "input_proj")
    z = jnp.broadcast_to(p["latents"], (x.shape[0], *p["latents"].shape))
    z = z + mha(ln(z, "cross.0.q_norm"), ln(h, "cross.0.kv_norm"), "cross.0.attn")
    z = z + ffn(ln(z, "cross.0.ffn_norm"), "cross.0.ffn")
    for j in range(layers):
        u = ln(z, f"self.{j}.norm")
        z = z + mha(u, u, f"self.{j}.attn")
        z = z + ffn(ln(z, f"self.{j}.ffn_norm"), f"self.{j}.ffn")
    return ln(z, "final_norm").mean(axis=1)


class JaxJit:
    def __init__(self, threads: int) -> None:
        # XLA's CPU thread pool is sized by flag before jax is imported
        os.environ["XLA_FLAGS"] = (f"--xla_cpu_multi_thread_eigen=true "
                                   f"intra_op_parallelism_threads={threads}")
        os.environ["NPROC"] = str(threads)
        import jax

        self.jax = jax
        self.params = {k: jax.device_put(v) for k, v in seed_params().items()}
        self.job: Any = None

    def setup(self, kind: str, b: int, n: int, path: str | None) -> None:
        if kind not in ("infer", "stream"):
            raise ValueError("the JAX worker runs inference only")
        jax = self.jax
        fn = jax.jit(jax_forward)
        x = jax.device_put(inputs(b, n) if kind == "infer" else np.load(path))
        fn(self.params, x).block_until_ready()  # compiled for the shape here, not in the timed run
        self.job = lambda: np.asarray(fn(self.params, x).block_until_ready())

    def run(self) -> np.ndarray:
        return np.asarray(self.job())


#: system name -> (constructor(threads)), the competitors bench_model.py adds to ours and torch.
INFERENCE = {
    "torch_compile": lambda t: TorchCompile(t, frozen=False),
    "torch_compile_frozen": lambda t: TorchCompile(t, frozen=True),
    "onnxruntime": OnnxRuntime,
    "openvino_latency": lambda t: OpenVino(t, "LATENCY"),
    "openvino_throughput": lambda t: OpenVino(t, "THROUGHPUT"),
    "jax": JaxJit,
}
TRAINING = {"torch_compile": lambda t: TorchCompile(t, frozen=False)}
