"""docs/figures/architecture.py: the figure of docs/start-here.md says what the code builds.

The script draws from a model (its config, schedule and parameter shapes); these tests check
that the labels it placed carry that model's numbers and names, for the seed and for a model
with other widths and two cross blocks, and that the committed PNG is what it draws today.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

import perceiver_np as pnp
from perceiver_np.model import step_names

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "docs" / "figures" / "architecture.py"


@pytest.fixture(scope="module")
def figure() -> ModuleType:
    pytest.importorskip("matplotlib", reason="the figure is drawn with matplotlib (make test installs it)")
    spec = importlib.util.spec_from_file_location("architecture_figure", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def expected_labels(model: pnp.Perceiver) -> list[str]:
    """What a figure of ``model`` must say, from its config and parameters."""
    cfg, p = model.config, model.params
    m, d = p["latents"].shape
    wide = p["self.0.ffn.up.weight"].shape[1]
    return [
        f"x [B, N, {cfg.input_dim}]\nmask [B, N]",
        f"input_proj\nh = x W + b\nW [{cfg.input_dim}, {cfg.latent_dim}]",
        f"h [B, N, {cfg.kv_channels}]",
        f"latents [{cfg.num_latents}, {cfg.latent_dim}]\none array, trained",
        f"z [B, {m}, {d}]\nbroadcast over B",
        f"final_norm\nLayerNorm over D = {d}",
        f"mean over M\ny [B, {cfg.latent_dim}]",
        f"the backward starts here:\ndz = dy / {cfg.num_latents} to every latent",
        f"self-attention, {cfg.num_heads} heads",
        f"cross-attention, {cfg.cross_num_heads} heads",
        f"FFN {d} → {wide} → {d}",
        f"{model.param_count:,} parameters",
    ]


@pytest.mark.parametrize(
    "opts",
    [{"input_dim": 287},
     {"input_dim": 3, "latent_dim": 32, "num_latents": 8, "num_layers": 3, "num_cross_layers": 2,
      "num_heads": 2, "self_widening_factor": 2}],
    ids=["seed", "two-cross-blocks"],
)
def test_the_figure_is_drawn_from_the_model(figure: ModuleType, tmp_path: Path, opts: dict) -> None:
    model = pnp.build(**opts)
    path = tmp_path / "architecture.png"
    labels = figure.draw(model, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert figure.png_labels(path) == labels
    text = "\n".join(labels)
    for want in expected_labels(model):
        assert want in text, f"{want!r} is not on the figure"
    # one box per step of the schedule, in its order, each with its block's parameter count
    boxes = [label for label in labels if label.split("\n")[0] in step_names(model.config)]
    assert [b.split("\n")[0] for b in boxes] == step_names(model.config)
    for box, (kind, i) in zip(boxes, model.config.schedule, strict=True):
        count = sum(v.size for k, v in model.params.items() if k.startswith(f"{kind}.{i}."))
        assert box.endswith(f"\n{count:,} params"), box
    assert {"encode", "process", "decode"} <= set(labels)


def test_the_committed_figure_is_what_the_code_draws(figure: ModuleType, tmp_path: Path) -> None:
    labels = figure.draw(pnp.build(input_dim=287), tmp_path / "now.png")
    assert figure.png_labels(figure.OUT) == labels, (
        "docs/start-here-architecture.png is out of date: run python docs/figures/architecture.py")


def test_the_figure_refuses_a_model_of_another_structure(figure: ModuleType, tmp_path: Path) -> None:
    model = pnp.build(input_dim=4, latent_dim=8, num_latents=2, num_layers=1, num_heads=1,
                      decoder="classification", output_dim=3)
    with pytest.raises(ValueError, match=r"model: .*decoder='classification'"):
        figure.draw(model, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
