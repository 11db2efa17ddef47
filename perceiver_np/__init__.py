"""perceiver_np: Perceiver and Perceiver IO by hand in NumPy.

Every layer's forward and backward pass is written out (:mod:`perceiver_np.layers`), the two
blocks are public functional units (:mod:`perceiver_np.blocks`), and every backward is proven
by finite differences (:mod:`perceiver_np.gradcheck`). The API mirrors Edifice's ``Perceiver``::

    import perceiver_np as pnp
    model = pnp.build(input_dim=287)                 # the seed configuration, float32
    y = model(x)                                     # x [B, N, 287] -> y [B, 256]
    y, cache = model.forward(x, mask, training=True, rng=np.random.default_rng(0))
    grads, dx = model.backward(dy, cache)            # grads keyed like model.params

    model = pnp.from_pretrained("save_pretrained-dir")   # a published PerceiverFor* model
    logits = model(inputs)                               # as the HF class's forward(inputs=...)
"""

from . import (
    attention,
    backends,
    blocks,
    checkpoint,
    engine,
    gradcheck,
    interop,
    krasserm,
    layers,
    losses,
    lucidrains,
    memory,
    optim,
    position,
    precision,
    prep_layers,
    presets,
    pretrained,
    runtime,
    shapes,
    stream,
    threads,
    tolerances,
    train,
    verify,
    viz,
)
from .blocks import (
    cross_block_backward,
    cross_block_forward,
    self_block_backward,
    self_block_forward,
)
from .config import PerceiverConfig, output_size, param_count, param_shapes, recommended_defaults
from .interop import from_hf_state_dict, to_hf_state_dict
from .krasserm import from_krasserm
from .lucidrains import from_lucidrains
from .model import Perceiver, build, init_params
from .pretrained import PretrainedPerceiver, from_hf, from_pretrained
from .threads import get_num_threads, set_num_threads
from .version import __version__ as __version__

__all__ = [
    "Perceiver",
    "PerceiverConfig",
    "PretrainedPerceiver",
    "attention",
    "backends",
    "blocks",
    "build",
    "checkpoint",
    "cross_block_backward",
    "cross_block_forward",
    "engine",
    "from_hf",
    "from_hf_state_dict",
    "from_krasserm",
    "from_lucidrains",
    "from_pretrained",
    "get_num_threads",
    "gradcheck",
    "init_params",
    "interop",
    "krasserm",
    "layers",
    "losses",
    "lucidrains",
    "memory",
    "optim",
    "output_size",
    "param_count",
    "param_shapes",
    "position",
    "precision",
    "prep_layers",
    "presets",
    "pretrained",
    "recommended_defaults",
    "runtime",
    "self_block_backward",
    "self_block_forward",
    "set_num_threads",
    "shapes",
    "stream",
    "threads",
    "to_hf_state_dict",
    "tolerances",
    "train",
    "verify",
    "viz",
]
