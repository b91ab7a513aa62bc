"""Procedural coloured-shapes data set: unlimited, vectorized in torch, deterministic given a generator.

Every image is 32x32 RGB with one to three shapes (circle, square, triangle) in one of eight
saturated colours, drawn with antialiased signed-distance edges over a muted background (solid or a
faint linear gradient). Background and object palettes are disjoint and far apart in RGB so that a
sample's object colour can be read back by a nearest-palette lookup (what the visible-training test
does). Everything random is drawn on ``generator.device`` in a fixed order, so a seed fixes the batch.

Caption grammar (fixed vocabulary, see :data:`VOCABULARY`):

* one object: ``"a red circle"``, ``"a small red circle"``, ``"a large red circle"``,
  ``"a red circle at the top"`` / ``"at the bottom"`` / ``"on the left"`` / ``"on the right"`` /
  ``"in the center"``;
* two objects: ``"a red circle left of a blue square"``, ``"a red circle above a blue square"``;
* three objects, named left to right: ``"a red circle , a blue square and a green triangle"``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "BACKGROUND_COLOURS",
    "COLOURS",
    "COLOUR_NAMES",
    "IMAGE_SIZE",
    "POSITIONS",
    "SHAPES",
    "VOCABULARY",
    "ShapesBatch",
    "ShapesLabels",
    "caption_for",
    "generate_batch",
]

IMAGE_SIZE = 32
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Saturated object colours, pairwise far apart in RGB (0-255).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 220, 30),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "purple": (150, 40, 200),
    "orange": (250, 130, 20),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
# Muted background tones, each far from every object colour so foreground segmentation is easy.
BACKGROUND_COLOURS: tuple[tuple[int, int, int], ...] = (
    (128, 128, 128),  # mid grey
    (95, 110, 125),  # slate
    (140, 125, 100),  # khaki
    (90, 120, 105),  # sage
    (125, 100, 115),  # mauve
    (170, 165, 150),  # stone
)
POSITIONS: tuple[str, ...] = ("top", "bottom", "left", "right", "center")
_POSITION_PHRASE = {
    "top": "at the top",
    "bottom": "at the bottom",
    "left": "on the left",
    "right": "on the right",
    "center": "in the center",
}
SIZES: tuple[str, ...] = ("small", "large")
_RADIUS = {"small": (3.5, 4.5), "large": (6.5, 8.0)}

# Caption kinds for one-object images (index -> template); two/three-object kinds follow.
_KIND_PLAIN, _KIND_SIZE, _KIND_POSITION = 0, 1, 2
_KIND_LEFT_OF, _KIND_ABOVE, _KIND_THREE = 3, 4, 5

VOCABULARY: tuple[str, ...] = (
    "a",
    "an",
    "and",
    ",",
    "at",
    "the",
    "on",
    "in",
    "of",
    "left",
    "right",
    "above",
    "top",
    "bottom",
    "center",
    *SIZES,
    *COLOUR_NAMES,
    *SHAPES,
)


@dataclass(frozen=True, kw_only=True)
class ShapesLabels:
    """Structured ground truth of a batch; object slots beyond ``num_objects`` are padding.

    Args:
        num_objects: (B,) number of drawn objects, 1 to 3.
        shape: (B, 3) index into :data:`SHAPES`.
        colour: (B, 3) index into :data:`COLOUR_NAMES`.
        center_x: (B, 3) object centre column in pixels.
        center_y: (B, 3) object centre row in pixels.
        radius: (B, 3) object half-extent in pixels.
        background: (B,) index into :data:`BACKGROUND_COLOURS`.
        kind: (B,) caption template id (plain / size / position / left-of / above / three).
        position: (B,) index into :data:`POSITIONS` for one-object position captions, else -1.
    """

    num_objects: torch.Tensor
    shape: torch.Tensor
    colour: torch.Tensor
    center_x: torch.Tensor
    center_y: torch.Tensor
    radius: torch.Tensor
    background: torch.Tensor
    kind: torch.Tensor
    position: torch.Tensor


@dataclass(frozen=True, kw_only=True)
class ShapesBatch:
    """One generated batch.

    Args:
        images: (B, 3, 32, 32) float images in [-1, 1].
        captions: one caption per image.
        labels: structured ground truth.
    """

    images: torch.Tensor
    captions: list[str]
    labels: ShapesLabels


def _uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=generator.device) * (high - low) + low


def _randint(high: int, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=generator, device=generator.device)


def _signed_distance(
    shape: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, radius: torch.Tensor
) -> torch.Tensor:
    """Approximate signed distance (pixels, negative inside) of every shape kind, selected per object."""
    circle = torch.sqrt(dx * dx + dy * dy) - radius
    # Squares look bigger than circles of the same radius; shrink them to balance visual area.
    square = torch.maximum(dx.abs(), dy.abs()) - 0.85 * radius
    # Upward triangle: apex at (0, -r), base corners at (+-r, 0.8 r).
    slanted = (1.8 * dx.abs() - (dy + radius)) / (1.8**2 + 1.0) ** 0.5
    base = dy - 0.8 * radius
    triangle = torch.maximum(slanted, base)
    return torch.where(shape == 0, circle, torch.where(shape == 1, square, triangle))


def caption_for(
    kind: int, shapes: list[int], colours: list[int], size: str | None = None, position: int = -1
) -> str:
    """The caption of one image given its template and object attributes (objects in caption order)."""

    def noun(i: int) -> str:
        colour = COLOUR_NAMES[colours[i]]
        article = "an" if colour[0] in "aeiou" else "a"
        return f"{article} {colour} {SHAPES[shapes[i]]}"

    if kind == _KIND_PLAIN:
        return noun(0)
    if kind == _KIND_SIZE:
        return f"a {size} {noun(0)[noun(0).index(' ') + 1 :]}"
    if kind == _KIND_POSITION:
        return f"{noun(0)} {_POSITION_PHRASE[POSITIONS[position]]}"
    if kind == _KIND_LEFT_OF:
        return f"{noun(0)} left of {noun(1)}"
    if kind == _KIND_ABOVE:
        return f"{noun(0)} above {noun(1)}"
    return f"{noun(0)} , {noun(1)} and {noun(2)}"


def generate_batch(
    batch_size: int,
    *,
    generator: torch.Generator,
    kind_weights: tuple[float, ...] = (0.2, 0.15, 0.25, 0.15, 0.1, 0.15),
) -> ShapesBatch:
    """Draw a batch of images, captions and labels on ``generator.device``.

    Args:
        batch_size: number of images.
        generator: source of all randomness; its device is where images are made.
        kind_weights: relative frequency of the caption templates plain, size, position,
            left-of, above, three-objects.

    Returns:
        A :class:`ShapesBatch` with images in [-1, 1].
    """
    b, s, g = batch_size, IMAGE_SIZE, generator
    device = g.device
    weights = torch.tensor(kind_weights, dtype=torch.float32, device=device)
    kind = torch.multinomial(weights.expand(b, -1), 1, generator=g).squeeze(1)
    num_objects = torch.where(kind <= _KIND_POSITION, 1, torch.where(kind == _KIND_THREE, 3, 2))
    shape = _randint(len(SHAPES), (b, 3), g)
    colour = _randint(len(COLOURS), (b, 3), g)
    background = _randint(len(BACKGROUND_COLOURS), (b,), g)
    position = _randint(len(POSITIONS), (b,), g)
    size_idx = _randint(len(SIZES), (b, 3), g)
    radius = torch.where(
        size_idx == 0, _uniform((b, 3), *_RADIUS["small"], g), _uniform((b, 3), *_RADIUS["large"], g)
    )
    u = _uniform((b, 3, 2), 0.0, 1.0, g)  # free jitter of centres, mapped per template below

    # Centres for one object: free anywhere, or inside the named region.
    margin = radius[:, 0] + 1.0
    free_x = margin + u[:, 0, 0] * (s - 2 * margin)
    free_y = margin + u[:, 0, 1] * (s - 2 * margin)
    lo, hi = margin, s - margin  # region bounds in pixels
    # Named regions (x0, x1, y0, y1) for the centre: the outer third of the image on that side.
    third_lo = torch.maximum(torch.full_like(lo, s / 3.0), lo)
    third_hi = torch.minimum(torch.full_like(hi, 2 * s / 3.0), hi)
    mid_lo, mid_hi = torch.full_like(lo, s / 2 - 3), torch.full_like(lo, s / 2 + 3)
    region = {
        "top": (lo, hi, lo, torch.minimum(third_lo, torch.full_like(lo, s / 3.0))),
        "bottom": (lo, hi, torch.maximum(third_hi, torch.full_like(hi, 2 * s / 3.0)), hi),
        "left": (lo, torch.minimum(third_lo, torch.full_like(lo, s / 3.0)), lo, hi),
        "right": (torch.maximum(third_hi, torch.full_like(hi, 2 * s / 3.0)), hi, lo, hi),
        "center": (mid_lo, mid_hi, mid_lo, mid_hi),
    }
    pos_x, pos_y = free_x.clone(), free_y.clone()
    for index, name in enumerate(POSITIONS):
        x0, x1, y0, y1 = region[name]
        chosen = position == index
        pos_x = torch.where(chosen, x0 + u[:, 0, 0] * (x1 - x0), pos_x)
        pos_y = torch.where(chosen, y0 + u[:, 0, 1] * (y1 - y0), pos_y)
    is_position = kind == _KIND_POSITION
    x_one = torch.where(is_position, pos_x, free_x)
    y_one = torch.where(is_position, pos_y, free_y)

    # Multi-object layouts: objects in disjoint cells (halves or thirds) so they never overlap.
    # Their radii are capped to fit the cell.
    cells = torch.where(num_objects == 3, 3, 2).to(radius.dtype)
    cell = s / cells
    r_cap = torch.clamp(cell / 2 - 1.0, max=7.0)
    radius_multi = torch.minimum(radius, r_cap[:, None])
    slot = torch.arange(3, device=device, dtype=radius.dtype)
    along = cell[:, None] * (slot + 0.5) + (u[..., 0] - 0.5) * torch.clamp(
        cell[:, None] - 2 * radius_multi - 2, min=0
    )
    across_margin = radius_multi + 1.0
    across = across_margin + u[..., 1] * (s - 2 * across_margin)
    vertical = (kind == _KIND_ABOVE)[:, None]
    multi_x = torch.where(vertical, across, along)
    multi_y = torch.where(vertical, along, across)

    single = (num_objects == 1)[:, None]
    center_x = torch.where(single, x_one[:, None].expand(-1, 3), multi_x)
    center_y = torch.where(single, y_one[:, None].expand(-1, 3), multi_y)
    radius = torch.where(single, radius, radius_multi)

    # Render: antialiased coverage from the signed distance, painted object by object.
    coords = torch.arange(s, device=device, dtype=torch.float32) + 0.5
    dx = coords[None, None, None, :] - center_x[:, :, None, None]
    dy = coords[None, None, :, None] - center_y[:, :, None, None]
    dist = _signed_distance(shape[:, :, None, None], dx, dy, radius[:, :, None, None])
    active = torch.arange(3, device=device)[None, :] < num_objects[:, None]
    coverage = (0.5 - dist).clamp(0.0, 1.0) * active[:, :, None, None]

    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32, device=device) / 127.5 - 1.0
    bg_palette = torch.tensor(BACKGROUND_COLOURS, dtype=torch.float32, device=device) / 127.5 - 1.0
    # Background: the muted tone plus, half the time, a faint linear gradient in a random direction.
    angle = _uniform((b,), 0.0, 2 * torch.pi, g)
    strength = _uniform((b,), 0.0, 0.12, g) * (_uniform((b,), 0.0, 1.0, g) < 0.5)
    ramp = (coords - s / 2) / s
    gradient = (
        torch.cos(angle)[:, None, None] * ramp[None, None, :]
        + torch.sin(angle)[:, None, None] * ramp[None, :, None]
    )
    images = bg_palette[background][:, :, None, None] + (strength[:, None, None] * gradient)[:, None]
    for k in range(3):
        alpha = coverage[:, k, None]
        images = images * (1 - alpha) + palette[colour[:, k]][:, :, None, None] * alpha
    images = images.clamp(-1.0, 1.0)

    labels = ShapesLabels(
        num_objects=num_objects,
        shape=shape,
        colour=colour,
        center_x=center_x,
        center_y=center_y,
        radius=radius,
        background=background,
        kind=kind,
        position=torch.where(is_position, position, -1),
    )
    # Captions are strings, so this is the one host round trip per batch.
    kind_l, shape_l, colour_l, size_l, pos_l = (
        t.tolist() for t in (kind, shape, colour, size_idx[:, 0], position)
    )
    captions = [caption_for(kind_l[i], shape_l[i], colour_l[i], SIZES[size_l[i]], pos_l[i]) for i in range(b)]
    return ShapesBatch(images=images, captions=captions, labels=labels)
