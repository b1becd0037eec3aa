"""Inner loops of the PAF decoder (see decode.py for the algorithm).

Each ``*_loop``/plain kernel is one self-contained function of arrays and
scalars that calls no other function of ours, so the very same source runs
either compiled by numba (``numba.njit(cache=True)`` in decode.py) or as
plain Python. Without numba, the two kernels that touch every cell or every
candidate pair have vectorized NumPy twins (``find_peaks_numpy``,
``score_limbs_numpy``: a Python loop there would be far too slow), and the
grouping kernels, which only see the few kept candidates, run as Python.
Both paths give the same people.

Coordinates here are in map cells (fractional after refinement).
"""

from __future__ import annotations

import math

import numpy as np

REFINE_NONE, REFINE_QUADRATIC, REFINE_GAUSSIAN = 0, 1, 2


def find_peaks_loop(heat, num_joints, threshold, refine):
    """Local maxima of heat[:, :, :num_joints] above threshold.

    A cell is a peak when it is strictly greater than its 4 neighbours that
    come before it in raster order (left, up-left, up, up-right) and at
    least equal to the 4 after it. A flat top of equal values (a joint that
    falls half-way between two cell centres gives two equal cells) thus
    yields exactly one peak, at its first cell, and the sub-cell fit then
    moves it to the middle of the plateau.

    Returns (x, y, value, joint, start): peaks sorted by joint (raster
    order within a joint); peaks of joint j are start[j]:start[j+1].
    """
    h, w = heat.shape[0], heat.shape[1]
    J = num_joints
    cap = ((h + 1) // 2) * ((w + 1) // 2) * J  # peaks can never touch each other
    cy = np.empty(cap, np.int64)
    cx = np.empty(cap, np.int64)
    cj = np.empty(cap, np.int64)
    n = 0
    for y in range(h):
        for x in range(w):
            for j in range(J):
                v = heat[y, x, j]
                if not v > threshold:
                    continue
                ok = True
                if x > 0 and heat[y, x - 1, j] >= v:
                    ok = False
                elif x + 1 < w and heat[y, x + 1, j] > v:
                    ok = False
                elif y > 0 and (heat[y - 1, x, j] >= v
                                or (x > 0 and heat[y - 1, x - 1, j] >= v)
                                or (x + 1 < w and heat[y - 1, x + 1, j] >= v)):
                    ok = False
                elif y + 1 < h and (heat[y + 1, x, j] > v
                                    or (x > 0 and heat[y + 1, x - 1, j] > v)
                                    or (x + 1 < w and heat[y + 1, x + 1, j] > v)):
                    ok = False
                if ok:
                    cy[n] = y
                    cx[n] = x
                    cj[n] = j
                    n += 1
    # Counting sort by joint keeps raster order within each joint.
    start = np.zeros(J + 1, np.int64)
    for i in range(n):
        start[cj[i] + 1] += 1
    for j in range(J):
        start[j + 1] += start[j]
    fill = start[:J].copy()
    px = np.empty(n, np.float64)
    py = np.empty(n, np.float64)
    pv = np.empty(n, np.float64)
    pj = np.empty(n, np.int64)
    for i in range(n):
        j = cj[i]
        k = fill[j]
        fill[j] += 1
        y = cy[i]
        x = cx[i]
        v = heat[y, x, j]
        pj[k] = j
        pv[k] = v
        dx = 0.0
        dy = 0.0
        if refine != REFINE_NONE:
            for axis in range(2):
                if axis == 0:
                    if x == 0 or x + 1 >= w:
                        continue
                    a = float(heat[y, x - 1, j])
                    c = float(heat[y, x + 1, j])
                else:
                    if y == 0 or y + 1 >= h:
                        continue
                    a = float(heat[y - 1, x, j])
                    c = float(heat[y + 1, x, j])
                b = float(v)
                # A gaussian is a parabola in log space: exact for a lone peak.
                # Fall back to a parabola on the values where a log is undefined.
                if refine == REFINE_GAUSSIAN and a > 1e-6 and c > 1e-6:
                    a = math.log(a)
                    b = math.log(b)
                    c = math.log(c)
                den = a - 2.0 * b + c
                off = 0.0
                if den < 0.0:
                    off = 0.5 * (a - c) / den
                    if off > 0.5:
                        off = 0.5
                    elif off < -0.5:
                        off = -0.5
                if axis == 0:
                    dx = off
                else:
                    dy = off
            # A flat top wider than two cells (maps upsampled by repeating
            # cells): its middle.
            run = 1
            while x + run < w and heat[y, x + run, j] == v:
                run += 1
            if run >= 3:
                dx = 0.5 * (run - 1)
            run = 1
            while y + run < h and heat[y + run, x, j] == v:
                run += 1
            if run >= 3:
                dy = 0.5 * (run - 1)
        px[k] = x + dx
        py[k] = y + dy
    return px, py, pv, pj, start


def find_peaks_numpy(heat, num_joints, threshold, refine):
    """Vectorized twin of find_peaks_loop (same peaks, same order)."""
    h, w = heat.shape[0], heat.shape[1]
    J = num_joints
    hm = heat[:, :, :J]
    pad = np.full((h + 2, w + 2, J), -np.inf, dtype=hm.dtype)
    pad[1:-1, 1:-1] = hm
    c = pad[1:-1, 1:-1]

    def nb(dy, dx):
        return pad[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    m = c > threshold
    for dy, dx in ((0, -1), (-1, -1), (-1, 0), (-1, 1)):
        m &= c > nb(dy, dx)
    for dy, dx in ((0, 1), (1, -1), (1, 0), (1, 1)):
        m &= c >= nb(dy, dx)
    ys, xs, js = np.nonzero(m)
    order = np.argsort(js, kind="stable")
    ys, xs, js = ys[order], xs[order], js[order]
    pv = hm[ys, xs, js].astype(np.float64)
    start = np.zeros(J + 1, np.int64)
    start[1:] = np.cumsum(np.bincount(js, minlength=J))
    offs = []
    for axis in range(2):
        pos, size = (xs, w) if axis == 0 else (ys, h)
        inside = (pos > 0) & (pos + 1 < size)
        lo = np.clip(pos - 1, 0, size - 1)
        hi = np.clip(pos + 1, 0, size - 1)
        if axis == 0:
            a = hm[ys, lo, js].astype(np.float64)
            cc = hm[ys, hi, js].astype(np.float64)
        else:
            a = hm[lo, xs, js].astype(np.float64)
            cc = hm[hi, xs, js].astype(np.float64)
        b = pv.copy()
        if refine == REFINE_GAUSSIAN:
            lg = (a > 1e-6) & (cc > 1e-6)
            a = np.where(lg, np.log(np.where(lg, a, 1.0)), a)
            cc = np.where(lg, np.log(np.where(lg, cc, 1.0)), cc)
            b = np.where(lg, np.log(np.maximum(b, 1e-300)), b)
        den = a - 2.0 * b + cc
        ok = inside & (den < 0) & (refine != REFINE_NONE)
        off = np.where(ok, 0.5 * (a - cc) / np.where(ok, den, -1.0), 0.0)
        off = np.clip(off, -0.5, 0.5)
        if refine != REFINE_NONE:
            for n in np.nonzero((pos + 2 < size) & (cc == b))[0]:
                run = 1
                while pos[n] + run < size and (
                        (hm[ys[n], xs[n] + run, js[n]] if axis == 0
                         else hm[ys[n] + run, xs[n], js[n]]) == pv[n]):
                    run += 1
                if run >= 3:
                    off[n] = 0.5 * (run - 1)
        offs.append(off)
    return xs + offs[0], ys + offs[1], pv, js.astype(np.int64), start


def score_limbs_loop(px, py, start, paf, skeleton, paf_threshold, min_pass_fraction,
                     min_samples, max_samples, max_length, length_weight):
    """Score every candidate limb on the PAFs.

    A candidate joins a peak of the limb's first joint to one of its second;
    it is sampled at n points strictly inside the segment (n = its length in
    cells + 1, clipped to [min_samples, max_samples]), each sample is the
    bilinear PAF dotted with the unit segment direction, and it is kept when
    at least min_pass_fraction of the samples exceed paf_threshold and
    their mean (the limb score) is positive.

    Returns the kept candidates (limb, peak a, peak b, score, sort key)
    ordered by limb, a, b; the key is the score minus length_weight * length
    (ties go to the shorter limb).
    """
    h, w = paf.shape[0], paf.shape[1]
    E = skeleton.shape[0]
    # Kept candidates are few next to all pairs (which can reach millions on
    # noisy maps with a low threshold): start small and grow by doubling.
    cap = 64
    ck = np.empty(cap, np.int64)
    ca = np.empty(cap, np.int64)
    cb = np.empty(cap, np.int64)
    cs = np.empty(cap, np.float64)
    ckey = np.empty(cap, np.float64)
    nc = 0
    for k in range(E):
        ja = skeleton[k, 0]
        jb = skeleton[k, 1]
        for a in range(start[ja], start[ja + 1]):
            ax = px[a]
            ay = py[a]
            for b in range(start[jb], start[jb + 1]):
                dx = px[b] - ax
                dy = py[b] - ay
                length = math.sqrt(dx * dx + dy * dy)
                if length > max_length:
                    continue
                if length < 1e-6:
                    continue
                ux = dx / length
                uy = dy / length
                n = int(math.ceil(length)) + 1
                if n < min_samples:
                    n = min_samples
                if n > max_samples:
                    n = max_samples
                allowed_fail = n - int(math.ceil(min_pass_fraction * n - 1e-9))
                fails = 0
                total = 0.0
                for i in range(n):
                    t = (i + 0.5) / n
                    sx = ax + t * dx
                    sy = ay + t * dy
                    x0 = int(math.floor(sx))
                    y0 = int(math.floor(sy))
                    fx = sx - x0
                    fy = sy - y0
                    vx = 0.0
                    vy = 0.0
                    for oy in range(2):
                        yy = y0 + oy
                        if yy < 0 or yy >= h:
                            continue
                        wy = fy if oy == 1 else 1.0 - fy
                        for ox in range(2):
                            xx = x0 + ox
                            if xx < 0 or xx >= w:
                                continue
                            wt = wy * (fx if ox == 1 else 1.0 - fx)
                            vx += wt * paf[yy, xx, 2 * k]
                            vy += wt * paf[yy, xx, 2 * k + 1]
                    d = vx * ux + vy * uy
                    total += d
                    if not d > paf_threshold:
                        fails += 1
                        if fails > allowed_fail:
                            break
                if fails > allowed_fail:
                    continue
                score = total / n
                if not score > 0.0:
                    continue
                if nc == cap:
                    cap *= 2
                    ck2 = np.empty(cap, np.int64)
                    ca2 = np.empty(cap, np.int64)
                    cb2 = np.empty(cap, np.int64)
                    cs2 = np.empty(cap, np.float64)
                    ckey2 = np.empty(cap, np.float64)
                    ck2[:nc] = ck
                    ca2[:nc] = ca
                    cb2[:nc] = cb
                    cs2[:nc] = cs
                    ckey2[:nc] = ckey
                    ck, ca, cb, cs, ckey = ck2, ca2, cb2, cs2, ckey2
                ck[nc] = k
                ca[nc] = a
                cb[nc] = b
                cs[nc] = score
                ckey[nc] = score - length_weight * length
                nc += 1
    return ck[:nc], ca[:nc], cb[:nc], cs[:nc], ckey[:nc]


def assemble_people(ck, ca, cb, cs, ckey, pj, num_peaks, num_joints, skeleton):
    """Greedy grouping of scored limbs into people.

    All candidates of all limbs are taken in one global order of decreasing
    key: a candidate is accepted when neither of its peaks already has a
    limb of that type and joining its two peaks' people creates no joint
    twice. Accepting merges the two people (or starts one), so the result
    does not depend on limb order and cycles in the skeleton (ear-shoulder)
    are harmless.

    Returns (slots [N, J] peak index or -1, limb score sum [N], limb count
    [N]); every peak belongs to exactly one person (lone peaks form
    one-joint people; the caller filters).
    """
    E = skeleton.shape[0]
    J = num_joints
    P = num_peaks
    nc = ck.shape[0]
    order = np.argsort(-ckey, kind="mergesort")
    owner = np.full(P, -1, np.int64)
    used = np.zeros((E, P), np.bool_)
    slots = np.full((P, J), -1, np.int64)
    lsum = np.zeros(P, np.float64)
    lcnt = np.zeros(P, np.int64)
    npers = 0
    for oi in range(nc):
        c = order[oi]
        k = ck[c]
        a = ca[c]
        b = cb[c]
        if used[k, a] or used[k, b]:
            continue
        ja = skeleton[k, 0]
        jb = skeleton[k, 1]
        pa = owner[a]
        pb = owner[b]
        if pa < 0 and pb < 0:
            p = npers
            npers += 1
            slots[p, ja] = a
            slots[p, jb] = b
            owner[a] = p
            owner[b] = p
        elif pb < 0:
            p = pa
            if slots[p, jb] >= 0:
                continue
            slots[p, jb] = b
            owner[b] = p
        elif pa < 0:
            p = pb
            if slots[p, ja] >= 0:
                continue
            slots[p, ja] = a
            owner[a] = p
        elif pa == pb:
            p = pa
        else:
            clash = False
            for j in range(J):
                if slots[pa, j] >= 0 and slots[pb, j] >= 0:
                    clash = True
                    break
            if clash:
                continue
            p = pa
            for j in range(J):
                q = slots[pb, j]
                if q >= 0:
                    slots[p, j] = q
                    owner[q] = p
                    slots[pb, j] = -1
            lsum[p] += lsum[pb]
            lcnt[p] += lcnt[pb]
            lsum[pb] = 0.0
            lcnt[pb] = 0
        used[k, a] = True
        used[k, b] = True
        lsum[p] += cs[c]
        lcnt[p] += 1
    for q in range(P):
        if owner[q] < 0:
            slots[npers, pj[q]] = q
            owner[q] = npers
            npers += 1
    # Drop the people emptied by merges, keeping creation order.
    keep = np.zeros(npers, np.bool_)
    for p in range(npers):
        for j in range(J):
            if slots[p, j] >= 0:
                keep[p] = True
                break
    idx = np.nonzero(keep)[0]
    return slots[idx], lsum[idx], lcnt[idx]


def _paf_dots(px, py, a, k, dx, dy, ux, uy, n, i, paf):
    """PAF . direction at samples i [pairs, m] (i < n) of each candidate,
    with exactly score_limbs_loop's arithmetic; unused entries are 0."""
    h, w = paf.shape[0], paf.shape[1]
    valid = i < n[:, None]
    t = (i + 0.5) / n[:, None]
    sx = px[a][:, None] + t * dx[:, None]
    sy = py[a][:, None] + t * dy[:, None]
    x0 = np.floor(sx).astype(np.int64)
    y0 = np.floor(sy).astype(np.int64)
    fx = sx - x0
    fy = sy - y0
    vx = np.zeros(sx.shape)
    vy = np.zeros(sx.shape)
    kk = np.broadcast_to(2 * k[:, None], sx.shape)
    for oy in range(2):
        yy = y0 + oy
        wy = fy if oy == 1 else 1.0 - fy
        for ox in range(2):
            xx = x0 + ox
            inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
            yc = np.clip(yy, 0, h - 1)
            xc = np.clip(xx, 0, w - 1)
            wt = np.where(inside, wy * (fx if ox == 1 else 1.0 - fx), 0.0)
            vx = vx + wt * paf[yc, xc, kk]
            vy = vy + wt * paf[yc, xc, kk + 1]
    d = vx * ux[:, None] + vy * uy[:, None]
    return np.where(valid, d, 0.0), valid


def score_limbs_numpy(px, py, start, paf, skeleton, paf_threshold, min_pass_fraction,
                      min_samples, max_samples, max_length, length_weight, chunk=1 << 17):
    """Vectorized twin of score_limbs_loop (same candidates, same order and,
    summing in the same order, the same scores). Pairs are scored in chunks
    of whole limbs of about ``chunk`` pairs, so memory stays bounded on
    noisy maps with very many peaks."""
    outs = []
    ks, As, Bs = [], [], []
    size = 0
    E = skeleton.shape[0]
    for k in range(E):
        ja, jb = int(skeleton[k, 0]), int(skeleton[k, 1])
        a = np.arange(start[ja], start[ja + 1])
        b = np.arange(start[jb], start[jb + 1])
        if a.size and b.size:
            aa, bb = np.meshgrid(a, b, indexing="ij")
            As.append(aa.ravel())
            Bs.append(bb.ravel())
            ks.append(np.full(aa.size, k, np.int64))
            size += aa.size
        if ks and (size >= chunk or k == E - 1):
            outs.append(_score_pairs_numpy(np.concatenate(ks), np.concatenate(As),
                                           np.concatenate(Bs), px, py, paf, paf_threshold,
                                           min_pass_fraction, min_samples, max_samples,
                                           max_length, length_weight))
            ks, As, Bs = [], [], []
            size = 0
    if not outs:
        empty_i = np.zeros(0, np.int64)
        empty_f = np.zeros(0, np.float64)
        return empty_i, empty_i, empty_i, empty_f, empty_f
    if len(outs) == 1:
        return outs[0]
    return tuple(np.concatenate([o[i] for o in outs]) for i in range(5))


def _score_pairs_numpy(kk, a, b, px, py, paf, paf_threshold, min_pass_fraction, min_samples,
                       max_samples, max_length, length_weight):
    dx = px[b] - px[a]
    dy = py[b] - py[a]
    length = np.sqrt(dx * dx + dy * dy)
    n = np.clip(np.ceil(length).astype(np.int64) + 1, min_samples, max_samples)
    allowed = n - np.ceil(min_pass_fraction * n - 1e-9).astype(np.int64)
    ok = (length <= max_length) & (length >= 1e-6)
    with np.errstate(divide="ignore", invalid="ignore"):
        ux = dx / length
        uy = dy / length
    # First 5 spread-out samples: a pair failing more of them than it may
    # fail in all is out (most wrong pairs), and is never sampled in full.
    j = np.arange(5)
    i5 = np.where(n[:, None] >= 5, ((j + 0.5) * n[:, None] / 5).astype(np.int64), j)
    sel = np.nonzero(ok)[0]
    d5, v5 = _paf_dots(px, py, a[sel], kk[sel], dx[sel], dy[sel], ux[sel], uy[sel], n[sel],
                       i5[sel], paf)
    sel = sel[(v5 & ~(d5 > paf_threshold)).sum(1) <= allowed[sel]]
    m = int(n[sel].max()) if sel.size else 0
    i = np.broadcast_to(np.arange(m), (sel.size, m))
    d, valid = _paf_dots(px, py, a[sel], kk[sel], dx[sel], dy[sel], ux[sel], uy[sel], n[sel],
                         i, paf)
    total = np.cumsum(d, axis=1)[:, -1] if m else np.zeros(0)  # sequential, as in the loop
    fails = (valid & ~(d > paf_threshold)).sum(1)
    score = total / n[sel]
    keep = (fails <= allowed[sel]) & (score > 0.0)
    sel = sel[keep]
    return kk[sel], a[sel], b[sel], score[keep], score[keep] - length_weight * length[sel]

def merge_fragments(slots, lsum, lcnt, eligible, px, py, skeleton, hops, max_hops, max_ratio):
    """Join pieces of one person that no limb links (in place on slots).

    A person whose labeled joints do not form a connected part of the
    skeleton (both legs but no neck, a wrist without its elbow) has no PAF
    between its pieces, so grouping returns them as separate people. Two
    people with no joint in common are merged when some joint a of one and
    b of the other, at most max_hops limbs apart in the skeleton, lie
    closer than max_ratio * hops(a, b) * scale, scale being the mean limb
    length of the two (people with no limb take the other's). Pairs are
    merged best (smallest ratio) first, re-checking joint overlap. Only
    people marked eligible take part (the caller leaves out noise-level
    ones, so a weak stray peak is not glued onto a body).

    Limb sums and counts (lsum, lcnt) follow the merges. Returns a [N]
    bool array: the people still alive.
    """
    N, J = slots.shape[0], slots.shape[1]
    E = skeleton.shape[0]
    alive = np.ones(N, np.bool_)
    scale = np.zeros(N, np.float64)
    box = np.empty((N, 4), np.float64)  # x0, y0, x1, y1 of each person's joints
    for p in range(N):
        tot = 0.0
        cnt = 0
        for k in range(E):
            a = slots[p, skeleton[k, 0]]
            b = slots[p, skeleton[k, 1]]
            if a >= 0 and b >= 0:
                tot += math.sqrt((px[a] - px[b]) ** 2 + (py[a] - py[b]) ** 2)
                cnt += 1
        if cnt > 0:
            scale[p] = tot / cnt
        box[p, 0] = np.inf
        box[p, 1] = np.inf
        box[p, 2] = -np.inf
        box[p, 3] = -np.inf
        for j in range(J):
            i = slots[p, j]
            if i >= 0:
                box[p, 0] = min(box[p, 0], px[i])
                box[p, 1] = min(box[p, 1], py[i])
                box[p, 2] = max(box[p, 2], px[i])
                box[p, 3] = max(box[p, 3], py[i])
    cap = 64
    pa_ = np.empty(cap, np.int64)
    pb_ = np.empty(cap, np.int64)
    pr_ = np.empty(cap, np.float64)
    m = 0
    for p in range(N):
        if not eligible[p]:
            continue
        for q in range(p + 1, N):
            if not eligible[q]:
                continue
            s = scale[p]
            if scale[q] > s:
                s = scale[q]
            if s <= 0.0:
                continue
            # No two joints can be close enough when the boxes are this far.
            gap_x = max(box[q, 0] - box[p, 2], box[p, 0] - box[q, 2])
            gap_y = max(box[q, 1] - box[p, 3], box[p, 1] - box[q, 3])
            reach = max_ratio * max_hops * s
            if gap_x > reach or gap_y > reach:
                continue
            best = max_ratio + 1.0
            clash = False
            for a in range(J):
                ia = slots[p, a]
                if ia < 0:
                    continue
                if slots[q, a] >= 0:
                    clash = True
                    break
                for b in range(J):
                    ib = slots[q, b]
                    if ib < 0:
                        continue
                    hp = hops[a, b]
                    if hp > max_hops or hp <= 0:
                        continue
                    d = math.sqrt((px[ia] - px[ib]) ** 2 + (py[ia] - py[ib]) ** 2)
                    r = d / (hp * s)
                    if r < best:
                        best = r
            if clash or best > max_ratio:
                continue
            if m == cap:
                cap *= 2
                pa2 = np.empty(cap, np.int64)
                pb2 = np.empty(cap, np.int64)
                pr2 = np.empty(cap, np.float64)
                pa2[:m] = pa_
                pb2[:m] = pb_
                pr2[:m] = pr_
                pa_, pb_, pr_ = pa2, pb2, pr2
            pa_[m] = p
            pb_[m] = q
            pr_[m] = best
            m += 1
    order = np.argsort(pr_[:m], kind="mergesort")
    root = np.arange(N)
    for oi in range(m):
        p = pa_[order[oi]]
        q = pb_[order[oi]]
        while root[p] != p:
            p = root[p]
        while root[q] != q:
            q = root[q]
        if p == q:
            continue
        ok = True
        for j in range(J):
            if slots[p, j] >= 0 and slots[q, j] >= 0:
                ok = False
                break
        if not ok:
            continue
        for j in range(J):
            if slots[q, j] >= 0:
                slots[p, j] = slots[q, j]
                slots[q, j] = -1
        lsum[p] += lsum[q]
        lcnt[p] += lcnt[q]
        root[q] = p
        alive[q] = False
    return alive
