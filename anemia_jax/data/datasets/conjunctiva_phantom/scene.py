"""Scene model of the conjunctiva phantom: random eye geometry and appearance, and its rasterisation.

Geometry lives in an "eye frame" centred on the eye and rotated with the head: ``t`` runs from -1 (inner
corner, with the caruncle) to +1 (outer corner) and ``v`` points down, in units of the image height. Every
boundary is a curve ``v = f(t)``:

    upper lid  vul(t) < 0  <  lower edge of the visible globe  vU(t)  <  fornix/palpebral line  vM(t)
    <  lid margin  vL(t)  <  end of the margin  vE(t)

forniceal = ``vU <= v < vM``, palpebral = ``vM <= v < vL`` (both only where the everted lid shows them), so the
masks are exact and disjoint by construction and their union is the forniceal_palpebral region.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from anemia_jax.data.datasets.conjunctiva_phantom import raster

ASPECT = 0.75

# Camera white-balance gains (R, G, B) per site: PhantomA warm, PhantomB cool, as two phone models would be
# (mostly along the blue-yellow axis, so that the red/green balance that carries Hgb survives).
SITE_CAST = {"PhantomA": (1.04, 1.0, 0.88), "PhantomB": (0.97, 1.0, 1.08)}

# Skin tone anchors (light, medium, dark); PhantomA draws darker tones than PhantomB.
_SKIN_ANCHORS = np.array([[0.95, 0.78, 0.74], [0.82, 0.60, 0.50], [0.46, 0.30, 0.22]], np.float32)
_SKIN_RANGE = {"PhantomA": (0.35, 1.0), "PhantomB": (0.0, 0.55)}
_IRIS_COLOURS = np.array(
    [[0.20, 0.12, 0.07], [0.33, 0.20, 0.10], [0.42, 0.35, 0.18], [0.40, 0.50, 0.58], [0.30, 0.40, 0.28]], np.float32
)
_IRIS_PROBS = {"PhantomA": (0.6, 0.35, 0.05, 0.0, 0.0), "PhantomB": (0.2, 0.35, 0.2, 0.15, 0.1)}

# Conjunctival colour at redness 0 (severe anemia: pale pink) and 1 (high Hgb: deep red).
_CONJ_PALE = np.array([0.93, 0.74, 0.72], np.float32)
_CONJ_RED = np.array([0.74, 0.19, 0.21], np.float32)
_FORNIX_TINT = np.array([0.95, 0.80, 0.80], np.float32)
_VESSEL = np.array([0.52, 0.05, 0.09], np.float32)
# Gains turning a skin tone into flushed (blood-pink) skin: pink rather than orange so that hue alone cannot
# tell erythematous skin, the fingertip or the lid margin from the conjunctiva.
_ERYTHEMA = np.array([1.0, 0.55, 0.72], np.float32)


def _rgb(values) -> np.ndarray:
    return np.asarray(values, np.float32)


def redness_of_hgb(hgb: float) -> float:
    """Mean conjunctival redness in [0, 1] (0 pale pink, 1 deep red) for a haemoglobin of ``hgb`` g/dL."""
    return float(np.clip((hgb - 6.5) / 10.0, 0.0, 1.0))


@dataclasses.dataclass(frozen=True)
class Curve:
    """A smooth random 1-D perturbation of t, stored as an ``np.interp`` table."""

    nodes: np.ndarray
    values: np.ndarray

    @classmethod
    def sample(cls, rng: np.random.Generator) -> Curve:
        return cls(*raster.smooth_curve(rng))

    def __call__(self, t: np.ndarray) -> np.ndarray:
        return np.interp(t, self.nodes, self.values).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Scene:
    """Resolution-free description of one phantom photo (lengths in image heights, angles in radians)."""

    # Eye frame: centre, rotation, mirror (+1: inner corner on the left of the eye), half width.
    cx: float
    cy: float
    theta: float
    side: float
    half_width: float
    # Curve heights at the centre of the eye, and their perturbations.
    h_up: float
    h_lo: float
    forn: float
    palp: float
    margin: float
    amp_lo: float
    curve_up: Curve
    curve_lo: Curve
    curve_forn: Curve
    curve_palp: Curve
    span_centre: float
    span_half: float
    # Globe.
    sclera_rgb: np.ndarray
    sclera_vessels: float
    iris_u: float
    iris_v: float
    iris_r: float
    pupil_r: float
    iris_rgb: np.ndarray
    iris_fibres: int
    caruncle_rx: float
    caruncle_ry: float
    caruncle_v: float
    caruncle_rgb: np.ndarray
    # Conjunctiva.
    palp_rgb: np.ndarray
    forn_rgb: np.ndarray
    vessel_strength: float
    meibomian_period: float
    # Skin and finger.
    skin_rgb: np.ndarray
    skin_redness: float
    lid_redness: float
    crease: float
    finger: bool
    finger_x: float
    finger_y: float
    finger_r: float
    finger_angle: float
    finger_redness: float
    # Lashes: one row per lash of (t at the root, length, tilt, curl).
    lashes_low: np.ndarray
    lashes_up: np.ndarray
    # Camera.
    exposure: float
    light_dir: np.ndarray
    light_grad: float
    vignette: float
    hot_xy: np.ndarray
    hot_amp: float
    hot_r: float
    spec_thresh: float
    spec_amp: float
    cast: np.ndarray
    gamma: float
    blur: float
    noise: float


def _lashes(rng: np.random.Generator, count: int, length: tuple[float, float], tilt: float) -> np.ndarray:
    t = np.sort(rng.uniform(-0.93, 0.93, count))
    lengths = rng.uniform(*length, count) * (0.55 + 0.45 * raster.bump(t, 0.5))
    tilts = tilt * t + rng.normal(0.0, 0.12, count)
    curls = rng.normal(0.18, 0.08, count) * np.sign(t + 1e-6)
    return np.stack([t, lengths, tilts, curls], axis=1).astype(np.float32)


def sample_scene(rng: np.random.Generator, meta: dict) -> Scene:
    """Draws a random scene for a subject with metadata ``meta`` (keys country, hgb; see `phantom`)."""
    country = meta["country"]
    zoom = rng.uniform(0.75, 1.25)  # camera distance: scales every length of the eye
    half_width = zoom * rng.uniform(0.27, 0.37)
    h_up, h_lo = zoom * rng.uniform(0.08, 0.15), zoom * rng.uniform(0.03, 0.07)
    forn, palp = zoom * rng.uniform(0.035, 0.08), zoom * rng.uniform(0.06, 0.13)
    margin = zoom * rng.uniform(0.016, 0.028)
    cx, cy = 0.375 + rng.normal(0.0, 0.03), rng.uniform(0.28, 0.45)
    span_centre = rng.normal(0.0, 0.05)
    span_half = min(rng.uniform(0.8, 0.95), 0.97 - abs(span_centre))
    iris_r = half_width * rng.uniform(0.36, 0.44)
    redness = float(np.clip(redness_of_hgb(meta["hgb"]) + rng.normal(0.0, 0.05), 0.0, 1.0))
    palp_rgb = _CONJ_PALE + (_CONJ_RED - _CONJ_PALE) * redness + rng.normal(0.0, [0.02, 0.025, 0.035])
    skin_t = rng.uniform(*_SKIN_RANGE[country])
    skin_rgb = np.array([np.interp(skin_t, [0.0, 0.5, 1.0], _SKIN_ANCHORS[:, c]) for c in range(3)])
    finger_r = zoom * rng.uniform(0.12, 0.2)
    light = rng.normal(size=2)
    scene = Scene(
        cx=cx,
        cy=cy,
        theta=float(np.clip(rng.normal(0.0, 0.1), -0.22, 0.22)),
        side=float(rng.choice([-1.0, 1.0])),
        half_width=half_width,
        h_up=h_up,
        h_lo=h_lo,
        forn=forn,
        palp=palp,
        margin=margin,
        amp_lo=rng.uniform(0.0, 0.25) * h_lo,
        curve_up=Curve.sample(rng),
        curve_lo=Curve.sample(rng),
        curve_forn=Curve.sample(rng),
        curve_palp=Curve.sample(rng),
        span_centre=span_centre,
        span_half=span_half,
        sclera_rgb=np.array([0.93, 0.91, 0.86]) + rng.normal(0.0, 0.015, 3) + [0.0, 0.0, -rng.uniform(0.0, 0.03)],
        sclera_vessels=rng.uniform(0.2, 1.0),
        iris_u=rng.normal(0.0, 0.12) * half_width,
        iris_v=-h_up * rng.uniform(0.1, 0.8),
        iris_r=iris_r,
        pupil_r=iris_r * rng.uniform(0.3, 0.45),
        iris_rgb=_IRIS_COLOURS[rng.choice(len(_IRIS_COLOURS), p=_IRIS_PROBS[country])] * rng.uniform(0.85, 1.15),
        iris_fibres=int(rng.integers(40, 80)),
        caruncle_rx=half_width * rng.uniform(0.10, 0.16),
        caruncle_ry=zoom * rng.uniform(0.016, 0.028),
        caruncle_v=rng.uniform(-0.004, 0.01),
        # Independent of Hgb on purpose: a red blob next to a pale conjunctiva defeats colour rules.
        caruncle_rgb=np.array([0.90, 0.55, 0.55]) + (np.array([-0.12, -0.25, -0.22]) * rng.uniform()),
        palp_rgb=palp_rgb,
        forn_rgb=0.72 * palp_rgb + 0.28 * _FORNIX_TINT,
        vessel_strength=rng.uniform(0.25, 0.6),
        meibomian_period=rng.uniform(0.010, 0.016),
        skin_rgb=skin_rgb,
        skin_redness=rng.uniform(0.0, 0.6),
        lid_redness=rng.uniform(0.1, 0.6),
        crease=rng.uniform(0.03, 0.06),
        finger=bool(rng.random() < 0.75),
        finger_x=cx + rng.normal(0.0, 0.06),
        finger_y=cy + 1.2 * (h_lo + forn + palp + margin) + rng.uniform(0.0, 0.06) + finger_r,
        finger_r=finger_r,
        finger_angle=rng.normal(0.0, 0.25),
        finger_redness=rng.uniform(0.1, 0.6),
        lashes_low=_lashes(rng, int(rng.integers(18, 36)), (0.025 * zoom, 0.06 * zoom), rng.uniform(0.5, 1.0)),
        lashes_up=_lashes(rng, int(rng.integers(35, 70)), (0.04 * zoom, 0.08 * zoom), rng.uniform(0.6, 1.1)),
        exposure=rng.uniform(0.75, 1.15),
        light_dir=light / (np.linalg.norm(light) + 1e-6),
        light_grad=rng.uniform(0.0, 1.2),
        vignette=rng.uniform(0.1, 0.6),
        hot_xy=np.array([rng.uniform(0.0, ASPECT), rng.uniform(0.0, 1.0)]),
        hot_amp=rng.uniform(0.0, 0.25),
        hot_r=rng.uniform(0.1, 0.3),
        spec_thresh=rng.uniform(1.6, 2.4),
        spec_amp=rng.uniform(0.3, 0.8),
        cast=np.array(SITE_CAST[country]) * (1.0 + rng.normal(0.0, [0.03, 0.03, 0.05])),
        gamma=rng.uniform(0.85, 1.15),
        blur=rng.uniform(0.0, 0.004),
        noise=rng.uniform(0.006, 0.03),
    )
    # float32 everywhere: one float64 colour would silently double the cost of every image-sized operation.
    arrays = {f.name: getattr(scene, f.name) for f in dataclasses.fields(scene)}
    return dataclasses.replace(
        scene, **{k: np.asarray(a, np.float32) for k, a in arrays.items() if isinstance(a, np.ndarray)}
    )


def eye_curves(s: Scene, t: np.ndarray) -> dict[str, np.ndarray]:
    """The boundary curves ``v = f(t)`` of the eye (see module docstring), same shape as ``t``."""
    vul = -s.h_up * raster.bump(t, 0.55) * (1.0 + 0.08 * s.curve_up(t))
    v_u = s.h_lo * raster.bump(t, 0.6) + s.amp_lo * s.curve_lo(t) * raster.bump(t, 1.0)
    profile = raster.bump((t - s.span_centre) / s.span_half, 0.7)
    forn = s.forn * profile * np.clip(1.0 + 0.3 * s.curve_forn(t), 0.3, None)
    palp = s.palp * profile * np.clip(1.0 + 0.25 * s.curve_palp(t), 0.3, None)
    margin = s.margin * (0.4 + 0.6 * raster.bump(t, 0.5)) * raster.bump(t / 1.08, 0.2)
    v_m = v_u + forn
    v_l = v_m + palp
    return dict(vul=vul, vU=v_u, vM=v_m, vL=v_l, vE=v_l + margin, margin=margin)


def _to_image_xy(s: Scene, t: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Eye-frame (t, v) -> image (x, y) in height units; inverse of the mapping in `render`."""
    u = s.side * t * s.half_width
    c, sn = math.cos(s.theta), math.sin(s.theta)
    return np.stack([s.cx + c * u - sn * v, s.cy + sn * u + c * v], axis=-1)


def _lash_layer(s: Scene, lashes: np.ndarray, root_v: np.ndarray, down: float, height: int, width: int) -> np.ndarray:
    """Darkness in [0, 1] of one row of lashes rooted at ``(t, root_v)`` growing towards ``down`` (+1 or -1)."""
    t0, length, tilt, curl = (lashes[:, i : i + 1] for i in range(4))
    n = max(8, int(math.ceil(float(length.max()) * height * 2.5)))
    sigma = np.linspace(0.0, 1.0, n)[None, :]
    # In the eye frame (t scaled to height units), a lash leaves the lid at angle `tilt` from the vertical.
    dt = (sigma * np.sin(tilt) + sigma**2 * curl * np.cos(tilt)) * length
    dv = (sigma * np.cos(tilt) - sigma**2 * curl * np.abs(np.sin(tilt))) * length * down
    pts = _to_image_xy(s, t0 + dt / s.half_width, root_v[:, None] + dv).reshape(-1, 2)
    taper = np.broadcast_to(1.0 - 0.75 * sigma, dt.shape)
    weight = (taper / (n / (length * height))).reshape(-1)
    blur_px = max(0.5, 0.5 * 0.0035 * height)
    density = raster.splat_strokes(pts, weight, height, width, blur_px)
    return np.clip(density * math.sqrt(2 * math.pi) * blur_px * 0.9, 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class _Grid:
    """Pixel-centre coordinates of a window of the image: image (xs, ys) and eye frame (v, t, ue), height units."""

    height: int  # of the whole image: edge widths are in its pixels
    xs: np.ndarray  # [1, w]
    ys: np.ndarray  # [h, 1]
    v: np.ndarray  # [h, w], down from the eye centre
    t: np.ndarray  # [h, w], -1 inner corner .. +1 outer corner
    ue: np.ndarray  # [h, w], t in height units
    cv: dict[str, np.ndarray]  # some of the eye curves (`eye_curves`) at every pixel, [h, w] each

    def band(self, top: np.ndarray, bottom: np.ndarray, edge_px: float) -> np.ndarray:
        """Coverage of ``top <= v < bottom``; it fades out where the band is thinner than a pixel, so the
        zero-thickness band outside the eye does not leave a half-covered line across the image."""
        cover = raster.inside(np.minimum(self.v - top, bottom - self.v), edge_px, self.height)
        return cover * np.clip((bottom - top) * self.height, 0.0, 1.0)


_T_NODES = np.linspace(-1.5, 1.5, 2049, dtype=np.float32)


def _make_grid(s: Scene, height: int, window: tuple[slice, slice], curves: tuple[str, ...]) -> _Grid:
    """The `_Grid` of pixel rows/columns ``window`` with the eye curves named in ``curves``."""
    ys = ((np.arange(window[0].start, window[0].stop, dtype=np.float32) + 0.5) / height)[:, None]
    xs = ((np.arange(window[1].start, window[1].stop, dtype=np.float32) + 0.5) / height)[None, :]
    c, sn = math.cos(s.theta), math.sin(s.theta)
    u = c * (xs - s.cx) + sn * (ys - s.cy)
    v = -sn * (xs - s.cx) + c * (ys - s.cy)
    t = s.side * u / s.half_width
    # The curves depend on t only: tabulate them finely once and interpolate linearly, sharing the
    # (uniform-grid) indices and weights between curves, rather than evaluating them per pixel.
    table = eye_curves(s, _T_NODES)
    pos = np.clip((t - _T_NODES[0]) / (_T_NODES[1] - _T_NODES[0]), 0.0, len(_T_NODES) - 1.001)
    index = pos.astype(np.int32)
    frac = pos - index
    cv = {k: table[k][index] + (table[k][index + 1] - table[k][index]) * frac for k in curves}
    return _Grid(height=height, xs=xs, ys=ys, v=v, t=t, ue=t * s.half_width, cv=cv)


def _eye_window(s: Scene, height: int, width: int) -> tuple[slice, slice]:
    """Rows and columns of the image that can hold the globe, conjunctiva, lid margin or caruncle.

    The bounding box of the eye-frame rectangle |t| <= 1.1, min(vul) - 0.05 <= v <= max(vE) + 0.05; painting
    those layers only there is exact (their coverage is 0 outside) and several times cheaper.
    """
    table = eye_curves(s, _T_NODES)
    u = np.array([-1.1, 1.1, -1.1, 1.1]) * s.half_width
    v = np.array([table["vul"].min() - 0.05] * 2 + [table["vE"].max() + 0.05] * 2)
    c, sn = math.cos(s.theta), math.sin(s.theta)
    x, y = (s.cx + c * u - sn * v) * height, (s.cy + sn * u + c * v) * height
    rows = slice(int(np.clip(np.floor(y.min()), 0, height)), int(np.clip(np.ceil(y.max()), 0, height)))
    cols = slice(int(np.clip(np.floor(x.min()), 0, width)), int(np.clip(np.ceil(x.max()), 0, width)))
    return rows, cols


def _paint_skin(img: np.ndarray, s: Scene, g: _Grid, f: dict[str, np.ndarray]) -> None:
    """Skin tone, blotches, pores, erythema (strongest on the pulled lower lid), lid folds and crease."""
    v, t, cv = g.v, g.t, g.cv
    img *= (1.0 + 0.06 * f["lum"] + 0.025 * f["pores"])[..., None]
    near_lid = np.exp(-np.clip(v - cv["vE"], 0.0, None) / 0.06) * (v > cv["vul"]) * raster.bump(t / 1.4, 1.0)
    red = s.skin_redness * np.clip(0.7 * f["red"] + 0.3, 0.0, 1.5) + s.lid_redness * near_lid
    raster.mix(img, s.skin_rgb * _ERYTHEMA, np.clip(red, 0.0, 0.8))
    below = v - cv["vE"] - s.crease * raster.bump(t / 1.3, 0.5)
    folds = raster.gauss((np.mod(below, 0.035) - 0.0175) / 0.004) * (below > 0) * np.exp(-np.abs(below) / 0.06)
    img *= (1.0 - 0.12 * folds * raster.bump(t / 1.3, 1.0))[..., None]
    v_crease = cv["vul"] - s.crease * raster.bump(t / 1.25, 0.5)
    img *= (1.0 - 0.25 * raster.gauss((v - v_crease) / 0.008) * raster.bump(t / 1.25, 0.5))[..., None]
    lid_shadow = np.exp(-np.clip(cv["vul"] - v, 0.0, None) / 0.02) * (v < cv["vul"]) * raster.bump(t, 0.5)
    img *= (1.0 - 0.3 * lid_shadow)[..., None]


def _paint_finger(img: np.ndarray, s: Scene, g: _Grid, f: dict[str, np.ndarray]) -> None:
    """A fingertip (a capsule from its tip down out of the frame) pulling the lower lid, with its shadow."""
    fa, fb = math.cos(s.finger_angle), math.sin(s.finger_angle)
    along = (g.xs - s.finger_x) * fb + (g.ys - s.finger_y) * fa
    across = (g.xs - s.finger_x) * fa - (g.ys - s.finger_y) * fb
    dist = np.sqrt(across**2 + np.minimum(along, 0.0) ** 2)
    cover = raster.inside(s.finger_r - dist, 1.5, g.height)
    img *= (1.0 - 0.35 * np.exp(-np.clip(dist - s.finger_r, 0.0, None) / 0.02) * (1.0 - cover))[..., None]
    shade = 0.7 + 0.3 * np.sqrt(np.clip(1.0 - (dist / s.finger_r) ** 2, 0.0, 1.0))
    finger = s.skin_rgb * _rgb([1.0, 0.9, 0.88]) * (1.0 + 0.03 * f["pores"])[..., None]
    raster.mix(finger, s.skin_rgb * _ERYTHEMA, np.full_like(shade, s.finger_redness))
    raster.mix(img, finger * shade[..., None], cover)


def _paint_globe(img: np.ndarray, s: Scene, g: _Grid, f: dict[str, np.ndarray]) -> np.ndarray:
    """Sclera with vessels, iris, pupil and corneal reflex, then the caruncle; returns the cornea's coverage."""
    v, t, ue, cv = g.v, g.t, g.ue, g.cv
    shade = (1.0 - 0.35 * t**2) * (1.0 - 0.3 * np.exp(-np.clip(v - cv["vul"], 0, None) / 0.02))
    globe = s.sclera_rgb * shade[..., None]
    vessels = raster.ridges(f["ves_sclera"], 0.05) * np.clip(0.15 + np.abs(t) ** 1.5, 0.0, 1.0) * s.sclera_vessels
    raster.mix(globe, (0.78, 0.28, 0.28), 0.6 * vessels)
    r = np.sqrt((ue - s.iris_u) ** 2 + (v - s.iris_v) ** 2)
    fibres = 0.5 + 0.5 * np.sin(np.arctan2(v - s.iris_v, ue - s.iris_u) * s.iris_fibres + 2.5 * f["iris"])
    limbus = 1.0 - 0.5 * np.exp(-np.clip(s.iris_r - r, 0.0, None) / (0.12 * s.iris_r))
    iris = s.iris_rgb * ((0.75 + 0.35 * fibres) * limbus)[..., None]
    raster.mix(globe, iris, raster.inside(s.iris_r - r, 1.0, g.height))
    raster.mix(globe, (0.03, 0.03, 0.035), raster.inside(s.pupil_r - r, 1.0, g.height))
    reflex_d2 = (ue - s.iris_u + 0.35 * s.iris_r) ** 2 + (v - s.iris_v + 0.3 * s.iris_r) ** 2
    globe += (0.8 * raster.gauss(np.sqrt(reflex_d2) / (0.1 * s.iris_r)) * (r < s.iris_r))[..., None]
    a_globe = g.band(cv["vul"], cv["vU"], 1.2)
    raster.mix(img, globe, a_globe)
    car = 1.0 - np.sqrt(((ue + 0.9 * s.half_width) / s.caruncle_rx) ** 2 + ((v - s.caruncle_v) / s.caruncle_ry) ** 2)
    caruncle = s.caruncle_rgb * (1.0 + 0.08 * f["tex"])[..., None]
    raster.mix(img, caruncle, raster.inside(car * min(s.caruncle_rx, s.caruncle_ry), 1.5, g.height))
    return (r < s.iris_r) * a_globe


def _paint_conjunctiva(img: np.ndarray, s: Scene, g: _Grid, f: dict[str, np.ndarray]) -> np.ndarray:
    """Forniceal (paler, more vessels, in the shadow of the fold) blending into palpebral; returns coverage."""
    v, t, cv = g.v, g.t, g.cv
    beta = raster.inside(v - cv["vM"], 3.0, g.height)  # 0 forniceal .. 1 palpebral
    conj = s.forn_rgb * (1.0 - beta)[..., None] + s.palp_rgb * beta[..., None]
    shade = (1.0 - 0.3 * np.exp(-np.clip(v - cv["vU"], 0, None) / (0.3 * s.forn))) * (1.0 - 0.2 * t**2)
    conj *= (shade * (1.0 + 0.05 * f["tex"]))[..., None]
    vessels = 0.6 * raster.ridges(f["ves1"], 0.10) + 0.4 * raster.ridges(f["ves2"], 0.07)
    raster.mix(conj, _VESSEL, vessels * s.vessel_strength * (1.0 - 0.5 * beta))
    # Meibomian glands: faint yellowish vertical streaks shining through near the lid margin.
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * g.ue / s.meibomian_period + 1.5 * f["tex"])
    glands = stripes * beta * np.exp(-np.clip(cv["vL"] - v, 0, None) / (0.35 * s.palp))
    raster.mix(conj, (0.92, 0.78, 0.55), 0.18 * glands)
    a_conj = g.band(cv["vU"], cv["vL"], 1.2)
    raster.mix(img, conj, a_conj)
    return a_conj


def _paint_margin(img: np.ndarray, s: Scene, g: _Grid) -> np.ndarray:
    """The lid margin with its grey line; returns its coverage."""
    cv = g.cv
    a_margin = g.band(cv["vL"], cv["vE"], 1.0)
    margin_rgb = 0.5 * s.skin_rgb * _rgb([1.0, 0.8, 0.78]) + 0.5 * _rgb([0.8, 0.5, 0.48])
    grey_line = 1.0 - 0.25 * raster.gauss((g.v - cv["vL"] - 0.55 * cv["margin"]) / (0.15 * cv["margin"] + 1e-4))
    raster.mix(img, margin_rgb * grey_line[..., None], a_margin)
    return a_margin


def _paint_lashes(img: np.ndarray, s: Scene) -> None:
    """Lower lashes from the lid margin and upper lashes from the upper lid."""
    height, width = img.shape[:2]
    low, up = s.lashes_low, s.lashes_up
    low_curves, up_curves = eye_curves(s, low[:, 0]), eye_curves(s, up[:, 0])
    lash = np.maximum(
        _lash_layer(s, low, low_curves["vE"] - 0.3 * low_curves["margin"], +1.0, height, width),
        _lash_layer(s, up, up_curves["vul"] - 0.002, -1.0, height, width),
    )
    raster.mix(img, (0.07, 0.05, 0.045), lash)


def _camera(img: np.ndarray, s: Scene, g: _Grid, f: dict[str, np.ndarray], wet: np.ndarray, rng) -> np.ndarray:
    """Specular highlights on wet tissue, lighting, colour cast, tone curve, defocus and sensor noise -> uint8."""
    img += (s.spec_amp * np.clip((f["spec"] - s.spec_thresh) * 3.0, 0.0, 1.0) * np.clip(wet, 0, 1))[..., None]
    dx, dy = g.xs - 0.5 * ASPECT, g.ys - 0.5
    ramp = 1.0 + s.light_grad * (dx * s.light_dir[0] + dy * s.light_dir[1])
    vignette = 1.0 - s.vignette * (dx**2 + dy**2) / 0.39
    hot = s.hot_amp * raster.gauss(np.sqrt((g.xs - s.hot_xy[0]) ** 2 + (g.ys - s.hot_xy[1]) ** 2) / (1.414 * s.hot_r))
    img *= (s.exposure * ramp * vignette * (1.0 + 0.06 * f["light"]) + hot)[..., None]
    img *= s.cast
    img = raster.gaussian_blur(img, s.blur * g.height)
    height, width = img.shape[:2]
    img += s.noise * rng.standard_normal((height, width, 1), dtype=np.float32)  # luminance noise
    img += 0.4 * s.noise * rng.standard_normal((height, width, 3), dtype=np.float32)  # chroma noise
    # Tone curve last, through a lookup table: a per-pixel power would be the costliest operation here.
    levels = 4096
    tone = np.round(np.linspace(0.0, 1.0, levels) ** s.gamma * 255.0).astype(np.uint8)
    return tone[(np.clip(img, 0.0, 1.0) * (levels - 1) + 0.5).astype(np.int32)]


# Random fields drawn for every image, in this order, with their number of features per image height.
_FIELDS = (
    ("lum", 6), ("red", 4), ("pores", 90), ("ves1", 22), ("ves2", 45),
    ("ves_sclera", 26), ("tex", 60), ("spec", 30), ("light", 2), ("iris", 40),
)


def render(
    s: Scene, height: int, width: int, *, field_rng: np.random.Generator, pixel_rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Rasterises scene ``s``: uint8 image ``[H, W, 3]`` and uint8 {0, 1} masks ``[H, W]`` by name.

    Layers are painted back to front (skin, finger, globe, conjunctiva, lid margin and lashes) onto a float32
    canvas, the eye's layers only inside `_eye_window`; the masks are the exact sets between the same curves
    the conjunctiva is painted from.
    """
    fields = {name: raster.smooth_field(field_rng, height, width, cells, ASPECT) for name, cells in _FIELDS}
    g = _make_grid(s, height, (slice(0, height), slice(0, width)), ("vul", "vE"))
    img = np.broadcast_to(s.skin_rgb, (height, width, 3)).copy()
    _paint_skin(img, s, g, fields)
    if s.finger:
        _paint_finger(img, s, g, fields)

    window = _eye_window(s, height, width)
    eye_grid = _make_grid(s, height, window, ("vul", "vU", "vM", "vL", "vE", "margin"))
    eye, eye_fields = img[window], {k: f[window] for k, f in fields.items()}  # views: painted in place
    wet = np.zeros((height, width), np.float32)  # where specular highlights can appear
    wet[window] = _paint_globe(eye, s, eye_grid, eye_fields)
    wet[window] += np.maximum(_paint_conjunctiva(eye, s, eye_grid, eye_fields), _paint_margin(eye, s, eye_grid))
    _paint_lashes(img, s)
    image = _camera(img, s, g, fields, wet, pixel_rng)

    v, cv = eye_grid.v, eye_grid.cv
    masks = {}
    for name, region in (
        ("palpebral", (v >= cv["vM"]) & (v < cv["vL"])),
        ("forniceal", (v >= cv["vU"]) & (v < cv["vM"])),
        ("forniceal_palpebral", (v >= cv["vU"]) & (v < cv["vL"])),
    ):
        masks[name] = np.zeros((height, width), np.uint8)
        masks[name][window] = region
    return image, masks
