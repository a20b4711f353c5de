"""Rendering a :class:`~radgen.data.synth.case.Case` into a frontal chest radiograph phantom.

The model is a projection radiograph: every structure adds to a line-integral "density" map ``D``
(soft tissue, air removes density in the lungs, bone and metal add a lot), and the detector shows
``1 - exp(-k D)`` (bright = dense, as radiographs are displayed), followed by exposure, processing
(gamma, unsharp masking), quantum noise, collimation and an optional side marker.

Geometry lives in *body coordinates* (thorax centred at 0, ``x`` to the image right = the
patient's left in a standard frontal view, ``y`` down); the case's pose (scale, shift, rotation,
habitus aspect) maps image pixels into them, so no finding sits at a fixed pixel location.
Everything is vectorised numpy on the pixel grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from radgen.data.synth.case import Case

# Label-map values written as the segmentation mask.
MASK_BACKGROUND, MASK_RIGHT_LUNG, MASK_LEFT_LUNG, MASK_HEART = 0, 1, 2, 3
MASK_NAMES = {1: "right_lung", 2: "left_lung", 3: "heart"}


@dataclass
class Rendered:
    image: np.ndarray  # (S, S) float32 in [0, 1]
    mask: np.ndarray  # (S, S) uint8 label map (MASK_*)


class _Grid:
    """Pixel grid mapped into body coordinates for one case."""

    def __init__(self, case: Case, size: int):
        s = size
        lin = (np.arange(s, dtype=np.float32) + 0.5) / s * 2 - 1
        u, v = np.meshgrid(lin, lin)
        sx, sy = case.shift
        x0, y0 = (u - sx) / case.scale, (v - sy) / case.scale
        th = np.deg2rad(case.rotation_deg)
        c, si = np.cos(th), np.sin(th)
        self.x = (c * x0 + si * y0) / case.aspect
        self.y = -si * x0 + c * y0
        self.px = 2.0 / (s * case.scale)  # one pixel in body units
        self.size = s


def _soft(sd: np.ndarray, px: float) -> np.ndarray:
    """Signed distance (negative inside) -> anti-aliased occupancy in [0, 1]."""
    return np.clip(0.5 - sd / (1.5 * px), 0.0, 1.0)


def _ellipse_sd(x, y, cx, cy, ax, ay):
    r = np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2)
    return (r - 1.0) * min(ax, ay)


def _band(dist: np.ndarray, half: float, px: float) -> np.ndarray:
    return _soft(np.abs(dist) - half, px)


class _Anatomy:
    """Derived anatomical landmarks of a case (body coordinates)."""

    def __init__(self, c: Case):
        self.W = c.thorax_halfwidth
        W = self.W
        self.heart_w = c.ctr * 2 * W  # transverse cardiac diameter
        self.heart_cx = 0.15 * self.heart_w  # one third right of midline, two thirds left
        self.heart_ax = self.heart_w / 2
        self.heart_ay = c.heart_height
        self.heart_cy = c.dome_y_left - 0.4 * self.heart_ay
        self.med_half = c.mediastinal_ratio * W  # half of (ratio * 2W)
        self.carina_y = self.heart_cy - self.heart_ay - 0.06
        self.hilum_y = self.heart_cy - 0.6 * self.heart_ay
        self.hila = {"right": (-0.28 * W, self.hilum_y), "left": (0.30 * W, self.hilum_y - 0.02)}
        self.knob = (self.med_half * 0.75 + 0.02, self.heart_cy - self.heart_ay - 0.02)
        self.cm_per_unit = 30.0 / (2 * 0.80)  # a 30 cm male thorax spans 2 * 0.80 units


def _lung_sd(c: Case, a: _Anatomy, x, y, side: str, dome_shift: float = 0.0):
    """Signed distance (approx.) of a lung field, before the heart is carved out."""
    xs = -x if side == "right" else x  # lateral-positive coordinate
    W = a.W
    dome_top = (c.dome_y_right if side == "right" else c.dome_y_left) - dome_shift
    xc, span = 0.5 * W, 0.62 * W
    dome = dome_top + c.dome_height * ((xs - xc) / span) ** 2
    cp_y = dome_top + c.dome_height * ((W - xc) / span) ** 2
    t = np.clip((y - c.apex_y) / (cp_y - c.apex_y), 0.0, 1.0)
    apex_x = 0.38 * W
    lateral = apex_x + (W - apex_x) * np.sqrt(1 - (1 - t) ** 2.2)
    medial = apex_x - (apex_x - a.med_half * 0.55) * np.sqrt(t)
    return np.maximum.reduce([xs - lateral, medial - xs, y - dome, c.apex_y - y])


def render(c: Case, size: int) -> Rendered:
    """Draw the case at ``size`` x ``size`` pixels."""
    g = _Grid(c, size)
    a = _Anatomy(c)
    x, y, px = g.x, g.y, g.px
    rng = np.random.default_rng(c.n_marking_seeds)
    W = a.W

    # ---- soft tissue: trunk with shoulders and neck --------------------------------------------
    B = W + c.body_margin
    shoulder = np.clip((y + 1.05) / 0.3, 0, 1)  # 0 above the shoulders, 1 over the chest
    half_w = 0.22 + (B + 0.08 - 0.22) * shoulder ** 0.5
    half_w = half_w * (0.93 + 0.07 * np.clip((y + 0.7) / 1.2, 0, 1))
    thick = np.sqrt(np.clip(1 - (x / half_w) ** 2, 0, 1)) * _soft(np.abs(x) - half_w, px)
    D = 1.0 * thick

    # ---- lungs ------------------------------------------------------------------------------------
    atel_sides = _sides(c, "Atelectasis")
    lung_sd = {}
    for side in ("right", "left"):
        lung_sd[side] = _lung_sd(c, a, x, y, side, dome_shift=-0.04 if side in atel_sides else 0.0)
    heart_sd = _ellipse_sd(x, y, a.heart_cx, a.heart_cy, a.heart_ax, a.heart_ay)
    heart_occ = _soft(heart_sd, px)
    lung_occ = {s: _soft(lung_sd[s], px) * (1 - heart_occ) for s in lung_sd}
    lungs = lung_occ["right"] + lung_occ["left"]

    # Lung markings: vessels radiating from the hila, fading towards the periphery.
    markings = np.zeros_like(x)
    for side, (hx, hy) in a.hila.items():
        r = np.hypot(x - hx, y - hy)
        theta = np.arctan2(y - hy, x - hx)
        nb = 96
        prof = rng.random(nb + 1) ** 6
        idx = (theta + np.pi) / (2 * np.pi) * nb
        i0 = np.floor(idx).astype(int) % nb
        f = idx - np.floor(idx)
        streak = prof[i0] * (1 - f) + prof[(i0 + 1) % nb] * f
        wobble = 0.6 + 0.4 * np.sin(r * rng.uniform(25, 40) + rng.uniform(0, 6))
        markings += streak * np.exp(-r / 0.45) * wobble
    markings += 0.15 * ndimage.gaussian_filter(rng.standard_normal(x.shape).astype(np.float32),
                                               sigma=max(1.0, size / 160))
    mark_mask = lungs.copy()

    # ---- findings that change the lungs themselves (pneumothorax) --------------------------------
    ptx_space = np.zeros_like(x)
    pleural_line = np.zeros_like(x)
    for f in c.get("Pneumothorax"):
        frac = {"small": 0.10, "moderate": 0.22, "large": 0.38}[f.severity or "small"]
        hx, hy = a.hila[f.side]
        # The collapsed lung is the lung shape shrunk towards its hilum.
        xs_, ys_ = hx + (x - hx) / (1 - frac), hy + (y - hy) / (1 - frac)
        collapsed_sd = _lung_sd(c, a, xs_, ys_, f.side) * (1 - frac)
        space = lung_occ[f.side] * (1 - _soft(collapsed_sd, px))
        ptx_space = np.maximum(ptx_space, space)
        pleural_line = np.maximum(pleural_line, _band(collapsed_sd, 0.6 * px, px) * lung_occ[f.side])
    mark_mask = mark_mask * (1 - ptx_space)

    D -= c.lung_air * thick * lungs  # air in the lungs
    D -= 0.15 * thick * ptx_space  # free pleural air has no lung tissue at all
    D += 0.22 * markings * mark_mask
    D += 0.25 * pleural_line

    # ---- mediastinum, heart, trachea, aorta, hila -------------------------------------------------
    med_top = c.apex_y - 0.35
    widen = 1 + 0.4 * np.clip((y - a.knob[1]) / (a.heart_cy - a.knob[1]), 0, 1)
    med_occ = _soft(np.abs(x - 0.01) - a.med_half * widen, px) * _soft(np.maximum(med_top - y, y - a.heart_cy), px)
    D += c.heart_density * np.maximum(med_occ, heart_occ) * thick
    knob_sd = _ellipse_sd(x, y, a.knob[0], a.knob[1], c.aortic_knob_r, c.aortic_knob_r)
    D += 0.25 * _soft(knob_sd, px)
    if c.aortic_calcification:
        arc = _band(knob_sd + 0.004, 0.005, px) * (y < a.knob[1])
        D += 0.5 * arc
    trachea = _soft(np.abs(x) - 0.035, px) * _soft(np.maximum(-1.3 - y, y - a.carina_y), px)
    D -= 0.18 * trachea
    for side, (hx, hy) in a.hila.items():
        D += 0.18 * np.exp(-((x - hx) ** 2 + (y - hy) ** 2) / (2 * 0.045**2))

    # ---- bones ---------------------------------------------------------------------------------------
    bone = np.zeros_like(x)
    spine = _soft(np.abs(x) - 0.065, px)
    period = 0.085
    disc = 0.5 + 0.5 * np.cos(2 * np.pi * (y - c.apex_y) / period)
    bone += spine * (0.28 + 0.08 * (disc < 0.92))
    rib_gap = (max(c.dome_y_right, c.dome_y_left) + 0.12 - c.apex_y) / 9.5
    fractures = {(f.side, f.extra.get("rib")): f for f in c.get("Fracture")}
    for side in ("right", "left"):
        xs = -x if side == "right" else x
        u = np.clip(xs / W, 0, 1.15)
        lateral_ok = _soft(xs - (W + 0.04), px) * _soft(0.06 - xs, px)
        for k in range(10):
            y0 = c.apex_y - 0.03 + k * rib_gap
            yc = y0 - 0.10 * u + 0.32 * u**2
            th = 0.018 + 0.002 * k
            dy = y - yc
            f = fractures.get((side, k + 1))
            if f is not None:  # a gap and, if displaced, a step-off in the lateral segment
                cut = 0.72
                step = 0.02 if f.severity == "displaced" else 0.0
                dy = np.where(u > cut, dy - step, dy)
                lateral_gap = _soft(0.008 - np.abs(u - cut) * W, px)
            else:
                lateral_gap = 0.0
            band = _band(dy, th, px) * lateral_ok * (1 - lateral_gap)
            cortex = 0.55 + 0.45 * np.clip(np.abs(dy) / th, 0, 1) ** 2
            bone += 0.2 * band * cortex
            # faint anterior rib running medially and down
            ya = y0 + 0.18 + 0.28 * np.clip(1 - u, 0, None) ** 1.6
            bone += 0.06 * _band(y - ya, 0.6 * th, px) * _soft(0.3 - u, px * 4) * lateral_ok
        # clavicle
        cl_y = c.apex_y - 0.10
        ycl = cl_y - 0.07 * u + 0.03 * np.sin(np.pi * u * 1.5)
        bone += 0.35 * _band(y - ycl, 0.028, px) * _soft(0.08 - xs, px) * _soft(xs - 0.75 * W * 1.1, px)
        # scapula over the upper lateral lung (AP views keep it in the field)
        if c.view == "AP":
            sc = _ellipse_sd(xs, y, 0.95 * W, c.apex_y + 0.35, 0.16, 0.32)
            bone += 0.15 * _soft(sc, px)
    D += c.bone_density * bone

    # ---- breasts (sex signal) and aortic changes (age signal) ------------------------------------
    if c.breast_size > 0:
        for sgn in (-1, 1):
            cx, cy = sgn * 0.55 * W, c.dome_y_right - 0.05
            bsd = _ellipse_sd(x, y, cx, cy, 0.36 * c.breast_size, 0.24 * c.breast_size)
            lower = _soft(cy - 0.12 * c.breast_size - y, px * 6)  # fades out upwards
            D += 0.28 * _soft(bsd, px * 2) * lower * np.sqrt(c.breast_size)

    # ---- parenchymal and pleural findings ----------------------------------------------------------
    opac = np.zeros_like(x)
    for f in c.findings:
        if f.kind == "Consolidation":
            opac += _consolidation(c, a, f, x, y, rng, lung_occ) * 0.7
        elif f.kind == "Atelectasis":
            for s in _expand(f.side):
                hx, _ = a.hila[s]
                base = (c.dome_y_right if s == "right" else c.dome_y_left) + 0.04 - 0.16
                band = _band(y - base - 0.05 * (x - hx), 0.018, px) * lung_occ[s]
                opac += 0.5 * ndimage.gaussian_filter(band, sigma=max(0.5, size / 400))
        elif f.kind == "Edema":
            w = {"mild": 0.22, "moderate": 0.38, "severe": 0.6}[f.severity or "mild"]
            haze = np.zeros_like(x)
            for (hx, hy) in a.hila.values():
                haze += np.exp(-((x - hx) ** 2 / (2 * 0.22**2) + (y - hy) ** 2 / (2 * 0.28**2)))
            opac += w * haze * lungs
            # Kerley B lines: short horizontal lines at the lateral lung bases
            for s in ("right", "left"):
                xs = -x if s == "right" else x
                dome = c.dome_y_right if s == "right" else c.dome_y_left
                for j in range(4 + 2 * (f.severity != "mild")):
                    ly = dome - 0.04 - j * 0.035
                    seg = _band(y - ly, 0.004, px) * _soft(np.abs(xs - (W - 0.05)) - 0.045, px)
                    opac += 0.5 * w * seg * lung_occ[s]
        elif f.kind == "Lung Lesion":
            s = f.side
            zone_y = {"upper": 0.25, "mid": 0.5, "lower": 0.72}[f.extra["zone"]]
            dome = c.dome_y_right if s == "right" else c.dome_y_left
            cy = c.apex_y + zone_y * (dome - c.apex_y)
            sgn = -1 if s == "right" else 1
            cx = sgn * (0.25 * W + f.extra["u"] * 0.6 * W)
            r = f.size_cm / 2 / a.cm_per_unit
            lsd = _ellipse_sd(x, y, cx, cy, r, r * 0.92)
            edge = px * (1.5 if f.severity == "nodule" else 3.0)
            opac += 0.75 * _soft(lsd, edge)
        elif f.kind == "Pleural Other":
            for s in _expand(f.side):
                xs = -x if s == "right" else x
                wall = _band(xs - (W - 0.012), 0.012, px) * _soft(np.abs(y - (c.apex_y + 0.45)) - 0.25, px)
                D += 0.45 * wall * (1 + 0.5 * np.sin(y * 60))
    D += opac * thick

    for f in c.get("Pleural Effusion"):
        for s in _expand(f.side):
            h = {"small": 0.06, "moderate": 0.2, "large": 0.42}[f.severity or "small"]
            xs = -x if s == "right" else x
            dome = c.dome_y_right if s == "right" else c.dome_y_left
            cp_level = dome + c.dome_height * ((W - 0.5 * W) / (0.62 * W)) ** 2
            # Meniscus: the fluid surface rises towards the lateral chest wall, hiding the angle.
            surface = cp_level - h - (0.08 + 0.3 * h) * np.clip(xs / W, 0, 1.1) ** 2
            fluid = _soft(lung_sd[s], px * 2) * _soft(surface - y, px * 5)
            D += 0.6 * fluid * thick

    # ---- support devices (radio-opaque) ----------------------------------------------------------
    metal = np.zeros_like(x)
    for f in c.get("Support Devices"):
        metal += _device(f.severity, f.extra, a, c, x, y, px)
    D += metal

    # ---- detector, processing, noise --------------------------------------------------------------
    img = 1.0 - np.exp(-0.75 * c.exposure * np.clip(D, 0, None))
    if c.view == "AP":
        img = img * 0.95 + 0.03
    if c.unsharp > 0:
        blur = ndimage.gaussian_filter(img, sigma=size / 40)
        img = img + c.unsharp * (img - blur)
    img = np.clip(img, 0, 1) ** c.gamma
    lo, hi = c.window
    img = (img - lo) / (hi - lo)
    noise_rng = np.random.default_rng(c.n_marking_seeds + 1)
    img = img + c.noise * noise_rng.standard_normal(img.shape).astype(np.float32)
    img = _collimate(img, c)
    if c.marker:
        img = _marker(img, c)
    img = np.clip(img, 0, 1).astype(np.float32)

    mask = np.zeros((size, size), np.uint8)
    mask[lung_occ["right"] >= 0.5] = MASK_RIGHT_LUNG
    mask[lung_occ["left"] >= 0.5] = MASK_LEFT_LUNG
    mask[heart_occ >= 0.5] = MASK_HEART
    return Rendered(image=img, mask=mask)


def _sides(c: Case, kind: str) -> set[str]:
    out: set[str] = set()
    for f in c.get(kind):
        out.update(_expand(f.side))
    return out


def _expand(side: str | None) -> tuple[str, ...]:
    return ("right", "left") if side in (None, "bilateral") else (side,)


def _consolidation(c: Case, a: _Anatomy, f, x, y, rng, lung_occ) -> np.ndarray:
    out = np.zeros_like(x)
    loc = f.location or ""
    for s in _expand(f.side):
        dome = c.dome_y_right if s == "right" else c.dome_y_left
        top, bottom = c.apex_y, dome + 0.1
        if "upper" in loc:
            lo, hi = top, a.hilum_y + 0.02
        elif "middle" in loc:
            lo, hi = a.hilum_y, dome
        else:  # lower
            lo, hi = a.hilum_y + 0.05, bottom
        region = _soft(np.maximum(lo - y, y - hi), 0.03)
        if "middle" in loc:  # right middle lobe borders the right heart border
            region = region * np.exp(-np.clip(-x - a.heart_ax * 0.7 - 0.1, 0, None) / 0.15)
        tex = ndimage.gaussian_filter(rng.standard_normal(x.shape).astype(np.float32), sigma=x.shape[0] / 50)
        tex = (tex - tex.min()) / (tex.max() - tex.min() + 1e-6)
        if f.severity == "patchy":
            blob = np.clip(tex * 2.2 - 0.9, 0, 1)
        else:
            blob = np.clip(0.6 + 0.6 * tex, 0, 1)
        out += region * blob * lung_occ[s]
    return out


def _line(x, y, pts: list[tuple[float, float]], half: float, px: float) -> np.ndarray:
    """Occupancy of a polyline of given half-width (for tubes and leads)."""
    best = np.full_like(x, np.inf)
    for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:]):
        dx, dy = x1 - x0, y1 - y0
        L2 = dx * dx + dy * dy + 1e-12
        t = np.clip(((x - x0) * dx + (y - y0) * dy) / L2, 0, 1)
        best = np.minimum(best, np.hypot(x - x0 - t * dx, y - y0 - t * dy))
    return _soft(best - half, px)


def _device(kind: str, extra: dict, a: _Anatomy, c: Case, x, y, px) -> np.ndarray:
    if kind == "ett":
        tip = a.carina_y - extra.get("tip_cm_above_carina", 4.0) / a.cm_per_unit
        walls = _line(x, y, [(-0.012, -1.5), (-0.012, tip)], 0.003, px) + _line(
            x, y, [(0.012, -1.5), (0.012, tip)], 0.003, px)
        return 0.6 * walls
    if kind == "ng_tube":
        pts = [(0.02, -1.5), (0.03, a.heart_cy), (0.08, c.dome_y_left + 0.05),
               (0.30, c.dome_y_left + 0.18)]
        return 0.7 * _line(x, y, pts, 0.006, px)
    if kind == "central_line":
        pts = [(-0.55 * a.W, c.apex_y - 0.05), (-0.22, c.apex_y + 0.08), (-0.07, a.carina_y + 0.02),
               (-0.06, a.heart_cy - a.heart_ay + 0.02)]
        return 0.7 * _line(x, y, pts, 0.005, px)
    if kind == "pacemaker":
        box_x, box_y = 0.55 * a.W, c.apex_y + 0.1
        can = _soft(np.maximum(np.abs(x - box_x) - 0.07, np.abs(y - box_y) - 0.045), px)
        lead = _line(x, y, [(box_x - 0.04, box_y), (0.05, c.apex_y + 0.15),
                            (-0.04, a.heart_cy - a.heart_ay * 0.6),
                            (a.heart_cx + 0.5 * a.heart_ax, a.heart_cy + 0.6 * a.heart_ay)], 0.005, px)
        return 2.0 * can + 0.8 * lead
    raise ValueError(f"unknown device {kind!r}")


def _collimate(img: np.ndarray, c: Case) -> np.ndarray:
    s = img.shape[0]
    l, r, t, b = (int(round(v * s)) for v in c.collimation)
    if not any((l, r, t, b)):
        return img
    fill = 0.92 if c.collimation_white else 0.02
    out = img.copy()
    if l:
        out[:, :l] = fill
    if r:
        out[:, s - r:] = fill
    if t:
        out[:t, :] = fill
    if b:
        out[s - b:, :] = fill
    return out


_GLYPHS = {  # 5x3 bitmaps
    "L": ["100", "100", "100", "100", "111"],
    "R": ["110", "101", "110", "101", "101"],
}


def _marker(img: np.ndarray, c: Case) -> np.ndarray:
    s = img.shape[0]
    cell = max(1, s // 90)
    glyph = np.array([[ch == "1" for ch in row] for row in _GLYPHS[c.marker]], dtype=np.float32)
    glyph = np.kron(glyph, np.ones((cell, cell), np.float32))
    gh, gw = glyph.shape
    m = max(2, s // 25)
    r0 = m if c.marker_corner in (0, 1) else s - m - gh
    c0 = m if c.marker_corner in (0, 2) else s - m - gw
    out = img.copy()
    patch = out[r0:r0 + gh, c0:c0 + gw]
    out[r0:r0 + gh, c0:c0 + gw] = np.maximum(patch, glyph * 0.97)
    return out
