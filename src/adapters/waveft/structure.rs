//! The per-layer sparse structure of WaveFT's ΔW, built once from PEFT's coefficient positions.
//!
//! ΔW = scaling · S(spectrum), where S is linear: coefficient `k` (at row `rows[k]`, column `cols[k]`
//! of the layer grid) contributes `w · spectrum[k]` to a few ΔW entries. For db1 (Haar) a coefficient
//! touches one 2x2 block with weights ±½ (fewer at an odd border, where PEFT's crop drops the last
//! row/column); for a filter with F taps it touches up to F×F entries; without IDWT it is the single
//! entry `(rows[k], cols[k])` with weight 1.
//!
//! Derivation (PEFT `get_delta_weight` + `waverec2d`, per axis, see [`AxisGeometry`]): the coefficient
//! is scattered to `p = i + offset` of a padded grid whose halves are the bands; with `q = p mod half`
//! and band `b = p >= half`, `conv_transpose2d(stride 2)` adds `filter[tap] · c` at `2q + tap`, and the
//! two crops shift that by `-skip`. The 2-D filter of a quadrant is `outer(row_filter, col_filter)` with
//! quadrants `[cA cH; cV cD]` mapped to `[ll, lh, hl, hh] = [lo⊗lo, hi⊗lo, lo⊗hi, hi⊗hi]`, so the
//! **row** filter is `hi` for the right half (column band 1) and the **column** filter is `hi` for the
//! bottom half (row band 1). For db1: `ΔW[2q_r + a, 2q_c + b] = ½·(cA ± cH ± cV ± cD)` with the signs
//! of `a` (for cH), `b` (for cV) and `a⊕b` (for cD).
//!
//! Several coefficients can touch the same ΔW entry (the four quadrants share a 2x2 block), so the
//! structure keeps the *unique* positions (CSR by output row, and a column-major view for dx) and the
//! synthesis matrix S between coefficients and positions in both directions (by position for the
//! forward synthesis, by coefficient for the adjoint in the backward pass).

use super::wavelets::{AxisGeometry, wavelet_filters};
use crate::error::{Error, Result};

/// One nonzero of the synthesis matrix: `ΔW[row, col] += scaling · weight · spectrum[coef]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WaveFtEntry {
    pub row: usize,
    pub col: usize,
    pub coef: usize,
    pub weight: f32,
}

/// Host arrays of the structure (i32 so that the same arrays can be uploaded for the CUDA kernels).
#[derive(Clone, Debug, Default)]
pub(crate) struct HostStructure {
    /// Unique positions sorted by (row, col): CSR by row.
    pub row_ptr: Vec<i32>, // [out + 1]
    pub pos_row: Vec<i32>, // [nnz]
    pub pos_col: Vec<i32>, // [nnz]
    /// Synthesis by position: value[p] = Σ syn_w[e] · spectrum[syn_coef[e]], e in syn_ptr[p]..syn_ptr[p+1].
    pub syn_ptr: Vec<i32>, // [nnz + 1]
    pub syn_coef: Vec<i32>, // [entries]
    pub syn_w: Vec<f32>,   // [entries]
    /// Adjoint by coefficient: dspectrum[k] = Σ ana_w[e] · G[ana_pos[e]], e in ana_ptr[k]..ana_ptr[k+1].
    pub ana_ptr: Vec<i32>, // [n + 1]
    pub ana_pos: Vec<i32>, // [entries]
    pub ana_w: Vec<f32>,   // [entries]
    /// Column view for dx: positions sorted by (col, row); col_perm maps to the row-major index.
    pub col_ptr: Vec<i32>, // [in + 1]
    pub col_row: Vec<i32>, // [nnz]
    pub col_perm: Vec<i32>, // [nnz]
}

impl HostStructure {
    pub fn nnz(&self) -> usize {
        self.pos_col.len()
    }
    pub fn entries(&self) -> usize {
        self.syn_coef.len()
    }
}

/// Builds the structure from the raw synthesis entries `(row, col, coef, weight)`.
pub(crate) fn assemble(
    out: usize,
    inp: usize,
    n: usize,
    mut entries: Vec<(u32, u32, u32, f32)>,
) -> Result<HostStructure> {
    if entries.len() > i32::MAX as usize {
        return Err(Error::invalid(format!(
            "WaveFT structure has {} entries, more than the i32 indices of the kernels allow",
            entries.len()
        )));
    }
    entries.sort_unstable_by_key(|&(r, c, k, _)| (r, c, k));
    let mut h = HostStructure {
        row_ptr: vec![0; out + 1],
        ana_ptr: vec![0; n + 1],
        col_ptr: vec![0; inp + 1],
        ..Default::default()
    };
    h.syn_ptr.push(0);
    let mut last: Option<(u32, u32)> = None;
    for &(r, c, k, w) in &entries {
        if last != Some((r, c)) {
            if last.is_some() {
                h.syn_ptr.push(h.syn_coef.len() as i32);
            }
            h.pos_row.push(r as i32);
            h.pos_col.push(c as i32);
            h.row_ptr[r as usize + 1] += 1;
            h.col_ptr[c as usize + 1] += 1;
            last = Some((r, c));
        }
        h.syn_coef.push(k as i32);
        h.syn_w.push(w);
        h.ana_ptr[k as usize + 1] += 1;
    }
    if last.is_some() {
        h.syn_ptr.push(h.syn_coef.len() as i32);
    }
    for i in 0..out {
        h.row_ptr[i + 1] += h.row_ptr[i];
    }
    for i in 0..n {
        h.ana_ptr[i + 1] += h.ana_ptr[i];
    }
    for i in 0..inp {
        h.col_ptr[i + 1] += h.col_ptr[i];
    }
    // Adjoint lists by coefficient, positions ascending within a coefficient (deterministic order).
    let nnz = h.pos_col.len();
    let e = h.syn_coef.len();
    let mut fill: Vec<i32> = h.ana_ptr[..n].to_vec();
    h.ana_pos = vec![0; e];
    h.ana_w = vec![0.0; e];
    for p in 0..nnz {
        for s in h.syn_ptr[p] as usize..h.syn_ptr[p + 1] as usize {
            let k = h.syn_coef[s] as usize;
            let dst = fill[k] as usize;
            h.ana_pos[dst] = p as i32;
            h.ana_w[dst] = h.syn_w[s];
            fill[k] += 1;
        }
    }
    // Column view: counting sort of the row-major positions by column (rows stay ascending).
    let mut fill: Vec<i32> = h.col_ptr[..inp].to_vec();
    h.col_row = vec![0; nnz];
    h.col_perm = vec![0; nnz];
    for p in 0..nnz {
        let c = h.pos_col[p] as usize;
        let dst = fill[c] as usize;
        h.col_row[dst] = h.pos_row[p];
        h.col_perm[dst] = p as i32;
        fill[c] += 1;
    }
    Ok(h)
}

/// The synthesis entries of coefficients at `(rows[k], cols[k])` of an `out`×`inp` layer.
/// `family = None` means no IDWT (one entry of weight 1 per coefficient).
pub(crate) fn synthesis_entries(
    out: usize,
    inp: usize,
    rows: &[i64],
    cols: &[i64],
    family: Option<&str>,
) -> Result<Vec<(u32, u32, u32, f32)>> {
    let n = rows.len();
    let Some(family) = family else {
        return Ok((0..n)
            .map(|k| (rows[k] as u32, cols[k] as u32, k as u32, 1.0f32))
            .collect());
    };
    let f = wavelet_filters(family)?;
    let taps = f.rec_lo.len();
    let gr = AxisGeometry::new(out, taps, f.reduction)?;
    let gc = AxisGeometry::new(inp, taps, f.reduction)?;
    let cap = n
        .checked_mul(taps * taps)
        .filter(|&c| c <= i32::MAX as usize)
        .ok_or_else(|| {
            Error::invalid(format!(
                "WaveFT with {family} ({taps} taps) and n_frequency {n} needs {n}x{} synthesis entries, \
                 more than the kernels' i32 indices allow",
                taps * taps
            ))
        })?;
    let mut v = Vec::with_capacity(cap);
    // Per axis: (ΔW index, filter band selector, tap) of every tap that survives the crop.
    let axis = |i: usize, g: &AxisGeometry, dim: usize| -> (bool, Vec<(usize, usize)>) {
        let p = i + g.offset;
        let band = p >= g.half;
        let q = p - if band { g.half } else { 0 };
        let taps_kept = (0..taps)
            .filter_map(|t| {
                let y = (2 * q + t).checked_sub(g.skip)?;
                (y < dim).then_some((y, t))
            })
            .collect();
        (band, taps_kept)
    };
    for k in 0..n {
        let (band_r, ys) = axis(rows[k] as usize, &gr, out);
        let (band_c, xs) = axis(cols[k] as usize, &gc, inp);
        // Right half (column band 1) uses the high-pass filter along rows; bottom half along columns.
        let row_f = if band_c { &f.rec_hi } else { &f.rec_lo };
        let col_f = if band_r { &f.rec_hi } else { &f.rec_lo };
        for &(y, ty) in &ys {
            for &(x, tx) in &xs {
                v.push((y as u32, x as u32, k as u32, (row_f[ty] * col_f[tx]) as f32));
            }
        }
    }
    Ok(v)
}

/// Dense ΔW (f64, row-major `[out, inp]`) computed straight from the filters, coefficient by
/// coefficient (the transposed convolution restricted to the nonzero coefficients), then cropped as in
/// PEFT. Used for merging; independent of the assembled CSR arrays.
pub(crate) fn dense_delta_f64(
    out: usize,
    inp: usize,
    rows: &[i64],
    cols: &[i64],
    spectrum: &[f32],
    scaling: f32,
    family: Option<&str>,
) -> Result<Vec<f64>> {
    let mut d = vec![0f64; out * inp];
    let Some(family) = family else {
        for k in 0..rows.len() {
            d[rows[k] as usize * inp + cols[k] as usize] += spectrum[k] as f64;
        }
        let sc = scaling as f64;
        d.iter_mut().for_each(|v| *v *= sc);
        return Ok(d);
    };
    let f = wavelet_filters(family)?;
    let taps = f.rec_lo.len();
    let gr = AxisGeometry::new(out, taps, f.reduction)?;
    let gc = AxisGeometry::new(inp, taps, f.reduction)?;
    for k in 0..rows.len() {
        let pr = rows[k] as usize + gr.offset;
        let pc = cols[k] as usize + gc.offset;
        let (br, bc) = (pr >= gr.half, pc >= gc.half);
        let qr = if br { pr - gr.half } else { pr };
        let qc = if bc { pc - gc.half } else { pc };
        let row_f = if bc { &f.rec_hi } else { &f.rec_lo };
        let col_f = if br { &f.rec_hi } else { &f.rec_lo };
        let s = spectrum[k] as f64;
        for (ty, &fy) in row_f.iter().enumerate() {
            let Some(y) = (2 * qr + ty).checked_sub(gr.skip).filter(|&y| y < out) else {
                continue;
            };
            for (tx, &fx) in col_f.iter().enumerate() {
                let Some(x) = (2 * qc + tx).checked_sub(gc.skip).filter(|&x| x < inp) else {
                    continue;
                };
                d[y * inp + x] += fy * fx * s;
            }
        }
    }
    let sc = scaling as f64;
    d.iter_mut().for_each(|v| *v *= sc);
    Ok(d)
}
