"""Parameter shape lists: a size sweep, real model shapes (built from shape lists, no
download) and a launch-bound case of many small tensors."""
from __future__ import annotations


def sweep(total: int, tensors: int = 64) -> list[tuple]:
    """`total` params split into a transformer-like mix: square-ish matrices and vectors."""
    width = max(1, int((total / tensors) ** 0.5))
    shapes = []
    remaining = total
    while remaining > 0 and len(shapes) < tensors:
        n = min(remaining, width * width)
        shapes.append((n // width, width) if n >= width else (n,))
        remaining -= (n // width) * width if n >= width else n
        if len(shapes) % 4 == 0 and remaining > width:
            shapes.append((width,))
            remaining -= width
    if remaining > 0:
        shapes.append((remaining,))
    return shapes


def resnet50() -> list[tuple]:
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    in_ch = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            out = width * 4
            shapes += [(width, in_ch, 1, 1), (width,), (width,), (width, width, 3, 3), (width,), (width,),
                       (out, width, 1, 1), (out,), (out,)]
            if b == 0:
                shapes += [(out, in_ch, 1, 1), (out,), (out,)]
            in_ch = out
    return shapes + [(1000, 2048), (1000,)]


def gpt2(layers: int = 12, d: int = 768, vocab: int = 50257, ctx: int = 1024) -> list[tuple]:
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,),
                   (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def detector(width: float = 1.0) -> list[tuple]:
    """A YOLOv8-style detector, 303 tensors: convs with BatchNorm weight and bias, C2f blocks in
    a CSP backbone, an FPN/PAN neck and a decoupled head at three scales. width=1: YOLOv8x's
    channels (68.2M params); width=0.2: a nano-sized model of the same 303 tensors (2.9M
    params), many small matrices, as Ultralytics' small models are."""
    shapes = []

    def ch(c):
        return max(8, int(c * width) // 8 * 8)

    def conv(cout, cin, k):
        shapes.extend([(cout, cin, k, k), (cout,), (cout,)])

    def c2f(cin, cout, n):
        half = cout // 2
        conv(cout, cin, 1)
        for _ in range(n):
            conv(half, half, 3)
            conv(half, half, 3)
        conv(cout, (2 + n) * half, 1)

    widths, depths = tuple(map(ch, (80, 160, 320, 640, 640))), (3, 6, 6, 3)
    conv(widths[0], 3, 3)
    for cin, cout, n in zip(widths, widths[1:], depths):
        conv(cout, cin, 3)
        c2f(cout, cout, n)
    c3, c4, c5 = widths[2], widths[3], widths[4]
    conv(c5 // 2, c5, 1)
    conv(c5, 4 * (c5 // 2), 1)  # SPPF
    c2f(c5 + c4, c4, 3)
    c2f(c4 + c3, c3, 3)  # top-down
    conv(c3, c3, 3)
    c2f(c3 + c4, c4, 3)
    conv(c4, c4, 3)
    c2f(c4 + c5, c5, 3)  # bottom-up
    box, cls = ch(80), ch(320)
    for c in (c3, c4, c5):  # per scale: a box branch and an 80-class branch
        conv(box, c, 3)
        conv(box, box, 3)
        shapes.extend([(64, box, 1, 1), (64,)])
        conv(cls, c, 3)
        conv(cls, cls, 3)
        shapes.extend([(80, cls, 1, 1), (80,)])
    return shapes


def many_small(count: int = 10_000, size: int = 256) -> list[tuple]:
    return [(size,)] * count


def numel(shapes) -> int:
    total = 0
    for s in shapes:
        n = 1
        for k in s:
            n *= k
        total += n
    return total


# Whole models for the training-iteration benchmark (bench/train.py), small enough for a CPU:
# a ResNet-style CNN (basic blocks, batch norm) on 32x32 images and a GPT-2-style decoder.
RESNET_STYLE = dict(widths=(32, 64, 128), blocks_per_stage=2, classes=10, image=32)
GPT2_STYLE = dict(layers=4, d=256, heads=4, vocab=8192, ctx=128)
