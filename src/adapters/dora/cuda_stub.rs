//! `cuda.rs` of a build without the `cuda` feature: the same functions, each saying CUDA is
//! unavailable (see `crate::device::on_device!`).

use crate::device::cuda_unavailable;
use crate::error::Result;
use crate::qmatmul::BaseWeight;
use crate::tensor::{DType, Tensor};

pub(super) fn row_sq_norms(_base: &BaseWeight) -> Result<Tensor> {
    Err(cuda_unavailable())
}

pub(super) fn norm(
    _base: &BaseWeight,
    _w_sq: &Tensor,
    _a32: &Tensor,
    _b32: &Tensor,
    _m32: Option<&Tensor>,
    _s: f32,
    _dtype: DType,
) -> Result<(Tensor, Option<Tensor>, Tensor, Tensor)> {
    Err(cuda_unavailable())
}

pub(super) fn weight_tproj(_base: &BaseWeight, _ct: &Tensor) -> Result<Tensor> {
    Err(cuda_unavailable())
}

pub(super) fn scale_cols(
    _z: &Tensor,
    _rows: usize,
    _c: &Tensor,
    _bias: Option<&Tensor>,
    _add: Option<&Tensor>,
) -> Result<Tensor> {
    Err(cuda_unavailable())
}

pub(super) fn colsum(
    _dy: &Tensor,
    _z: &Tensor,
    _g: &Tensor,
    _n: &Tensor,
    _dz_dtype: Option<DType>,
) -> Result<(Tensor, Option<Tensor>)> {
    Err(cuda_unavailable())
}

pub(super) fn full_norm_grad(
    _dm: &Tensor,
    _g: &Tensor,
    _n: &Tensor,
    _b32: &Tensor,
    _pt: &Tensor,
    _gram: &Tensor,
    _s: f32,
) -> Result<(Tensor, Tensor)> {
    Err(cuda_unavailable())
}

pub(super) fn merge_rows(_w: &Tensor, _d: &Tensor, _f: &Tensor, _unmerge: bool) -> Result<Tensor> {
    Err(cuda_unavailable())
}

pub(super) fn scale_of(_m: &Tensor, _n: &Tensor) -> Result<Tensor> {
    Err(cuda_unavailable())
}

pub(super) fn scale_rows(_x: &Tensor, _f: &Tensor) -> Result<Tensor> {
    Err(cuda_unavailable())
}
