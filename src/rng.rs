//! Random draws behind a trait, so that Python can route them through a `torch.Generator`
//! (and get the same numbers as a plain PyTorch loop), while Rust tests use libtorch's
//! global generator or a deterministic stand-in.

use tch::{Device, Kind, Tensor};

use crate::error::Result;

pub trait Rng {
    /// U(0, 1) draws of `shape`.
    fn rand(&mut self, shape: &[i64], opts: (Kind, Device)) -> Result<Tensor>;
    /// N(0, 1) draws of `shape`.
    fn randn(&mut self, shape: &[i64], opts: (Kind, Device)) -> Result<Tensor>;
}

/// libtorch's global generator (`tch::manual_seed` seeds it).
pub struct GlobalRng;

impl Rng for GlobalRng {
    fn rand(&mut self, shape: &[i64], opts: (Kind, Device)) -> Result<Tensor> {
        Ok(Tensor::f_rand(shape, opts)?)
    }
    fn randn(&mut self, shape: &[i64], opts: (Kind, Device)) -> Result<Tensor> {
        Ok(Tensor::f_randn(shape, opts)?)
    }
}
