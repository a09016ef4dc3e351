//! Per-row losses and the time weight (docs/algorithm.md §3.5). Inputs are cast to float32 (float64 stays)
//! so that bf16/fp16 model outputs are compared in full precision.

use tch::{Kind, Tensor};

use crate::error::Result;
use crate::train::config::LossKind;

/// float64 stays, everything else computes in float32.
pub fn compute_kind(k: Kind) -> Kind {
    if k == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

/// mean((pred − target)²) over all but the batch dimension: shape [B].
pub fn l2_loss(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    let k = compute_kind(pred.f_kind()?);
    let d = pred.f_to_kind(k)?.f_sub(&target.f_to_kind(k)?)?;
    let b = d.size().first().copied().unwrap_or(1);
    Ok(d.f_square()?.f_reshape([b, -1])?.f_mean_dim(Some(&[1i64][..]), false, k)?)
}

/// Barron's robust loss on m = mean((pred − target)²) with a stop-gradient on the scale:
/// m·sg(((m/(c² + 1e-8))/|α − 2| + 1)^((α − 2)/2))/c; α = 2 gives m/c.
pub fn barron_loss(pred: &Tensor, target: &Tensor, alpha: f64, c: f64) -> Result<Tensor> {
    let m = l2_loss(pred, target)?;
    if alpha == 2.0 {
        return Ok(m.f_div_scalar(c)?);
    }
    let scale = m
        .f_detach()?
        .f_div_scalar((c * c + 1e-8) * (alpha - 2.0).abs())?
        .f_add_scalar(1.0)?
        .f_pow_tensor_scalar((alpha - 2.0) / 2.0)?;
    Ok(m.f_mul(&scale)?.f_div_scalar(c)?)
}

pub fn per_row_loss(kind: LossKind, pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    match kind {
        LossKind::L2 => l2_loss(pred, target),
        LossKind::Barron { alpha, c } => barron_loss(pred, target, alpha, c),
    }
}

/// w = tan((1 − (|t| − |tt|))·π/2.5) + 1 (the caller sets w = 1 on adv rows).
pub fn time_weight(t: &Tensor, tt: &Tensor) -> Result<Tensor> {
    let k = compute_kind(t.f_kind()?);
    let gap = t.f_to_kind(k)?.f_abs()?.f_sub(&tt.f_to_kind(k)?.f_abs()?)?;
    Ok(gap.f_neg()?.f_add_scalar(1.0)?.f_mul_scalar(std::f64::consts::PI / 2.5)?.f_tan()?.f_add_scalar(1.0)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn closed_forms() {
        let p = Tensor::from_slice(&[1.0f64, 2.0, 3.0, 4.0]).view([2, 2]);
        let t = Tensor::zeros([2, 2], (Kind::Double, Device::Cpu));
        let m = l2_loss(&p, &t).unwrap();
        assert_eq!(Vec::<f64>::try_from(&m).unwrap(), vec![2.5, 12.5]);
        let b2 = barron_loss(&p, &t, 2.0, 0.5).unwrap();
        assert_eq!(Vec::<f64>::try_from(&b2).unwrap(), vec![5.0, 25.0]);
        let b1 = barron_loss(&p, &t, 1.0, 1e-3).unwrap();
        let want = 2.5 * ((2.5 / (1e-6 + 1e-8)) / 1.0 + 1.0f64).powf(-0.5) / 1e-3;
        assert!((b1.double_value(&[0]) - want).abs() < 1e-9 * want);
        let w = time_weight(&Tensor::from_slice(&[1.0f64, 0.5, -0.3]), &Tensor::from_slice(&[0.0f64, 0.5, -0.3])).unwrap();
        let w: Vec<f64> = Vec::try_from(&w).unwrap();
        assert!((w[0] - 1.0).abs() < 1e-12);
        assert!((w[1] - ((std::f64::consts::PI / 2.5).tan() + 1.0)).abs() < 1e-12);
        assert_eq!(w[1], w[2]);
    }

    #[test]
    fn barron_scale_has_no_gradient() {
        let p = Tensor::from_slice(&[3.0f64]).view([1, 1]).set_requires_grad(true);
        let t = Tensor::zeros([1, 1], (Kind::Double, Device::Cpu));
        let l = barron_loss(&p, &t, 1.0, 1.0).unwrap();
        let g = Tensor::run_backward(&[l.sum(Kind::Double)], &[&p], false, false)[0].double_value(&[0, 0]);
        // d/dp [p²·s]/c with s constant = 2p·s, s = (9/(1+1e-8) + 1)^(-1/2)
        let s = (9.0 / (1.0 + 1e-8) + 1.0f64).powf(-0.5);
        assert!((g - 6.0 * s).abs() < 1e-9, "{g}");
    }
}
