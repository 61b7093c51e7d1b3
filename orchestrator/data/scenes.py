"""Scenes of several Twemoji, for the claim Llip makes: images that many different captions describe.

A scene is a grid of `grid` x `grid` cells of `cell` px; 1..N cells hold an emoji (composited on
white at the cell's size), the rest stay white. Each object gets one caption, its CLDR name
("dog face"), so an image of m objects has m true captions and a one-vector model must sit near all
of them at once. The names are the scene's default captions (`data.captions: one` draws one per
epoch); the combined caption naming every object in reading order ("dog face and rocket") is stored
as an extra perspective, outside that draw.

Concepts: one record per emoji concept (skin-tone variants are one concept; Unicode's "component"
group, skin-tone swatches and hair pieces, is left out), a seeded choice of `concepts` of them (the
pool), and optionally `heldout_concepts` more that no training scene shows.

Splits, all from one seed, byte-reproducible:
  train         `train_scenes` scenes, m uniform in [min_objects, max_objects], objects and cells
                uniform without replacement;
  eval          `eval_scenes` scenes, m balanced over [min_objects, max_objects], whose sets of
                objects (m >= 2) never occur in training: new combinations of the same concepts. A
                one-object eval scene is a pool concept alone, which training shows too (in its own
                cells): m = 1 measures recognition, novelty starts at m = 2;
  eval_heldout  (heldout_concepts > 0) scenes with at least one held-out concept, the others from
                the pool and the held-out concepts.

Writing them (`llip shards emoji-scenes`) is orchestrator/data/shards.py's: training shards as
`llip shards emoji` writes them, eval sets in clip_benchmark's retrieval layout
(orchestrator/data/evalsets.py) with every object's caption on its own line.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from orchestrator.data.sources import Sample, emoji_records
from orchestrator.errors import UserError

DEFAULTS = {"grid": 2, "cell": 16, "min_objects": 1, "max_objects": 4, "concepts": 200, "heldout_concepts": 0,
            "train_scenes": 10_000, "eval_scenes": 2_000}
MIN_CELL = 4
_TRAIN_ATTEMPTS = 100  # draws per training scene before the pool is judged too small for new eval combinations


@dataclass(frozen=True)
class SceneOptions:
    grid: int = DEFAULTS["grid"]
    cell: int = DEFAULTS["cell"]
    min_objects: int = DEFAULTS["min_objects"]
    max_objects: int = DEFAULTS["max_objects"]
    concepts: int = DEFAULTS["concepts"]
    heldout_concepts: int = DEFAULTS["heldout_concepts"]
    train_scenes: int = DEFAULTS["train_scenes"]
    eval_scenes: int = DEFAULTS["eval_scenes"]
    seed: int = 0

    @property
    def image_size(self) -> int:
        return self.grid * self.cell

    def check(self, available: Optional[int] = None) -> None:
        """One line naming the option for a layout that cannot hold the objects, or a pool too small."""
        if self.grid < 1:
            raise UserError(f"--grid {self.grid}: must be at least 1 (cells per side)")
        if self.cell < MIN_CELL:
            raise UserError(f"--cell {self.cell}: cells need at least {MIN_CELL} px")
        if self.min_objects < 1:
            raise UserError(f"--min-objects {self.min_objects}: a scene holds at least 1 object")
        if self.min_objects > self.max_objects:
            raise UserError(f"--min-objects {self.min_objects} is above --max-objects {self.max_objects}; "
                            "lower --min-objects")
        cells = self.grid * self.grid
        if self.max_objects > cells:
            raise UserError(f"--max-objects {self.max_objects}: a {self.grid}x{self.grid} grid (--grid {self.grid}) "
                            f"holds at most {cells} objects, one per cell; lower --max-objects or raise --grid")
        if self.concepts < self.max_objects:
            raise UserError(f"--concepts {self.concepts}: scenes of up to {self.max_objects} different objects "
                            f"need at least {self.max_objects} concepts; raise --concepts or lower --max-objects")
        if self.heldout_concepts < 0:
            raise UserError(f"--heldout-concepts {self.heldout_concepts}: must be 0 or more")
        for flag, n in (("--train-scenes", self.train_scenes), ("--eval-scenes", self.eval_scenes)):
            if n < 1:
                raise UserError(f"{flag} {n}: must be at least 1")
        if available is not None and self.concepts + self.heldout_concepts > available:
            raise UserError(f"--concepts {self.concepts} + --heldout-concepts {self.heldout_concepts}: only "
                            f"{available:,} emoji concepts exist; lower them")


@dataclass(frozen=True)
class Concept:
    name: str  # the CLDR name: the object's caption
    code: str  # the Twemoji file stem
    path: str


@dataclass(frozen=True)
class Scene:
    """Objects in reading order: concept indices (into the concept list) and their cells (row-major)."""
    concepts: tuple[int, ...]
    cells: tuple[int, ...]


def emoji_concepts() -> list[Concept]:
    """One Concept per emoji concept, sorted by code: the record without a skin-tone modifier when
    there is one; Unicode's "component" group (skin-tone swatches, hair pieces) left out."""
    by_concept: dict[str, dict] = {}
    for r in emoji_records():
        if r.get("group") == "component":
            continue
        chars = "".join(chr(int(h, 16)) for h in r["code"].split("-")).replace("\ufe0f", "")
        plain = chars == r["concept"]
        cur = by_concept.get(r["concept"])
        if cur is None or (plain and not cur["_plain"]) or (plain == cur["_plain"] and r["code"] < cur["code"]):
            by_concept[r["concept"]] = {**r, "_plain": plain}
    seen: set[str] = set()
    out = []
    for r in sorted(by_concept.values(), key=lambda r: r["code"]):
        name = r["captions"][0]
        if name.lower() in seen:  # two concepts with one name would be one text
            continue
        seen.add(name.lower())
        out.append(Concept(name=name, code=r["code"], path=r["path"]))
    return out


def _draw(rng: np.random.Generator, choices: np.ndarray, m: int, cells: int) -> Scene:
    objs = rng.choice(choices, size=m, replace=False)
    where = rng.permutation(cells)[:m]
    order = np.argsort(where)
    return Scene(tuple(int(objs[i]) for i in order), tuple(int(where[i]) for i in order))


def compose(opts: SceneOptions, n_concepts: int) -> tuple[list[int], list[int], dict[str, list[Scene]]]:
    """(pool concept indices, held-out concept indices, {"train", "eval"[, "eval_heldout"]: scenes})
    over a concept list of n_concepts, as the module docstring says. Pure and seeded."""
    opts.check(n_concepts)
    order = np.random.default_rng([opts.seed, 0]).permutation(n_concepts)
    pool = sorted(int(i) for i in order[:opts.concepts])
    held = sorted(int(i) for i in order[opts.concepts:opts.concepts + opts.heldout_concepts])
    cells = opts.grid * opts.grid
    ms = list(range(opts.min_objects, opts.max_objects + 1))
    pool_a = np.asarray(pool)

    rng = np.random.default_rng([opts.seed, 1])
    evals = [_draw(rng, pool_a, ms[i % len(ms)], cells) for i in range(opts.eval_scenes)]
    eval_sets = {frozenset(s.concepts) for s in evals if len(s.concepts) >= 2}

    rng = np.random.default_rng([opts.seed, 2])
    train = []
    for _ in range(opts.train_scenes):
        for _attempt in range(_TRAIN_ATTEMPTS):
            s = _draw(rng, pool_a, int(rng.integers(opts.min_objects, opts.max_objects + 1)), cells)
            if len(s.concepts) < 2 or frozenset(s.concepts) not in eval_sets:
                break
        else:
            raise UserError(f"--concepts {opts.concepts}: too few concepts to keep {opts.eval_scenes} evaluation "
                            "scenes' combinations out of training; raise --concepts or lower --eval-scenes")
        train.append(s)
    out = {"train": train, "eval": evals}

    if held:
        rng = np.random.default_rng([opts.seed, 3])
        both = np.asarray(sorted(pool + held))
        hs = []
        for i in range(opts.eval_scenes):
            m = ms[i % len(ms)]
            first = int(rng.choice(np.asarray(held)))
            rest = rng.choice(both[both != first], size=m - 1, replace=False) if m > 1 else np.array([], dtype=int)
            objs = np.concatenate([[first], rest]).astype(int)
            where = rng.permutation(cells)[:m]
            o = np.argsort(where)
            hs.append(Scene(tuple(int(objs[j]) for j in o), tuple(int(where[j]) for j in o)))
        out["eval_heldout"] = hs
    return pool, held, out


def combined_caption(names: list[str]) -> str:
    """"a", "a and b", "a, b and c": every object of a scene, in reading order."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


class Renderer:
    """Scenes as PNG bytes: each concept's PNG composited on white once and resized to the cell
    (Lanczos), pasted into a white canvas. Deterministic: same inputs, same bytes."""

    def __init__(self, concepts: list[Concept], grid: int, cell: int):
        self.concepts, self.grid, self.cell = concepts, grid, cell
        self._tiles: dict[int, object] = {}

    def tile(self, i: int):
        from PIL import Image

        if i not in self._tiles:
            with Image.open(self.concepts[i].path) as im:
                rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgb = Image.alpha_composite(white, rgba).convert("RGB")
            self._tiles[i] = rgb.resize((self.cell, self.cell), Image.Resampling.LANCZOS)
        return self._tiles[i]

    def image(self, scene: Scene):
        from PIL import Image

        size = self.grid * self.cell
        canvas = Image.new("RGB", (size, size), (255, 255, 255))
        for c, cell in zip(scene.concepts, scene.cells):
            row, col = divmod(cell, self.grid)
            canvas.paste(self.tile(c), (col * self.cell, row * self.cell))
        return canvas

    def png(self, scene: Scene) -> bytes:
        buf = io.BytesIO()
        self.image(scene).save(buf, format="PNG", optimize=False, compress_level=6)
        return buf.getvalue()


def _sample(key: str, scene: Scene, concepts: list[Concept], render: Renderer) -> Sample:
    names = [concepts[c].name for c in scene.concepts]
    load: Callable[[], tuple[bytes, str]] = lambda: (render.png(scene), "png")  # noqa: E731
    extra = [("scene", combined_caption(names))] if len(names) > 1 else []
    return Sample(key_hint=key, captions=names, load=load, perspectives=["object"] * len(names), extra=extra)


def scene_splits(opts: SceneOptions, concepts: Optional[list[Concept]] = None
                 ) -> tuple[dict[str, list[Sample]], dict]:
    """Samples per split ("train", "eval", and "eval_heldout" when concepts are held out) and the
    manifest's description of them (options, concepts by name, scenes per number of objects)."""
    concepts = emoji_concepts() if concepts is None else concepts
    pool, held, scenes = compose(opts, len(concepts))
    render = Renderer(concepts, opts.grid, opts.cell)
    splits = {split: [_sample(f"{split}-{i:06d}", s, concepts, render) for i, s in enumerate(ss)]
              for split, ss in scenes.items()}
    per_m = {split: {str(m): sum(1 for s in ss if len(s.concepts) == m)
                     for m in range(opts.min_objects, opts.max_objects + 1)} for split, ss in scenes.items()}
    meta = {"scenes": {"grid": opts.grid, "cell": opts.cell, "image_size": opts.image_size,
                       "min_objects": opts.min_objects, "max_objects": opts.max_objects, "seed": opts.seed,
                       "scenes_per_objects": per_m,
                       "concepts": [concepts[i].name for i in pool],
                       "heldout_concepts": [concepts[i].name for i in held]}}
    return splits, meta
