"""The embedded synthetic world: scenes of coloured shapes, their captions, VQA questions and NLVR2 pairs.

Designed so that learning on it proves pixel-text alignment:
- the image is a 3x3 grid of cells (64x64 at the default 192x192, one feature pixel each at stride 64) and
  every object lies entirely inside its own cell, so a relation between two objects is never ambiguous;
- how many objects a scene has and how large they are is a `SceneSpec` (the demo's world has one large
  object per image, the `demo_hard` world 1-3 smaller ones);
- colour and shape words are the *grounded* words: colours and shapes are drawn uniformly and without
  repetition inside one image and independently of each other, so the text around a masked colour/shape
  word tells at most which of the other 7 it is not; only the pixels tell which it is;
- background clutter is grey only, so it never looks like an object's colour.
Everything is a pure function of (seed, split, index).
"""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 175, 60),
    "blue": (50, 80, 235),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 205),
    "orange": (250, 140, 20),
    "white": (248, 248, 248),
    "cyan": (40, 215, 225),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "ring", "semicircle")
SIZES = ("small", "large")
GRID = 3
POSITIONS = {
    (0, 0): "top left",
    (0, 1): "top",
    (0, 2): "top right",
    (1, 0): "left",
    (1, 1): "center",
    (1, 2): "right",
    (2, 0): "bottom left",
    (2, 1): "bottom",
    (2, 2): "bottom right",
}
RELATIONS = ("left of", "right of", "above", "below")
_REL_PHRASE = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
SPLITS = ("train", "val", "test")
# Words of every template below; tests check that generated text never needs another word.
_TEMPLATE_WORDS = (
    "a the there is in picture shows and to of above below left right top bottom center what "
    "color shape object objects how many are yes no both images image contains contain "
    "more than exactly one"
)
MAX_GROUNDED = 8  # colour + shape for at most 3 objects, with room to spare
MAX_OBJECTS = len(COLOURS)  # colours are distinct within a scene


def world_words() -> list[str]:
  """Every word the world writes, in a fixed order (the vocab is built from it)."""
  words = list(COLOURS) + list(SHAPES) + list(SIZES) + _TEMPLATE_WORDS.split() + [str(d) for d in range(10)]
  seen, out = set(), []
  for w in words:
    if w not in seen:
      seen.add(w)
      out.append(w)
  return out


@dataclasses.dataclass(frozen=True)
class SceneSpec:
  """How scenes are drawn: objects per image (uniform in [min_objects, max_objects]) and their radius as a
  fraction of the cell side, for 'small' and 'large' objects."""

  min_objects: int = 1
  max_objects: int = 3
  radius_small: float = 0.2
  radius_large: float = 0.38

  def __post_init__(self):
    if not 1 <= self.min_objects <= self.max_objects <= GRID * GRID:
      raise ValueError(
          f"synthetic objects per image must satisfy 1 <= min_objects <= max_objects <= "
          f"{GRID * GRID}, got {self.min_objects}..{self.max_objects}"
      )
    if self.max_objects > len(COLOURS):  # colours and shapes are distinct within an image
      raise ValueError(f"synthetic max_objects {self.max_objects} exceeds the {len(COLOURS)} colours")
    if not 0.05 <= self.radius_small <= self.radius_large <= 0.5:
      raise ValueError(
          f"synthetic object radii must satisfy 0.05 <= radius_small <= radius_large <= 0.5 "
          f"(fractions of the cell side), got {self.radius_small}, {self.radius_large}"
      )


@dataclasses.dataclass(frozen=True)
class Obj:
  colour: str
  shape: str
  size: str
  cell: tuple[int, int]  # (row, col)
  center: tuple[float, float]  # (x, y) in pixels
  radius: float


def _rng(seed: int, split: str, kind: int, index: int) -> np.random.Generator:
  return np.random.default_rng([seed, SPLITS.index(split), kind, index])


def make_scene(seed: int, split: str, index: int, image_size: int, spec: SceneSpec = SceneSpec()) -> list[Obj]:
  rng = _rng(seed, split, 0, index)
  n = int(rng.integers(spec.min_objects, spec.max_objects + 1))
  colours = rng.choice(list(COLOURS), n, replace=False)
  shapes = rng.choice(SHAPES, n, replace=False)
  cells = rng.choice(GRID * GRID, n, replace=False)
  cell_px = image_size / GRID
  objs = []
  for c, s, cell in zip(colours, shapes, cells):
    size = SIZES[int(rng.integers(2))]
    radius = cell_px * (spec.radius_large if size == "large" else spec.radius_small)
    slack = max(0.0, cell_px / 2 - radius - 2)
    row, col = divmod(int(cell), GRID)
    cx = (col + 0.5) * cell_px + rng.uniform(-slack, slack)
    cy = (row + 0.5) * cell_px + rng.uniform(-slack, slack)
    objs.append(Obj(str(c), str(s), size, (row, col), (cx, cy), radius))
  return objs


def cell_labels(objs: list[Obj]) -> np.ndarray:
  """int32 [GRID*GRID, 2]: (colour, shape) index of the object in each cell (row-major), -1 for an empty
  cell. The per-cell labels of the world's 'ImageNet' (the demo's CNN warm start)."""
  out = np.full((GRID * GRID, 2), -1, np.int32)
  for o in objs:
    out[o.cell[0] * GRID + o.cell[1]] = (list(COLOURS).index(o.colour), SHAPES.index(o.shape))
  return out


def scene_words(labels: np.ndarray) -> tuple[list[str], list[str]]:
  """The colour words and the shape words of a scene's objects, from its `cell_labels` (row-major order)."""
  rows = [(int(c), int(s)) for c, s in np.asarray(labels) if c >= 0]
  return [list(COLOURS)[c] for c, _ in rows], [SHAPES[s] for _, s in rows]


def _polygon(cx, cy, r, points):
  return [(cx + r * x, cy + r * y) for x, y in points]


def _draw_shape(draw: ImageDraw.ImageDraw, obj: Obj) -> None:
  cx, cy = obj.center
  r, fill = obj.radius, COLOURS[obj.colour]
  box = (cx - r, cy - r, cx + r, cy + r)
  if obj.shape == "circle":
    draw.ellipse(box, fill=fill)
  elif obj.shape == "ring":
    draw.ellipse(box, outline=fill, width=max(3, int(r * 0.4)))
  elif obj.shape == "square":
    draw.rectangle((cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r), fill=fill)
  elif obj.shape == "triangle":
    draw.polygon(_polygon(cx, cy, r, [(0, -1), (0.95, 0.8), (-0.95, 0.8)]), fill=fill)
  elif obj.shape == "diamond":
    draw.polygon(_polygon(cx, cy, r, [(0, -1), (0.7, 0), (0, 1), (-0.7, 0)]), fill=fill)
  elif obj.shape == "star":
    pts = [
        (
            math.sin(k * math.pi / 5) * (1 if k % 2 == 0 else 0.42),
            -math.cos(k * math.pi / 5) * (1 if k % 2 == 0 else 0.42),
        )
        for k in range(10)
    ]
    draw.polygon(_polygon(cx, cy, r, pts), fill=fill)
  elif obj.shape == "cross":
    a = 0.32
    draw.polygon(
        _polygon(
            cx,
            cy,
            r,
            [
                (-a, -1),
                (a, -1),
                (a, -a),
                (1, -a),
                (1, a),
                (a, a),
                (a, 1),
                (-a, 1),
                (-a, a),
                (-1, a),
                (-1, -a),
                (-a, -a),
            ],
        ),
        fill=fill,
    )
  elif obj.shape == "semicircle":
    draw.pieslice((cx - r, cy - 0.5 * r, cx + r, cy + 1.5 * r), 180, 360, fill=fill)
  else:
    raise ValueError(f"unknown shape {obj.shape!r}")


def render(seed: int, split: str, index: int, objs: list[Obj], image_size: int) -> np.ndarray:
  """uint8 [S,S,3]: grey noisy background, grey clutter strokes, then the objects."""
  rng = _rng(seed, split, 1, index)
  base = int(rng.integers(50, 100))
  noise = rng.integers(-12, 13, (image_size, image_size, 1))
  img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8).repeat(3, axis=-1))
  draw = ImageDraw.Draw(img)
  for _ in range(int(rng.integers(4, 10))):
    grey = int(rng.integers(100, 160))
    x0, y0 = rng.uniform(0, image_size, 2)
    dx, dy = rng.uniform(-image_size / 8, image_size / 8, 2)
    draw.line((x0, y0, x0 + dx, y0 + dy), fill=(grey,) * 3, width=int(rng.integers(1, 3)))
  for obj in objs:
    _draw_shape(draw, obj)
  return np.asarray(img)


def encode_jpeg(image: np.ndarray, quality: int = 92) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


def relation(a: Obj, b: Obj) -> str:
  """The one relation used to describe `a` against `b`: horizontal when columns differ, else vertical."""
  if a.cell[1] != b.cell[1]:
    return "left of" if a.cell[1] < b.cell[1] else "right of"
  return "above" if a.cell[0] < b.cell[0] else "below"


def holds(rel: str, a: Obj, b: Obj) -> bool:
  return {
      "left of": a.cell[1] < b.cell[1],
      "right of": a.cell[1] > b.cell[1],
      "above": a.cell[0] < b.cell[0],
      "below": a.cell[0] > b.cell[0],
  }[rel]


class _Sentence:
  """Builds a sentence word by word, remembering which word indices are grounded."""

  def __init__(self):
    self.words, self.grounded = [], []

  def add(self, text: str, grounded: bool = False):
    for w in text.split():
      if grounded:
        self.grounded.append(len(self.words))
      self.words.append(w)
    return self

  def obj(self, o: Obj, size: bool = True):
    self.add("a")
    if size:
      self.add(o.size)
    return self.add(o.colour, True).add(o.shape, True)

  def done(self) -> tuple[str, list[int]]:
    return " ".join(self.words), list(self.grounded)


# The caption templates: "there is a red star in the top left" (names one object), "a red star is to the left
# of a blue ring" (relates two; "there is" with one object), "the picture shows a red star and a blue ring"
# (lists every object). Their order is the one the first worlds drew them in, so all three draw as before.
CAPTION_KINDS = ("there_is", "relation", "shows")


def valid_caption_kinds(kinds) -> bool:
  """Whether `kinds` is a non-empty sequence of distinct CAPTION_KINDS."""
  kinds = tuple(kinds)
  return bool(kinds) and len(set(kinds)) == len(kinds) and all(k in CAPTION_KINDS for k in kinds)


def check_caption_kinds(kinds) -> tuple[str, ...]:
  """`kinds` as a tuple (ValueError naming it unless `valid_caption_kinds`)."""
  if not valid_caption_kinds(kinds):
    raise ValueError(
        f"synthetic caption_kinds must be one or more distinct ones of {', '.join(CAPTION_KINDS)}, got {kinds!r}"
    )
  return tuple(kinds)


def captions(
    seed: int, split: str, index: int, objs: list[Obj], num: int, kinds: tuple[str, ...] = CAPTION_KINDS
) -> list[tuple[str, list[int]]]:
  """`num` captions, each (text, indices of grounded words in text.split()), of templates drawn uniformly from
  `kinds` (CAPTION_KINDS)."""
  rng = _rng(seed, split, 2, index)
  out = []
  for _ in range(num):
    kind = CAPTION_KINDS.index(kinds[int(rng.integers(len(kinds)))])
    if kind == 1 and len(objs) >= 2:
      a, b = (objs[i] for i in rng.choice(len(objs), 2, replace=False))
      s = _Sentence().obj(a, size=bool(rng.integers(2))).add("is " + _REL_PHRASE[relation(a, b)])
      out.append(s.obj(b, size=bool(rng.integers(2))).done())
    elif kind == 2:
      s = _Sentence().add("the picture shows")
      for k, i in enumerate(rng.permutation(len(objs))):
        if k:
          s.add("and")
        s.obj(objs[i])
      out.append(s.done())
    else:
      o = objs[int(rng.integers(len(objs)))]
      out.append(_Sentence().add("there is").obj(o).add("in the " + POSITIONS[o.cell]).done())
  return out


def longest_text_words(schema: str, max_objects: int) -> int:
  """Words of the longest text the templates below can write for `schema` ('captions', 'vqa', 'nlvr2') in a
  world of at most `max_objects` objects per image; every word is one token of the world's vocab."""
  obj = 4  # "a large red circle"
  if schema == "captions":
    there_is = 2 + obj + 2 + 2  # "there is" OBJ "in the" "bottom left"
    relation = 2 * obj + len("is to the right of".split()) if max_objects >= 2 else 0
    shows = len("the picture shows".split()) + obj * max_objects + (max_objects - 1)  # OBJ "and" OBJ ...
    return max(there_is, relation, shows)
  if schema == "vqa":
    # "what shape is the red object" or, with two objects, "is the red circle to the left of the blue star"
    return 11 if max_objects >= 2 else 6
  if schema == "nlvr2":
    return len("there are more objects in the left image than in the right image".split())
  raise ValueError(f"synthetic schema must be captions, vqa or nlvr2, got {schema!r}")


def _answers(rng: np.random.Generator, truth: str, distractors: list[str]) -> list[str]:
  """10 annotator answers; 30% of questions get 1-4 dissenting annotators so soft scores matter."""
  answers = [truth] * 10
  if distractors and rng.uniform() < 0.3:
    for k in rng.choice(10, int(rng.integers(1, 5)), replace=False):
      answers[int(k)] = distractors[int(rng.integers(len(distractors)))]
  return answers


def questions(seed: int, split: str, index: int, objs: list[Obj], num: int) -> list[dict]:
  """`num` VQA questions: dicts with question, answers (10), question_type, answer_type."""
  rng = _rng(seed, split, 3, index)
  present = {(o.colour, o.shape) for o in objs}
  out = []
  for _ in range(num):
    kind = int(rng.integers(5))
    if kind == 4 and len(objs) < 2:
      kind = 3
    o = objs[int(rng.integers(len(objs)))]
    if kind == 0:
      q, truth, qt, at = f"what color is the {o.shape}", o.colour, "what color is the", "other"
      wrong = [c for c in COLOURS if c != truth]
    elif kind == 1:
      q, truth, qt, at = f"what shape is the {o.colour} object", o.shape, "what shape is the", "other"
      wrong = [s for s in SHAPES if s != truth]
    elif kind == 2:
      q, truth, qt, at = "how many objects are there", str(len(objs)), "how many", "number"
      wrong = [str(len(objs) + d) for d in (-1, 1) if len(objs) + d > 0]
    elif kind == 3:
      colour, shape = o.colour, o.shape
      if rng.integers(2):  # ask about something absent half of the time
        while (colour, shape) in present:
          colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
      truth = "yes" if (colour, shape) in present else "no"
      q, qt, at, wrong = f"is there a {colour} {shape}", "is there a", "yes/no", ["no" if truth == "yes" else "yes"]
    else:
      a, b = (objs[i] for i in rng.choice(len(objs), 2, replace=False))
      rel = relation(a, b) if rng.integers(2) else RELATIONS[int(rng.integers(4))]
      truth = "yes" if holds(rel, a, b) else "no"
      q = f"is the {a.colour} {a.shape} {_REL_PHRASE[rel]} the {b.colour} {b.shape}"
      qt, at, wrong = "is the", "yes/no", ["no" if truth == "yes" else "yes"]
    out.append({"question": q, "answers": _answers(rng, truth, wrong), "question_type": qt, "answer_type": at})
  return out


def _statement(rng, kind: int, left: list[Obj], right: list[Obj], want: bool) -> tuple[str, bool]:
  side, objs = (("left", left), ("right", right))[int(rng.integers(2))]
  pick = objs[int(rng.integers(len(objs)))]
  if kind == 0:
    colour, shape = pick.colour, pick.shape
    if not want:
      colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
    truth = any(o.colour == colour and o.shape == shape for o in objs)
    return f"the {side} image contains a {colour} {shape}", truth
  if kind == 1:
    shape = pick.shape if want else str(rng.choice(SHAPES))
    truth = any(o.shape == shape for o in left) and any(o.shape == shape for o in right)
    return f"both images contain a {shape}", truth
  if kind == 2:
    return "there are more objects in the left image than in the right image", len(left) > len(right)
  colour = pick.colour if want else str(rng.choice(list(COLOURS)))
  truth = any(o.colour == colour for o in left) != any(o.colour == colour for o in right)
  return f"exactly one image contains a {colour} object", truth


def nlvr2_statement(seed: int, split: str, index: int, left: list[Obj], right: list[Obj]) -> tuple[str, bool]:
  """A statement about the pair whose truth is index % 2 (exactly balanced labels)."""
  rng = _rng(seed, split, 4, index)
  want = index % 2 == 0
  for _ in range(64):
    text, truth = _statement(rng, int(rng.integers(4)), left, right, want)
    if truth == want:
      return text, truth
  # Kind 0 with a chosen colour/shape can always be made true or false.
  objs = left
  colour, shape = objs[0].colour, objs[0].shape
  if not want:
    colour = next(c for c in COLOURS if all(o.colour != c for o in objs))
  return f"the left image contains a {colour} {shape}", want


def nlvr2_partner(seed: int, split: str, index: int, num_images: int) -> int:
  """The second image of pair `index`: a different image of the same split."""
  rng = _rng(seed, split, 5, index)
  return (index + 1 + int(rng.integers(num_images - 1))) % num_images
