"""The figure of docs/start-here.md: encode / process / decode, with the shapes, and where the
gradients fork. Every number, name and the block schedule are read from the model built here
(its config, ``model.step_names``' schedule and its parameter shapes), never written by hand,
so the figure stays true to the code::

    python docs/figures/architecture.py            # writes docs/start-here-architecture.png

:func:`draw` returns the labels it placed, in drawing order, and stores them in the PNG's
``Description`` text chunk as JSON (:func:`png_labels` reads them back): tests/test_figures.py
checks both against the config, and that the committed PNG is the one today's code draws.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from pathlib import Path

import perceiver_np as pnp
from perceiver_np._files import atomic_write
from perceiver_np.model import step_names

OUT = Path(__file__).resolve().parent.parent / "start-here-architecture.png"
FORWARD, GRADIENT = "#222222", "#c0392b"  # the forward pass in black, the gradients' forks in red
FILL = {"input": "#e8f1fa", "cross": "#fdebd0", "self": "#e9f7ef", "decode": "#f4ecf7", "latents": "#fef9e7"}


def shape(dims: tuple[int | str, ...]) -> str:
    """(B, 64, 256) -> '[B, 64, 256]', the shape notation of the docs."""
    return "[" + ", ".join(str(d) for d in dims) + "]"


def block_text(model: pnp.Perceiver, kind: str, index: int, name: str) -> str:
    """The text of one step of the schedule: its name, attention, heads, FFN widths, parameters."""
    cfg, p = model.config, model.params
    prefix = f"{kind}.{index}."
    up = p[prefix + "ffn.up.weight"].shape  # [D, wD]
    count = sum(v.size for k, v in p.items() if k.startswith(prefix))
    shapes = {w: shape(p[f"{prefix}attn.{w}.weight"].shape) for w in ("q", "k", "v", "out")}
    if len(set(shapes.values())) == 1:  # the seed: every projection [D, D]
        weights = f"W_q,k,v,out {shapes['q']}"
    else:
        weights = "\n".join(f"W_{w} {s}" for w, s in shapes.items())
    if kind == "cross":
        attn = (f"cross-attention, {cfg.cross_num_heads} heads\n"
                f"q from LN_q(z)\nk, v from LN_kv(h), masked")
    else:
        attn = f"self-attention, {cfg.num_heads} heads\nq, k, v from LN(z)"
    return f"{name}\n{attn}\n{weights}\nFFN {up[0]} → {up[1]} → {up[0]}\n{count:,} params"


def draw(model: pnp.Perceiver, path: Path) -> list[str]:
    """Draw ``model``'s architecture to the PNG ``path`` (written atomically) and return every
    label placed, in drawing order. The model must have the seed's structure: an input
    projection and the mean-pool decoder."""
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyBboxPatch

    cfg, p = model.config, model.params
    if cfg.decoder != "pool" or not cfg.input_projection or cfg.input_fourier != "none":
        raise ValueError(f"model: the figure draws the seed's structure (input projection, mean pool), "
                         f"got decoder={cfg.decoder!r}, input_projection={cfg.input_projection}, "
                         f"input_fourier={cfg.input_fourier!r}")
    m, d = p["latents"].shape
    c, ckv = p["input_proj.weight"].shape
    steps = list(zip(cfg.schedule, step_names(cfg), strict=True))
    # the latent row, left to right: latents, z, every step of the schedule, final_norm, y
    columns = 2 + len(steps) + 2
    width, box_w, box_h = 2.0, 1.8, 1.25
    fig = Figure(figsize=(width * columns, 7.0))  # about an inch per data unit
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.set_xlim(-0.1, width * columns)
    ax.set_ylim(0.0, 10.0)
    ax.axis("off")
    labels: list[str] = []

    def text(x: float, y: float, s: str, *, color: str = FORWARD, size: float = 9.0, ha: str = "center",
             weight: str = "normal") -> None:
        ax.text(x, y, s, color=color, fontsize=size, ha=ha, va="center", fontweight=weight)
        labels.append(s)

    def box(col: float, y: float, s: str, fill: str, h: float = box_h) -> tuple[float, float]:
        x = col * width + width / 2
        ax.add_patch(FancyBboxPatch((x - box_w / 2, y - h / 2), box_w, h, boxstyle="round,pad=0.05",
                                    facecolor=fill, edgecolor=FORWARD, linewidth=0.8))
        text(x, y, s, size=8.0)
        return x, y

    def arrow(a: tuple[float, float], b: tuple[float, float], *, color: str = FORWARD,
              label: str | None = None) -> None:
        ax.annotate("", xy=b, xytext=a, arrowprops={"arrowstyle": "-|>", "color": color, "lw": 1.0,
                                                    "shrinkA": 0, "shrinkB": 0})
        if label is not None:
            text((a[0] + b[0]) / 2, (a[1] + b[1]) / 2, label, color=color, size=7.5)

    options = ", ".join(f"{f.name}={getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg)
                        if getattr(cfg, f.name) != f.default)  # input_dim has no default
    title = (f"pnp.build({options}): B samples of N inputs with C = {c} channels, "
             f"M = {m} latents of D = {d}, {model.param_count:,} parameters")
    text(width * columns / 2, 9.6, title, size=11.0)

    # the input side: x -> input_proj -> h, read by every cross block
    low, high = 4.4, 7.6  # the latent row, the input row
    first_cross = next(i for i, ((kind, _), _) in enumerate(steps) if kind == "cross")
    xb = box(0, high, f"x {shape(('B', 'N', c))}\nmask {shape(('B', 'N'))}", FILL["input"])
    pb = box(1, high, f"input_proj\nh = x W + b\nW {shape((c, ckv))}", FILL["input"])
    hb = box(2 + first_cross, high, f"h {shape(('B', 'N', ckv))}", FILL["input"], h=0.7)
    arrow((xb[0] + box_w / 2, high), (pb[0] - box_w / 2, high))
    arrow((pb[0] + box_w / 2, high), (hb[0] - box_w / 2, high))

    # the latent side: latents -> z -> the schedule -> final_norm -> mean pool
    lb = box(0, low, f"latents {shape((m, d))}\none array, trained", FILL["latents"])
    zb = box(1, low, f"z {shape(('B', m, d))}\nbroadcast over B", FILL["latents"])
    arrow((lb[0] + box_w / 2, low), (zb[0] - box_w / 2, low))
    prev = zb
    centres = []
    for col, ((kind, index), name) in enumerate(steps, start=2):
        sb = box(col, low, block_text(model, kind, index, name), FILL[kind], h=2.1)
        arrow((prev[0] + box_w / 2, low), (sb[0] - box_w / 2, low))
        if kind == "cross":  # every cross block reads the same h as its keys and values
            arrow((hb[0], high - 0.35), (sb[0], low + 1.05), label="keys, values")
        centres.append(sb[0])
        prev = sb
    nb = box(2 + len(steps), low, f"final_norm\nLayerNorm over D = {d}", FILL["decode"])
    yb = box(3 + len(steps), low, f"mean over M\ny {shape(('B', d))}", FILL["decode"])
    arrow((prev[0] + box_w / 2, low), (nb[0] - box_w / 2, low))
    arrow((nb[0] + box_w / 2, low), (yb[0] - box_w / 2, low))

    # encode / process / decode: the input side and the first cross block; the rest of the
    # schedule; the final LayerNorm and the pool
    spans = [("encode", 0, 2 + first_cross), ("process", 3 + first_cross, 1 + len(steps)),
             ("decode", 2 + len(steps), 3 + len(steps))]
    for name, a, b in spans:
        if a > b:
            continue
        x0, x1 = a * width + 0.05, (b + 1) * width - 0.05
        ax.plot([x0, x1], [8.85, 8.85], color=FORWARD, lw=0.8)
        text((x0 + x1) / 2, 9.1, name, size=10.5, weight="bold")

    # where the gradients fork: an array read in two places gets the sum of both gradients
    below = low - 1.05
    forks = [
        (zb[0], f"broadcast: one {shape((m, d))} array feeds\nall B samples, so its gradient\n"
                f"sums over them: d latents = Σ_b dz[b]", 1.9),
        (hb[0] + box_w / 2 + 0.2, "h feeds the keys and the values of every\ncross block: d_h = Σ over the "
         "cross blocks,\nand inside each one dxk + dxv", None),
        (centres[len(centres) // 2], "residuals: in every block z feeds z + attention and its LayerNorm,\n"
         "a feeds a + FFN and LN_ffn: dz = da + LN backward, da = dy + LN_ffn backward;\n"
         "in a self block u = LN(z) is queries and keys/values: du = du_q + du_kv", 1.3),
        (yb[0], f"the backward starts here:\ndz = dy / {m} to every latent", 1.9),
    ]
    for x, note, y in forks:
        if y is None:  # beside h, on the input row
            text(x, high, note, color=GRADIENT, size=8.0, ha="left")
            continue
        text(x, y, note, color=GRADIENT, size=8.0)
        arrow((x, y + 0.45), (x, below - 0.45), color=GRADIENT)
    for x in centres:
        text(x, below - 0.25, "+ residual", color=GRADIENT, size=7.5)
    text(width * columns / 2, 0.35, "backward: the same path from right to left; "
         "where an array fed two places (red), its two gradients add", color=GRADIENT, size=9.0)
    arrow((width * columns - 0.2, 0.1), (0.1, 0.1), color=GRADIENT)

    description = json.dumps(labels, ensure_ascii=False)
    atomic_write(Path(path), lambda f: fig.savefig(f, format="png", dpi=100, metadata={
        "Software": None, "Description": description}))
    return labels


def png_labels(path: Path) -> list[str]:
    """The labels :func:`draw` stored in the PNG at ``path`` (its ``Description`` text chunk)."""
    data = Path(path).read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"path: {path} is not a PNG file")
    at = 8
    while at + 8 <= len(data):
        (length,), kind = struct.unpack(">I", data[at:at + 4]), data[at + 4:at + 8]
        body = data[at + 8:at + 8 + length]
        if kind in (b"tEXt", b"iTXt") and body.startswith(b"Description\0"):
            raw = body[len(b"Description\0"):]
            if kind == b"iTXt":  # compression flag, method, language\0, translated keyword\0
                raw = raw[2:].split(b"\0", 2)[2]
            return list(json.loads(raw.decode("utf-8" if kind == b"iTXt" else "latin-1")))
        at += 12 + length
    raise ValueError(f"path: {path} has no Description text chunk (not drawn by this script)")


def main() -> None:
    labels = draw(pnp.build(input_dim=287), OUT)
    print(f"{OUT}: {len(labels)} labels, {math.ceil(OUT.stat().st_size / 1024)} KiB")


if __name__ == "__main__":
    main()
