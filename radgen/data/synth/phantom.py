"""Rendering a :class:`~radgen.data.synth.case.Case` as a projection chest radiograph.

Image formation follows a real film:

1. **Anatomy as 3D analytic bodies** (elliptic cylinders, ellipsoids, rounded slabs, tubes, curved
   bones with a cortical shell). For each pixel the path length of the central ray through each
   body is computed in closed form (in cm), and the log-attenuation ``A = sum(mu_i * L_i)`` is
   accumulated, so overlapping structures add the way they do on a film (spine through the
   heart, ribs over the lungs, breasts over the bases) and edges are soft where bodies curve.
   Lungs are air-filled tissue that *replaces* soft tissue; the heart, aorta and fluid displace
   lung. The vessel tree is a random branching tree of tapering tubes, splatted with a Gaussian
   cross-section of the same line integral (the one approximation: at 256 px vessels span 1-3 px).
2. **Detector**: Beer-Lambert transmission ``exp(-A)``, low-frequency scatter, quantum (Poisson)
   noise at the case's dose, detector blur.
3. **CR/DX processing**: log, exposure recognition (percentile auto-ranging), multi-scale
   processing (large-scale range compression + mid-frequency detail gain), a sigmoid tone curve
   and a small unsharp mask; then collimation and the lead side marker. Bright = dense.

Geometry lives in *body coordinates* (thorax centred at 0, ``x`` to the image right = the
patient's left in a standard frontal view, ``y`` down, 1 unit = :data:`CM_PER_UNIT` cm); the
case's pose maps pixels into them. Each body is evaluated only on the pixel window its bounding
box covers, which keeps a 256-px image at a few tens of milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from radgen.data.synth.case import Case

# Label-map values written as the segmentation mask.
MASK_BACKGROUND, MASK_RIGHT_LUNG, MASK_LEFT_LUNG, MASK_HEART = 0, 1, 2, 3
MASK_NAMES = {1: "right_lung", 2: "left_lung", 3: "heart"}

CM_PER_UNIT = 18.75  # a 30 cm male thorax spans 2 * 0.80 body units

# Linear attenuation coefficients (1/cm) at an effective energy of ~60 keV.
MU_SOFT, MU_LUNG, MU_FLUID, MU_CORTEX, MU_MARROW, MU_METAL, MU_CALCIUM = (
    0.20, 0.05, 0.21, 0.50, 0.24, 3.0, 0.60)


@dataclass
class Rendered:
    image: np.ndarray  # (S, S) float32 in [0, 1], bright = dense
    mask: np.ndarray  # (S, S) uint8 label map (MASK_*)
    landmarks: dict = field(default_factory=dict)  # name -> (row, col) in pixels
    regions: dict = field(default_factory=dict)  # finding -> (S, S) bool, where it is drawn
    markings: np.ndarray | None = None  # (S, S) line integral of the lung markings (vessels, texture)


# ---- geometry helpers -------------------------------------------------------------------------


class _Canvas:
    """The pixel grid mapped into body coordinates, with windows for bounded bodies."""

    def __init__(self, case: Case, size: int):
        s = size
        lin = (np.arange(s, dtype=np.float32) + 0.5) / s * 2 - 1
        u, v = np.meshgrid(lin, lin)
        self.sx, self.sy = case.shift
        self.scale, self.aspect = case.scale, case.aspect
        th = np.deg2rad(case.rotation_deg)
        self.cos, self.sin = float(np.cos(th)), float(np.sin(th))
        x0, y0 = (u - self.sx) / self.scale, (v - self.sy) / self.scale
        self.x = ((self.cos * x0 + self.sin * y0) / self.aspect).astype(np.float32)
        self.y = (-self.sin * x0 + self.cos * y0).astype(np.float32)
        self.px = 2.0 / (s * self.scale)  # one pixel in body units
        self.size = s

    def to_pixel(self, bx, by):
        """Body coordinates -> (row, col) pixel coordinates (floats)."""
        xa = np.asarray(bx, dtype=np.float64) * self.aspect
        by = np.asarray(by, dtype=np.float64)
        x0 = self.cos * xa - self.sin * by
        y0 = self.sin * xa + self.cos * by
        col = ((x0 * self.scale + self.sx) + 1) / 2 * self.size - 0.5
        row = ((y0 * self.scale + self.sy) + 1) / 2 * self.size - 0.5
        return row, col

    def window(self, x0: float, x1: float, y0: float, y1: float):
        """Pixel slices covering a body-coordinate box, or None when it is off the image."""
        r, c = self.to_pixel([x0, x1, x0, x1], [y0, y0, y1, y1])
        r0, r1 = max(int(np.floor(r.min())) - 2, 0), min(int(np.ceil(r.max())) + 3, self.size)
        c0, c1 = max(int(np.floor(c.min())) - 2, 0), min(int(np.ceil(c.max())) + 3, self.size)
        if r0 >= r1 or c0 >= c1:
            return None
        return (slice(r0, r1), slice(c0, c1))

    def splat(self, bx: np.ndarray, by: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Bilinear splat of point masses (body coordinates) onto the grid."""
        r, c = self.to_pixel(bx, by)
        s = self.size
        r0, c0 = np.floor(r).astype(np.int64), np.floor(c).astype(np.int64)
        fr, fc = r - r0, c - c0
        out = np.zeros(s * s, np.float64)
        for dr, dc, wt in ((0, 0, (1 - fr) * (1 - fc)), (1, 0, fr * (1 - fc)),
                           (0, 1, (1 - fr) * fc), (1, 1, fr * fc)):
            rr, cc = r0 + dr, c0 + dc
            ok = (rr >= 0) & (rr < s) & (cc >= 0) & (cc < s)
            out += np.bincount((rr[ok] * s + cc[ok]), weights=(w * wt)[ok], minlength=s * s)
        return out.reshape(s, s).astype(np.float32)


def _soft(sd, px: float):
    """Signed distance (negative inside) -> anti-aliased occupancy in [0, 1]."""
    return np.clip(0.5 - sd / (1.5 * px), 0.0, 1.0)


def _smoothstep(t):
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _ellipsoid(x, y, cx, cy, ax, ay, depth_cm, tilt: float = 0.0, power: float = 0.5):
    """Path length (cm) through an ellipsoid whose projection is an (optionally tilted) ellipse;
    ``power`` < 0.5 gives a flatter-sided superellipsoid (the heart)."""
    dx, dy = x - cx, y - cy
    if tilt:
        ct, st = np.cos(tilt), np.sin(tilt)
        dx, dy = ct * dx + st * dy, -st * dx + ct * dy
    q = 1.0 - (dx / ax) ** 2 - (dy / ay) ** 2
    return depth_cm * np.clip(q, 0.0, None) ** power


def _tube(d, r: float):
    """Path length (cm) through a cylinder of radius ``r`` (units) lying in the image plane."""
    return 2.0 * CM_PER_UNIT * np.sqrt(np.clip(r * r - d * d, 0.0, None))


def _shell(d, r: float, depth_scale: float = 1.0, inner: float = 0.62):
    """Cortical bone tube of radius ``r`` filled with marrow: attenuation in excess of the soft
    tissue it displaces."""
    return depth_scale * ((MU_CORTEX - MU_SOFT) * _tube(d, r) - (MU_CORTEX - MU_MARROW) * _tube(d, inner * r))


def _polyline_distance(x, y, pts) -> np.ndarray:
    best = np.full(x.shape, np.inf, np.float32)
    for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:]):
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((x - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy + 1e-12), 0, 1)
        best = np.minimum(best, np.hypot(x - x0 - t * dx, y - y0 - t * dy))
    return best


def _smooth_path(pts, n: int = 12) -> list[tuple[float, float]]:
    """Catmull-Rom through control points: devices follow curved courses."""
    p = np.asarray(pts, dtype=np.float64)
    p = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    out = []
    for i in range(1, len(p) - 2):
        p0, p1, p2, p3 = p[i - 1], p[i], p[i + 1], p[i + 2]
        for t in np.linspace(0, 1, n, endpoint=False):
            t2, t3 = t * t, t * t * t
            out.append(0.5 * (2 * p1 + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t2
                              + (-p0 + 3 * p1 - 3 * p2 + p3) * t3))
    out.append(p[-2])
    return [(float(a), float(b)) for a, b in out]


def _lowpass(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with a large sigma, computed on a block-averaged copy (fast)."""
    s = img.shape[0]
    f = int(max(1, min(sigma // 2, s // 8)))
    if f == 1:
        return ndimage.gaussian_filter(img, sigma, mode="nearest")
    n = s // f
    small = img[:n * f, :n * f].reshape(n, f, n, f).mean(axis=(1, 3))
    small = ndimage.gaussian_filter(small, sigma / f, mode="nearest")
    up = ndimage.zoom(small, f, order=1, mode="nearest", grid_mode=True)
    if up.shape[0] < s:
        up = np.pad(up, ((0, s - up.shape[0]), (0, s - up.shape[1])), mode="edge")
    return up[:s, :s]


def _pink_noise(rng: np.random.Generator, size: int, beta: float) -> np.ndarray:
    """Unit-variance noise with a 1/f^beta power spectrum (lung parenchyma, soft tissue)."""
    white = rng.standard_normal((size, size)).astype(np.float32)
    f = np.fft.rfft2(white)
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    r = np.sqrt(fx * fx + fy * fy) * size
    f *= (1.0 / np.maximum(r, 1.0)) ** (beta / 2)
    out = np.fft.irfft2(f, s=(size, size)).astype(np.float32)
    return out / (out.std() + 1e-8)


# ---- anatomy ------------------------------------------------------------------------------------


def _expand(side: str | None) -> tuple[str, ...]:
    return ("right", "left") if side in (None, "bilateral") else (side,)


def _sides(c: Case, kind: str) -> set[str]:
    out: set[str] = set()
    for f in c.get(kind):
        out.update(_expand(f.side))
    return out


class _Anatomy:
    """Derived landmarks of a case in body coordinates (x: image right = patient left)."""

    def __init__(self, c: Case):
        self.c = c
        W = self.W = c.thorax_halfwidth
        yaw = np.sin(np.deg2rad(c.yaw_deg)) / CM_PER_UNIT
        self.shift = lambda z_cm: z_cm * yaw  # lateral shift of a structure at depth z (cm, +anterior)
        atel = _sides(c, "Atelectasis")
        self.dome = {"right": c.dome_y_right - (0.05 if "right" in atel else 0.0),
                     "left": c.dome_y_left - (0.05 if "left" in atel else 0.0)}
        self.dome_xc, self.dome_span = 0.5 * W, 0.62 * W
        self.cp_y = {s: d + c.dome_height * ((W - self.dome_xc) / self.dome_span) ** 2
                     for s, d in self.dome.items()}
        # Heart: right atrium and a tilted left ventricle; transverse diameter = ctr * 2W with one
        # third right of the midline and two thirds left of it.
        w = self.heart_w = c.ctr * 2 * W
        hz = self.shift(3.0)
        grow = np.sqrt(c.ctr / 0.43)
        H = c.heart_height * grow
        self.ra = dict(ax=0.24 * w, ay=0.50 * H)
        self.ra.update(cx=-w / 3 + self.ra["ax"] + hz, cy=c.dome_y_right - 0.40 * H)
        tilt = np.deg2rad(c.heart_tilt_deg)
        a, b = 0.47 * w, 0.80 * H
        hx = float(np.sqrt((a * np.cos(tilt)) ** 2 + (b * np.sin(tilt)) ** 2))
        hy = float(np.sqrt((a * np.sin(tilt)) ** 2 + (b * np.cos(tilt)) ** 2))
        self.lv = dict(ax=a, ay=b, tilt=tilt, cx=2 * w / 3 - hx + hz, cy=c.dome_y_left + 0.06 - hy,
                       hx=hx, hy=hy)
        self.heart_x = (-w / 3 + hz, 2 * w / 3 + hz)
        self.heart_top = min(self.lv["cy"] - hy, self.ra["cy"] - self.ra["ay"])
        self.heart_depth = 12.0 * grow
        self.carina_y = self.heart_top - 0.10
        self.hilum_y = self.carina_y + 0.12
        self.hila = {"right": (-0.30 * W, self.hilum_y + 0.02), "left": (0.30 * W, self.hilum_y - 0.02)}
        self.med_half = c.mediastinal_ratio * W
        self.knob = (0.6 * self.med_half + c.aortic_knob_r * 0.9, self.carina_y - 0.14)
        self.spine_x = self.shift(-7.0)

    def medial(self, side: str, y):
        """Medial lung border (lateral-positive coordinate) as a function of height."""
        m, top = self.med_half, self.heart_top
        behind_heart = _smoothstep((y - (top - 0.02)) / 0.12)  # the lung wraps behind the heart
        if side == "right":
            upper = 0.85 * m - self.shift(0.0)
            lower = 0.07 - self.spine_x
        else:
            kx, ky = self.knob
            r = self.c.aortic_knob_r
            upper = np.maximum(0.75 * m, kx + np.sqrt(np.clip(r * r - (y - ky) ** 2, 0, None)))
            lower = 0.11 + self.spine_x
        return upper * (1 - behind_heart) + lower * behind_heart

    def lung_sd(self, x, y, side: str, dome_shift: float = 0.0):
        """Signed distance (approx., units) of a lung field, including its retrocardiac part."""
        c, W = self.c, self.W
        xs = -x if side == "right" else x
        dome_top = self.dome[side] - dome_shift
        dome = dome_top + c.dome_height * ((xs - self.dome_xc) / self.dome_span) ** 2
        t = np.clip((y - c.apex_y) / (self.cp_y[side] - dome_shift - c.apex_y), 0.0, 1.0)
        apex_x = 0.40 * W
        lateral = apex_x + (W - apex_x) * np.sqrt(1 - (1 - t) ** 2.2)
        medial = apex_x + (self.medial(side, y) - apex_x) * np.sqrt(np.clip(t / 0.3, 0, 1))
        apex = (c.apex_y - y) + 0.25 * ((xs - apex_x) / W) ** 2
        return np.maximum.reduce([xs - lateral, medial - xs, y - dome, apex])


def _vessel_tree(rng, root: tuple[float, float], sgn: float, angles, r0: float, l0: float,
                 levels: int, spread=(0.28, 0.55)):
    """Branching tube tree: returns sample points (x, y) and radii, tapering to the periphery."""
    n = len(angles)
    x = root[0] + sgn * rng.uniform(-0.01, 0.03, n)  # roots spread over the hilum
    y = root[1] + np.sin(np.deg2rad(np.asarray(angles, dtype=np.float64))) * 0.04 + rng.normal(0, 0.01, n)
    ang = np.deg2rad(np.asarray(angles, dtype=np.float64)) + rng.normal(0, 0.12, n)
    ln = l0 * rng.uniform(0.8, 1.2, n); r = np.full(n, r0)
    xs_all, ys_all, rs_all, ls_all = [], [], [], []
    for _ in range(levels):
        x1 = x + sgn * np.cos(ang) * ln
        y1 = y + np.sin(ang) * ln
        xs_all.append((x, x1)); ys_all.append((y, y1)); rs_all.append(r); ls_all.append(ln)
        k = len(x)
        turn = rng.uniform(*spread, size=k)
        x = np.repeat(x1, 2); y = np.repeat(y1, 2)
        ang = np.repeat(ang, 2) + np.stack([turn, -turn * rng.uniform(0.6, 1.0, k)], 1).ravel()
        ln = np.repeat(ln, 2) * rng.uniform(0.68, 0.86, 2 * k)
        r = np.repeat(r, 2) * 0.72
    return xs_all, ys_all, rs_all, ls_all


def _tree_points(tree, step: float):
    """Sample each segment of a tree every ``step`` units: ``(x, y, r, step_len)`` arrays."""
    px, py, pr, pl = [], [], [], []
    for (x0, x1), (y0, y1), r, ln in zip(*tree):
        m = np.maximum(1, np.ceil(ln / step).astype(int))
        seg = np.repeat(np.arange(len(m)), m)
        t = (np.arange(m.sum()) - np.repeat(np.cumsum(m) - m, m) + 0.5) / np.repeat(m, m)
        px.append(x0[seg] + (x1 - x0)[seg] * t)
        py.append(y0[seg] + (y1 - y0)[seg] * t)
        pr.append(r[seg])
        pl.append((ln / m)[seg])
    return np.concatenate(px), np.concatenate(py), np.concatenate(pr), np.concatenate(pl)


def _splat_tubes(cv: _Canvas, x, y, r, seg_len, dmu: float, blur: float = 1.0) -> np.ndarray:
    """Tubes as splatted points: each carries its line integral pi r^2 dmu per unit length."""
    px_cm = cv.px * CM_PER_UNIT
    mass = np.pi * (r * CM_PER_UNIT) ** 2 * dmu * (seg_len * CM_PER_UNIT) / px_cm ** 2
    r_px = r / cv.px
    out = np.zeros((cv.size, cv.size), np.float32)
    for lo, hi, sigma in ((0, 1.0, 0.7), (1.0, 2.2, 1.2), (2.2, np.inf, 2.2)):
        sel = (r_px >= lo) & (r_px < hi)
        if sel.any():
            out += ndimage.gaussian_filter(cv.splat(x[sel], y[sel], mass[sel]), sigma * blur)
    return out


# ---- the renderer -----------------------------------------------------------------------------


def render(c: Case, size: int) -> Rendered:
    """Draw the case at ``size`` x ``size`` pixels."""
    cv = _Canvas(c, size)
    an = _Anatomy(c)
    x, y, px = cv.x, cv.y, cv.px
    W = an.W
    rng = np.random.default_rng(c.n_marking_seeds)
    mu_soft = MU_SOFT * c.kvp ** -0.25
    bone_k = c.bone_density * c.kvp ** -1.0  # bone contrast falls faster with beam energy
    A = np.zeros((size, size), np.float32)
    regions: dict[str, np.ndarray] = {}
    landmarks: dict[str, tuple[float, float]] = {}

    def mark(name, bx, by):
        r_, c_ = cv.to_pixel(bx, by)
        landmarks[name] = (float(r_), float(c_))

    # ---- trunk: neck, shoulders, chest and abdomen as an elliptic cylinder of varying section --
    B = W + c.body_margin
    y_sh = c.apex_y - 0.14
    shoulder = _smoothstep((y - (y_sh - 0.22)) / 0.22)
    half_w = 0.30 + (B + 0.20 - 0.30) * shoulder
    half_w = half_w - 0.20 * _smoothstep((y - y_sh) / 0.45) * shoulder  # shoulders -> chest wall
    half_w = half_w - 0.05 * _smoothstep((y - c.dome_y_left) / 0.6)
    half_d = c.depth_cm / 2 * (0.55 + 0.45 * shoulder)
    trunk = 2 * half_d * np.sqrt(np.clip(1 - (x / half_w) ** 2, 0, None))
    A += mu_soft * trunk
    body = trunk > 0
    arm_x = B + 0.22
    if not c.arms_up:  # arms at the sides, humeri in view
        for sgn in (-1, 1):
            win = cv.window(sgn * arm_x - 0.25, sgn * arm_x + 0.25, y_sh - 0.1, 1.6)
            if win is not None:
                xs_ = x[win] * sgn
                d = xs_ - arm_x
                A[win] += mu_soft * _tube(d, 0.2) * _smoothstep((y[win] - y_sh + 0.05) / 0.1)
                A[win] += bone_k * _shell(d - 0.02, 0.045) * (y[win] > y_sh + 0.08)
    for sgn in (-1, 1):  # humeral heads at the shoulder joints
        hx, hy = sgn * (B + 0.16), y_sh + 0.02
        win = cv.window(hx - 0.15, hx + 0.15, hy - 0.15, hy + 0.15)
        if win is not None:
            d = np.hypot(x[win] - hx, y[win] - hy)
            A[win] += bone_k * _shell(d, 0.12, depth_scale=0.6, inner=0.8)

    # ---- lungs, heart, aorta -----------------------------------------------------------------
    lwin = cv.window(-W - 0.05, W + 0.05, c.apex_y - 0.06, max(an.cp_y.values()) + 0.2)
    lung_sd, lung_occ, lung_len, lung_recess = {}, {}, {}, {}
    Dmax = 0.72 * c.depth_cm
    for side in ("right", "left"):
        sd = np.full((size, size), 1.0, np.float32)
        if lwin is not None:
            sd[lwin] = an.lung_sd(x[lwin], y[lwin], side)
        lung_sd[side] = sd
        lung_occ[side] = _soft(sd, px)
        tv = np.clip((y - c.apex_y) / (an.cp_y[side] - c.apex_y), 0, 1)
        q = np.clip(-sd / 0.12, 0, 1)
        depth = Dmax * (0.3 + 0.7 * np.sqrt(tv)) * np.sqrt(q * (2 - q))
        # The posterior recess: lung continues behind the dome, thinning out below it.
        recess = Dmax * 0.22 * np.clip(1 - (y - an.dome[side]) / 0.14, 0, 1) * (sd > 0) * (
            _soft(np.maximum(np.abs((x if side == "left" else -x) - 0.55 * W) - 0.4 * W,
                             an.dome[side] - y), px))
        lung_len[side] = depth
        lung_recess[side] = recess * (sd > 0)
    heart = np.maximum(
        _ellipsoid(x, y, an.ra["cx"], an.ra["cy"], an.ra["ax"], an.ra["ay"], 0.8 * an.heart_depth,
                   power=0.3),
        _ellipsoid(x, y, an.lv["cx"], an.lv["cy"], an.lv["ax"], an.lv["ay"], an.heart_depth,
                   tilt=an.lv["tilt"], power=0.3))
    heart_mask = heart > 0
    kx, ky = an.knob
    aorta = np.zeros_like(A)
    win = cv.window(0.0, 0.35, ky - 0.12, max(an.dome.values()) + 0.1)
    if win is not None:  # arch (knob) and the descending aorta along the left of the spine
        xa, ya = x[win], y[win]
        desc_x = 0.07 + an.spine_x + 0.08
        d = _polyline_distance(xa, ya, _smooth_path([(kx - 0.03, ky), (desc_x + 0.01, ky + 0.2),
                                                     (desc_x, max(an.dome.values()) + 0.1)], 6))
        aorta[win] = _tube(d, c.aortic_knob_r * 0.95)
        aorta[win] = np.maximum(aorta[win], _ellipsoid(xa, ya, kx, ky, c.aortic_knob_r,
                                                       c.aortic_knob_r, 2 * CM_PER_UNIT * c.aortic_knob_r))
        if c.aortic_calcification:
            rim = np.abs(np.hypot(xa - kx, ya - ky) - 0.85 * c.aortic_knob_r) < 0.004
            A[win] += MU_CALCIUM * 0.25 * (rim & (ya < ky)) * bone_k
    # The heart and aorta displace lung; the posterior recess behind the domes lies behind them.
    lung_eff = {s: np.maximum(np.clip(lung_len[s] - heart - aorta, 0, None), lung_recess[s]) for s in lung_len}

    # ---- findings that take lung away: pneumothorax -----------------------------------------
    collapsed_occ = {s: np.ones_like(A) for s in lung_occ}
    pleural_line = np.zeros_like(A)
    for f in c.get("Pneumothorax"):
        frac = {"small": 0.12, "moderate": 0.24, "large": 0.40}[f.severity or "small"]
        hx, hy = an.hila[f.side]
        csd = an.lung_sd(hx + (x - hx) / (1 - frac), hy + (y - hy) / (1 - frac), f.side) * (1 - frac)
        collapsed_occ[f.side] = _soft(csd, px)
        space = lung_occ[f.side] * (1 - collapsed_occ[f.side])
        regions["Pneumothorax"] = regions.get("Pneumothorax", np.zeros(A.shape, bool)) | (space > 0.5)
        # The visceral pleura, seen tangentially: a fine white line.
        pleural_line += 0.2 * np.exp(-0.5 * (csd / (0.6 * px)) ** 2) * (lung_occ[f.side] > 0.5)

    # Lung tissue instead of soft tissue; free pleural air has no lung tissue.
    for s in lung_eff:
        space = lung_occ[s] * (1 - collapsed_occ[s])
        A += (MU_LUNG - mu_soft) * lung_eff[s] - MU_LUNG * lung_eff[s] * space
    A += pleural_line

    # ---- vessels, hila, parenchyma -------------------------------------------------------------
    in_lung = {s: lung_occ[s] * collapsed_occ[s] for s in lung_occ}
    lung_all = np.clip(in_lung["right"] + in_lung["left"], 0, 1)
    edema = c.get("Edema")
    e_sev = {"mild": 1, "moderate": 2, "severe": 3}.get(edema[0].severity, 1) if edema else 0
    vx, vy, vr, vl = [], [], [], []
    for side, (hx, hy) in an.hila.items():
        sgn = -1.0 if side == "right" else 1.0
        tree = _vessel_tree(rng, (hx, hy), sgn, angles=(-95, -60, -25, 10, 40, 65, 95), r0=0.036,
                            l0=0.13, levels=7)
        a_, b_, r_, l_ = _tree_points(tree, step=0.7 * px)
        vx.append(a_); vy.append(b_); vr.append(r_); vl.append(l_)
        # the main pulmonary artery branch into the hilum
        mx = sgn * 0.06
        win = cv.window(min(mx, hx) - 0.06, max(mx, hx) + 0.06, an.carina_y - 0.1, hy + 0.1)
        if win is not None:
            d = _polyline_distance(x[win], y[win], [(mx, an.carina_y + 0.04), (hx, hy)])
            A[win] += (mu_soft - MU_LUNG) * _tube(d, 0.045) * np.clip(lung_occ[side][win] + 0.3, 0, 1)
    # Each branch stands for an artery with its vein and bronchial wall: two tubes' worth.
    vessels = _splat_tubes(cv, np.concatenate(vx), np.concatenate(vy), np.concatenate(vr),
                           np.concatenate(vl), dmu=2.0 * (mu_soft - MU_LUNG), blur=1.0 + 0.6 * e_sev)
    tex = _pink_noise(rng, size, beta=3.0)
    lung_total = lung_eff["right"] * in_lung["right"] + lung_eff["left"] * in_lung["left"]
    markings = vessels * lung_all + 0.012 * tex * lung_total
    A += markings + 0.035 * tex * body

    # ---- airway ------------------------------------------------------------------------------
    win = cv.window(-0.3, 0.3, -2.0, an.carina_y + 0.25)
    if win is not None:
        xa, ya = x[win], y[win]
        tx = -0.01 * _smoothstep((ya - (an.knob[1] - 0.1)) / 0.2)  # deviated right by the arch
        d = np.where(ya < an.carina_y, np.abs(xa - tx), np.inf)
        for sgn, ang, ln in ((-1, 62, 0.14), (1, 45, 0.2)):  # right main bronchus is steeper
            t_ = np.deg2rad(ang)
            end = (sgn * np.cos(t_) * ln, an.carina_y + np.sin(t_) * ln)
            d = np.minimum(d, _polyline_distance(xa, ya, [(0.0, an.carina_y - 0.01), end]) * 1.25)
        A[win] -= mu_soft * _tube(d, 0.048)
    mark("carina", 0.0, an.carina_y)

    # ---- bones -------------------------------------------------------------------------------
    _spine(A, cv, c, an, bone_k)
    _ribs(A, cv, c, an, bone_k, regions)
    _shoulder_girdle(A, cv, c, an, bone_k)

    # ---- abdomen: stomach air under the left dome, bowel gas -----------------------------------
    if c.gastric_bubble > 0:
        r = c.gastric_bubble
        gx, gy = 0.42 * W, an.dome["left"] + 0.05 + r * 0.8
        win = cv.window(gx - 1.4 * r, gx + 1.4 * r, gy - r, gy + r)
        if win is not None:
            air = _ellipsoid(x[win], y[win], gx, gy, 1.3 * r, r, 1.6 * r * CM_PER_UNIT)
            if not c.supine:  # upright: an air-fluid level
                air = air * (y[win] < gy + 0.25 * r)
            A[win] -= mu_soft * air
        mark("stomach", gx, gy)
    for _ in range(int(rng.integers(2, 7))):
        bx_, by_ = rng.uniform(-0.8, 0.8) * W, an.dome["left"] + rng.uniform(0.35, 0.9)
        r = rng.uniform(0.03, 0.08)
        win = cv.window(bx_ - 2 * r, bx_ + 2 * r, by_ - r, by_ + r)
        if win is not None:
            A[win] -= 0.7 * mu_soft * _ellipsoid(x[win], y[win], bx_, by_, 1.6 * r, r, 1.4 * r * CM_PER_UNIT)

    # ---- breasts -------------------------------------------------------------------------------
    if c.breast_size > 0:
        bs = c.breast_size
        for sgn in (-1, 1):
            cx, cy = sgn * (0.52 * W + an.shift(9.0)), c.dome_y_right - 0.02
            ax, ay = 0.30 * bs + 0.1, 0.22 * bs + 0.06
            win = cv.window(cx - ax, cx + ax, cy - ay, cy + ay)
            if win is not None:
                ch = _ellipsoid(x[win], y[win], cx, cy, ax, ay, 3.0 * bs)
                A[win] += mu_soft * ch * _smoothstep((y[win] - (cy - ay)) / (1.2 * ay))

    # ---- parenchymal and pleural findings ----------------------------------------------------
    # Findings and the detector draw from their own streams, so adding a finding to a case
    # changes only the pixels it touches.
    _findings(A, cv, c, an, np.random.default_rng(c.n_marking_seeds + 3), lung_occ, lung_eff, in_lung, lung_all, mu_soft, regions)

    # ---- support devices ---------------------------------------------------------------------
    for f in c.get("Support Devices"):
        _device(A, cv, c, an, f, mark)

    # ---- detector and processing ---------------------------------------------------------------
    img = _expose_and_process(A, c, np.random.default_rng(c.n_marking_seeds + 1), size)
    img = _collimate(img, c)
    if c.marker:
        img = _marker(img, c)
    img = np.clip(img, 0, 1).astype(np.float32)

    mask = np.zeros((size, size), np.uint8)
    mask[lung_occ["right"] >= 0.5] = MASK_RIGHT_LUNG
    mask[lung_occ["left"] >= 0.5] = MASK_LEFT_LUNG
    mask[heart_mask] = MASK_HEART
    return Rendered(image=img, mask=mask, landmarks=landmarks, regions=regions, markings=markings)


def _spine(A, cv: _Canvas, c: Case, an: _Anatomy, bone_k: float) -> None:
    top, bottom = c.apex_y - 0.55, max(an.dome.values()) + 0.7
    win = cv.window(an.spine_x - 0.2, an.spine_x + 0.2, top, bottom)
    if win is None:
        return
    x, y = cv.x[win] - an.spine_x, cv.y[win]
    hv = 0.125  # vertebral height incl. disc (~2.3 cm)
    pos = (y - top) / hv
    v = pos - np.floor(pos)
    bw = 0.07 + 0.05 * np.clip((y - top) / (bottom - top), 0, 1)  # bodies widen downwards
    in_body = (0.93 + 0.07 * _soft(np.abs(v - 0.5) - 0.40, 0.06)) * (y > top)  # discs: softer
    xn = np.clip(np.abs(x) / bw, 0, 1)
    chord = 2 * 1.2 * np.sqrt(1 - xn ** 2) * (np.abs(x) < bw)
    chord_in = 2 * 1.1 * np.sqrt(np.clip(1 - (np.abs(x) / (0.9 * bw)) ** 2, 0, None))
    endplate = 1 + 0.25 * np.exp(-0.5 * ((np.abs(v - 0.5) - 0.38) / 0.04) ** 2)
    A[win] += bone_k * in_body * ((MU_CORTEX - MU_SOFT) * chord * endplate - (MU_CORTEX - MU_MARROW) * chord_in)
    for sgn in (-1, 1):  # pedicles: cortical rings in the upper half of each body
        dx = (x - sgn * 0.72 * bw) / (0.22 * bw)
        dy = (v - 0.35) / 0.17
        r = np.sqrt(dx * dx + dy * dy)
        A[win] += bone_k * 0.15 * np.exp(-0.5 * ((r - 1) / 0.3) ** 2) * (y > top)
    sp = an.shift(-10.0) - an.spine_x  # spinous processes, posterior
    A[win] += bone_k * 0.35 * np.exp(-0.5 * (((x - sp) / 0.018) ** 2 + ((v - 0.8) / 0.12) ** 2)) * (y > top)


def _ribs(A, cv: _Canvas, c: Case, an: _Anatomy, bone_k: float, regions: dict) -> None:
    W = an.W
    gap = (0.40 + 0.1 - c.apex_y) / 9.3  # fixed by anatomy; the domes move with inspiration
    fractures = {(f.side, f.extra.get("rib")): f for f in c.get("Fracture")}
    rib_rng = np.random.default_rng(c.n_marking_seeds + 2)
    for side in ("right", "left"):
        sgn = -1.0 if side == "right" else 1.0
        jitter = rib_rng.normal(0, 1, (11, 3))  # no two ribs alike: spacing, curvature, height
        for k in range(11):
            y0 = c.apex_y - 0.03 + k * gap + 0.012 * jitter[k, 0]
            bend = 0.36 * (1 + 0.08 * jitter[k, 1])
            curve_post = lambda u: y0 - 0.09 * u + bend * u ** 2 - (0.05 if k == 0 else 0.0) * u
            ys_ = curve_post(np.linspace(0, 1.1, 12))
            win = cv.window(min(sgn * 0.05, sgn * 1.12 * W), max(sgn * 0.05, sgn * 1.12 * W),
                            ys_.min() - 0.06, ys_.max() + 0.06)
            if win is not None:
                xs = cv.x[win] * sgn
                u = xs / W
                yc = curve_post(u)
                slope = (-0.09 + 2 * bend * u) / W
                d = (cv.y[win] - yc) / np.sqrt(1 + slope ** 2)
                h = (0.021 + 0.0015 * k) * (1 + 0.1 * np.clip(jitter[k, 2], -2, 2))
                f = fractures.get((side, k + 1))
                if f is not None:  # a cortical gap and, if displaced, a step-off laterally
                    step = 0.03 if f.severity == "displaced" else 0.0
                    d = np.where(u > 0.72, d - step, d)
                    gap_occ = _soft(np.abs(u - 0.72) * W - 0.01, cv.px)
                    hit = np.zeros(A.shape, bool)
                    hit[win] = (gap_occ > 0.5) & (np.abs(d) < h)
                    regions["Fracture"] = regions.get("Fracture", np.zeros(A.shape, bool)) | hit
                else:
                    gap_occ = 0.0
                oblique = 1 + 0.8 * np.clip((u - 0.85) / 0.2, 0, 1) ** 2  # the rib turns forward
                reach = _smoothstep((xs - 0.07) / 0.04) * (1 - _smoothstep((u - 1.0) / 0.08))
                A[win] += bone_k * 0.7 * _shell(d, h, inner=0.55) * oblique * reach * (1 - gap_occ)
            # Anterior rib: from the lateral wall medially and downwards; flatter and fainter.
            y_lat = curve_post(1.05)
            curve_ant = lambda u: y_lat + 0.34 * ((1.05 - u) / 0.75) ** 1.3
            ya_ = curve_ant(np.linspace(0.3, 1.05, 8))
            win = cv.window(min(sgn * 0.3 * W, sgn * 1.08 * W), max(sgn * 0.3 * W, sgn * 1.08 * W),
                            ya_.min() - 0.05, ya_.max() + 0.05)
            if win is not None:
                u = cv.x[win] * sgn / W
                d = cv.y[win] - curve_ant(np.clip(u, 0.3, 1.05))
                reach = _smoothstep((u - 0.32) / 0.08) * (1 - _smoothstep((u - 1.0) / 0.06))
                A[win] += bone_k * 0.35 * _shell(d, 0.026, inner=0.5) * reach
                if c.age > 55 and k < 8:  # calcified costal cartilage
                    A[win] += bone_k * 0.12 * min(1.0, (c.age - 55) / 30) * _tube(
                        cv.y[win] - curve_ant(0.3) - 0.04 * (0.3 - u), 0.012) * (u < 0.32) * (u > 0.12)


def _shoulder_girdle(A, cv: _Canvas, c: Case, an: _Anatomy, bone_k: float) -> None:
    W = an.W
    for side in ("right", "left"):
        sgn = -1.0 if side == "right" else 1.0
        # Clavicle: an S-shaped tube from the manubrium out over the apex to the acromion.
        mx, my = 0.09 + an.shift(6.0) * sgn, c.apex_y + 0.10
        lx, ly = 1.02 * W + 0.08, c.apex_y - 0.10
        win = cv.window(min(sgn * mx, sgn * lx) - 0.05, max(sgn * mx, sgn * lx) + 0.05, ly - 0.08, my + 0.08)
        if win is not None:
            xs = cv.x[win] * sgn
            s = np.clip((xs - mx) / (lx - mx), 0, 1)
            yc = my + (ly - my) * s + 0.025 * np.sin(2 * np.pi * s)
            d = (cv.y[win] - yc) * 0.95
            reach = _smoothstep((xs - mx + 0.02) / 0.03) * (1 - _smoothstep((xs - lx) / 0.03))
            A[win] += bone_k * _shell(d, 0.036, depth_scale=1.6) * reach
        # Scapula: a thin triangular plate with a thick lateral border; rotated off the lungs on PA.
        med = (0.95 if c.view == "PA" else 0.62) * W
        tri = [(med, c.apex_y - 0.02), (med + 0.10, c.apex_y + 0.62), (W + 0.20, c.apex_y + 0.02)]
        win = cv.window(min(sgn * med, sgn * (W + 0.25)) - 0.05, max(sgn * med, sgn * (W + 0.25)) + 0.05,
                        c.apex_y - 0.1, c.apex_y + 0.7)
        if win is not None:
            xs, yy = cv.x[win] * sgn, cv.y[win]
            sd = np.full(xs.shape, -np.inf, np.float32)
            for (x0, y0), (x1, y1) in zip(tri, tri[1:] + tri[:1]):
                nx, ny = y1 - y0, -(x1 - x0)
                nrm = np.hypot(nx, ny)
                sd = np.maximum(sd, ((xs - x0) * nx + (yy - y0) * ny) / nrm)
            plate = _soft(sd, 0.01)
            border = _tube(_polyline_distance(xs, yy, [tri[1], tri[2]]), 0.018)
            A[win] += bone_k * (MU_CORTEX * 0.45 * plate + 0.6 * MU_CORTEX * border * (plate > 0.1))


def _findings(A, cv, c, an, rng, lung_occ, lung_eff, in_lung, lung_all, mu_soft, regions) -> None:
    x, y, px, W, S = cv.x, cv.y, cv.px, an.W, cv.size

    def region(name, occ):
        regions[name] = regions.get(name, np.zeros(A.shape, bool)) | (occ > 0.5)

    for f in c.get("Pleural Effusion"):
        for s in _expand(f.side):
            h = {"small": 0.06, "moderate": 0.2, "large": 0.42}[f.severity or "small"]
            xs = -x if s == "right" else x
            if c.supine:  # layering posteriorly: a graded veil over the hemithorax, densest at the base
                layer = {"small": 2.0, "moderate": 4.0, "large": 7.0}[f.severity or "small"]
                grade = np.clip((y - c.apex_y) / (an.cp_y[s] - c.apex_y), 0, 1) ** 1.5
                occ = lung_occ[s]
                A += (MU_FLUID - MU_LUNG) * layer * grade * occ
                region("Pleural Effusion", occ * (grade > 0.5))
            else:  # upright: a meniscus rising to the lateral wall, blunting the angle
                surface = an.cp_y[s] - h - (0.06 + 0.3 * h) * np.clip(xs / W, 0, 1.1) ** 2
                fluid = _soft(y - surface, px * 3) * _soft(an.lung_sd(x, y, s) - 0.02, px * 2)
                A += (MU_FLUID - MU_LUNG) * np.maximum(lung_eff[s], 0.5 * c.depth_cm * 0.7) * fluid
                region("Pleural Effusion", fluid)

    for f in c.get("Consolidation"):
        occ_all = np.zeros_like(A)
        for s in _expand(f.side):
            dome = an.dome[s]
            loc = f.location or ""
            if "upper" in loc:
                lo, hi = c.apex_y, an.hilum_y + 0.02
            elif "middle" in loc:
                lo, hi = an.hilum_y, dome
            else:
                lo, hi = an.hilum_y + 0.05, dome + 0.1
            zone = _soft(np.maximum(lo - y, y - hi), 0.03)
            if "middle" in loc:  # the right middle lobe lies against the right heart border
                zone = zone * np.exp(-np.clip(-x + an.heart_x[0] - 0.15, 0, None) / 0.12)
            tex = ndimage.gaussian_filter(rng.standard_normal(A.shape).astype(np.float32), S / 40)
            tex = (tex - tex.min()) / (np.ptp(tex) + 1e-6)
            fill = np.clip(tex * 2.2 - 0.9, 0, 1) if f.severity == "patchy" else np.clip(0.55 + 0.7 * tex, 0, 1)
            occ = zone * fill * in_lung[s]
            A += (MU_FLUID - MU_LUNG) * lung_eff[s] * 0.85 * occ
            occ_all = np.maximum(occ_all, occ)
            # Air bronchograms: the bronchial tree shows as dark branches inside the opacity.
            hx, hy = an.hila[s]
            sgn = -1.0 if s == "right" else 1.0
            tree = _vessel_tree(rng, (hx, hy), sgn, angles=(-60, 0, 45, 80), r0=0.016, l0=0.12, levels=5)
            bx, by, br, bl = _tree_points(tree, 0.7 * px)
            A -= _splat_tubes(cv, bx, by, br, bl, dmu=MU_FLUID) * (occ > 0.4)
        region("Consolidation", occ_all)

    for f in c.get("Atelectasis"):
        for s in _expand(f.side):
            hx, _ = an.hila[s]
            base = an.dome[s] - 0.13
            band = np.exp(-0.5 * ((y - base - 0.05 * (x - hx)) / 0.012) ** 2) * in_lung[s]
            band = band * (np.abs(x - hx * 1.6) < 0.35)
            A += (MU_FLUID - MU_LUNG) * 0.5 * lung_eff[s] * band
            region("Atelectasis", band)

    for f in c.get("Edema"):
        w = {"mild": 0.10, "moderate": 0.2, "severe": 0.35}[f.severity or "mild"]
        haze = np.zeros_like(A)
        for (hx, hy) in an.hila.values():  # perihilar, "bat-wing"
            haze += np.exp(-((x - hx) ** 2 / (2 * 0.25 ** 2) + (y - hy) ** 2 / (2 * 0.30 ** 2)))
        lung_total = lung_eff["right"] * in_lung["right"] + lung_eff["left"] * in_lung["left"]
        A += (MU_FLUID - MU_LUNG) * w * np.clip(haze, 0, 1) * lung_total
        for s in ("right", "left"):  # Kerley B lines: short horizontal lines at the lateral bases
            xs = -x if s == "right" else x
            for j in range(4 + 2 * (f.severity != "mild")):
                ly = an.cp_y[s] - 0.05 - j * 0.035 - rng.uniform(0, 0.01)
                seg = np.exp(-0.5 * ((y - ly) / (0.4 * px + 0.002)) ** 2) * _soft(np.abs(xs - (W - 0.04)) - 0.04, px)
                A += mu_soft * 0.6 * seg * in_lung[s]
        region("Edema", np.clip(haze, 0, 1) * lung_all > 0.4)

    for f in c.get("Lung Lesion"):
        s = f.side
        zone_y = {"upper": 0.25, "mid": 0.5, "lower": 0.72}[f.extra["zone"]]
        cy = c.apex_y + zone_y * (an.dome[s] - c.apex_y)
        cx = (-1 if s == "right" else 1) * (0.25 * W + f.extra["u"] * 0.6 * W)
        r = f.size_cm / 2 / CM_PER_UNIT
        win = cv.window(cx - 1.6 * r, cx + 1.6 * r, cy - 1.6 * r, cy + 1.6 * r)
        if win is None:
            continue
        d = np.hypot(x[win] - cx, (y[win] - cy) / 0.92)
        ch = _tube(d, r)
        if f.severity == "mass":  # lobulated
            d2 = np.hypot(x[win] - cx - 0.6 * r, y[win] - cy + 0.4 * r)
            ch = np.maximum(ch, _tube(d2, 0.6 * r))
        A[win] += (mu_soft - MU_LUNG) * ch
        occ = np.zeros(A.shape, np.float32)
        occ[win] = ch > 0
        region("Lung Lesion", occ)

    for f in c.get("Pleural Other"):
        for s in _expand(f.side):
            xs = -x if s == "right" else x
            wall = np.exp(-0.5 * ((xs - (W - 0.015)) / 0.012) ** 2) * _soft(np.abs(y - (c.apex_y + 0.45)) - 0.28, px)
            A += mu_soft * 2.0 * wall * (1 + 0.4 * np.sin(y * 60))
            region("Pleural Other", wall)


def _device(A, cv: _Canvas, c: Case, an: _Anatomy, f, mark) -> None:
    kind, W = f.severity, an.W
    ra, lv = an.ra, an.lv
    if kind == "ett":
        tip_y = an.carina_y - f.extra.get("tip_cm_above_carina", 4.0) / CM_PER_UNIT
        pts = [(0.0, -2.0), (-0.005, tip_y)]
        mark("ett_tip", -0.005, tip_y)
        width, stripe = 0.028, 0.004
    elif kind == "ng_tube":
        tip = (0.42 * W + 0.08, an.dome["left"] + 0.16)
        pts = _smooth_path([(0.025, -2.0), (0.03, an.carina_y), (0.05, an.heart_top + 0.2),
                            (0.12, an.dome["left"] + 0.05), (0.3 * W, an.dome["left"] + 0.14), tip])
        mark("ng_tip", *tip)
        width, stripe = 0.012, 0.004
    elif kind == "central_line":
        tip = (-0.075, ra["cy"] - ra["ay"] - 0.02)  # lower SVC / cavo-atrial junction
        pts = _smooth_path([(-0.30, c.apex_y - 0.45), (-0.15, c.apex_y - 0.05),
                            (-0.085, an.carina_y - 0.05), tip])
        mark("cvc_tip", *tip)
        width, stripe = 0.010, 0.003
    elif kind == "pacemaker":
        bx, by = 0.55 * W, c.apex_y + 0.16
        win = cv.window(bx - 0.12, bx + 0.12, by - 0.09, by + 0.09)
        if win is not None:  # the generator can: a rounded metal box
            sd = np.hypot(np.clip(np.abs(cv.x[win] - bx) - 0.05, 0, None),
                          np.clip(np.abs(cv.y[win] - by) - 0.03, 0, None)) - 0.02
            A[win] += MU_METAL * 0.6 * _soft(sd, cv.px)
        mark("pacemaker_can", bx, by)
        tip = (lv["cx"] + 0.45 * lv["hx"], lv["cy"] + 0.55 * lv["hy"])  # right ventricular apex
        pts = _smooth_path([(bx - 0.05, by), (0.15, c.apex_y + 0.08), (-0.07, an.carina_y),
                            (ra["cx"], ra["cy"]), tip])
        mark("lead_tip", *tip)
        width, stripe = 0.0, 0.005
    else:
        raise ValueError(f"unknown device {kind!r}")
    xs_, ys_ = np.asarray(pts).T
    win = cv.window(xs_.min() - 0.05, xs_.max() + 0.05, max(ys_.min(), -2.0) - 0.05, ys_.max() + 0.05)
    if win is None:
        return
    d = _polyline_distance(cv.x[win], cv.y[win], pts)
    if width:  # plastic tube wall
        A[win] += 0.25 * MU_SOFT * _tube(d, width)
    A[win] += MU_METAL * 0.35 * _tube(d, stripe)  # radio-opaque stripe / wire


def _expose_and_process(A: np.ndarray, c: Case, rng: np.random.Generator, size: int) -> np.ndarray:
    """Detector (transmission, scatter, quanta, blur) and CR/DX post-processing -> display."""
    primary = np.exp(-np.clip(A, 0, None))
    signal = primary + c.scatter * _lowpass(primary, size / 8)
    quanta = c.photons * (256.0 / size) ** 2
    counts = signal * quanta
    counts = counts + np.sqrt(counts) * rng.standard_normal(A.shape).astype(np.float32)
    signal = ndimage.gaussian_filter(np.clip(counts, 1.0, None) / quanta, 0.45)
    P = -np.log(signal)  # log amplifier: proportional to attenuation, bright = dense
    lo, hi = np.percentile(P, [1.0, 99.9])  # exposure recognition
    P = (P - lo) / max(hi - lo, 1e-6)
    low = _lowpass(P, size / 12)
    P = P - c.range_compression * (low - low.mean())  # large-scale range compression
    P = P + c.detail_gain * (P - _lowpass(P, size / 96))  # mid-frequency enhancement
    k, m = c.tone_slope, c.tone_centre
    sig = lambda v: 1 / (1 + np.exp(-k * (v - m)))
    out = (sig(P) - sig(0.0)) / (sig(1.0) - sig(0.0))
    if c.fine_unsharp > 0:
        out = out + c.fine_unsharp * (out - ndimage.gaussian_filter(out, 1.0))
    return out


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
