//! One TwinFlow training step (SPEC §3) through a [`TrainModel`]: the order of model calls
//! and random draws is documented in docs/training.md.

use std::ops::Range;

use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::train::config::TrainConfig;
use crate::train::loss::{compute_kind, per_row_loss, time_weight};
use crate::train::split::split_sub_batches;
use crate::train::target::{enhanced_target, rcgm_target, rows};
use crate::train::time::sample_times;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Net {
    /// The model being trained.
    Online,
    /// The EMA / frozen / given teacher (the online model when there is none).
    Teacher,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CondKind {
    Cond,
    Uncond,
}

/// What a model call is for: which net, whether autograd records it, which batch rows
/// (the caller slices its conditioning to them) and which conditioning.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    pub net: Net,
    pub grad: bool,
    pub rows: Range<i64>,
    pub cond: CondKind,
}

pub trait TrainModel {
    /// `x`, `t`, `tt` are already restricted to `call.rows`; `t`, `tt` are in x's kind.
    fn call(&mut self, x: &Tensor, t: &Tensor, tt: &Tensor, call: &Call) -> Result<Tensor>;
}

pub struct StepOutput {
    /// The scalar loss, differentiable through the graded prediction.
    pub loss: Tensor,
    /// Detached [loss, base, dist_match, e2e, mul, any, adv] (per-run means of L·w; NaN if empty).
    pub stats: Tensor,
    pub model_calls: usize,
}

pub const STAT_NAMES: [&str; 7] = ["loss", "base", "dist_match", "e2e", "mul", "any", "adv"];

struct Caller<'a> {
    model: &'a mut dyn TrainModel,
    kind: Kind,
    calls: usize,
}

impl Caller<'_> {
    fn call(&mut self, x: &Tensor, t: &Tensor, tt: &Tensor, call: Call) -> Result<Tensor> {
        let x = x.f_to_kind(self.kind)?;
        let f = self.model.call(&x, &t.f_to_kind(self.kind)?, &tt.f_to_kind(self.kind)?, &call)?;
        self.calls += 1;
        if f.size() != x.size() {
            return Err(Error::Value(format!(
                "model returned a tensor of shape {:?}, expected {:?} (the shape of x_t)",
                f.size(),
                x.size()
            )));
        }
        Ok(f)
    }
}

fn narrow(t: &Tensor, r: &Range<i64>) -> Result<Tensor> {
    Ok(t.f_narrow(0, r.start, r.end - r.start)?)
}

fn set_rows(dst: &Tensor, r: &Range<i64>, src: &Tensor) -> Result<()> {
    narrow(dst, r)?.f_copy_(src)?;
    Ok(())
}

/// The TwinFlow loss for batch `x` (rows first). `has_uncond`: whether an unconditional
/// conditioning exists (without it the enhanced target has no direction and is skipped).
pub fn training_step(
    cfg: &TrainConfig,
    model: &mut dyn TrainModel,
    rng: &mut dyn Rng,
    x: &Tensor,
    has_uncond: bool,
) -> Result<StepOutput> {
    let shape = x.size();
    let b = *shape.first().ok_or_else(|| Error::Value("x must have a batch dimension".into()))?;
    let (xk, dev) = (x.f_kind()?, x.device());
    let ck = compute_kind(xk);
    let dim = shape.len();
    let runs = split_sub_batches(b as usize, &cfg.sub_batches)?.map(|r| r.start as i64..r.end as i64);
    let [e2e, mul, any, adv] = runs.clone();
    let (cor, order, emd) = (cfg.consistc_ratio, cfg.estimate_order, cfg.ema_decay_rate);
    let mut net = Caller { model, kind: xk, calls: 0 };
    let sample_shape = |n: i64| [&[n], &shape[1..]].concat();

    // §3.1 times per run (adv rows are built with +t and carry −t from the prediction on).
    let times = sample_times(rng, b, cfg.time_dist_ctrl, cor, (ck, dev))?;
    let (t, tt) = (times.t, times.tt);
    let _ = narrow(&t, &e2e)?.f_fill_(1.0)?;
    let _ = narrow(&tt, &e2e)?.f_fill_(0.0)?;
    set_rows(&tt, &mul, &narrow(&times.t_min, &mul)?)?;

    // One-step fakes for the adv run (or the whole batch with use_image_free).
    let fake_rows = if cfg.use_image_free { 0..b } else { adv.clone() };
    let x_data = if fake_rows.is_empty() {
        x.f_to_kind(ck)?
    } else {
        let n = fake_rows.end - fake_rows.start;
        let z = rng.randn(&sample_shape(n), (xk, dev))?;
        let (one, zero) = (Tensor::f_ones([n], (ck, dev))?, Tensor::f_zeros([n], (ck, dev))?);
        let call = Call { net: Net::Online, grad: false, rows: fake_rows.clone(), cond: CondKind::Cond };
        let f = {
            let _g = tch::no_grad_guard();
            net.call(&z, &one, &zero, call)?
        };
        let fake = z.f_to_kind(ck)?.f_sub(&f.f_to_kind(ck)?)?;
        // A copy: x may already be in the compute kind, and the caller's x stays untouched.
        let xd = x.f_to_kind(ck)?.f_empty_like()?;
        xd.shallow_clone().f_copy_(x)?;
        set_rows(&xd, &fake_rows, &fake)?;
        xd
    };

    // Noise, interpolation and the plain target.
    let z = rng.randn(&shape, (xk, dev))?.f_to_kind(ck)?;
    let tb = rows(&t, dim)?;
    let x_t = tb.f_mul(&z)?.f_add(&tb.f_neg()?.f_add_scalar(1.0)?.f_mul(&x_data)?)?;
    let target = z.f_sub(&x_data)?;
    let t_adv = narrow(&t, &adv)?.f_neg()?;
    set_rows(&t, &adv, &t_adv)?;
    set_rows(&tt, &adv, &t_adv)?;

    // §3.2 the graded prediction.
    let all = 0..b;
    let f = net.call(&x_t, &t, &tt, Call { net: Net::Online, grad: true, rows: all, cond: CondKind::Cond })?;
    let fc = f.f_to_kind(ck)?;
    let fd = fc.f_detach()?;

    {
        let _g = tch::no_grad_guard();
        // §3.3 enhanced target on the non-adv rows with lo < t < hi: the mul ∪ any rows, plus
        // the e2e rows (t = 1) only in the unusual case lo < 1 < hi.
        let [lo, hi] = cfg.enhanced_range;
        let enh = if lo < 1.0 && hi > 1.0 { e2e.start } else { e2e.end }..adv.start;
        if cfg.enhanced_ratio != 0.0 && has_uncond && !enh.is_empty() {
            let (xs, ts) = (narrow(&x_t, &enh)?, narrow(&t, &enh)?);
            let mut teach = |cond| {
                let c = Call { net: Net::Teacher, grad: false, rows: enh.clone(), cond };
                net.call(&xs, &ts, &ts, c)?.f_to_kind(ck).map_err(Error::from)
            };
            let v_c = teach(CondKind::Cond)?;
            let v_u = teach(CondKind::Uncond)?;
            let replace = emd == 1.0 && cfg.use_image_free;
            let new = enhanced_target(&narrow(&target, &enh)?, &v_c, &v_u, &ts, cfg.enhanced_ratio, (lo, hi), replace)?;
            set_rows(&target, &enh, &new)?;
        }

        // §3.4 RCGM target on every non-adv row.
        if order >= 1 && cor != 0.0 && (!e2e.is_empty() || !any.is_empty()) {
            let pre = 0..adv.start;
            let who = if emd == 1.0 { Net::Online } else { Net::Teacher };
            let mut teacher = |x: &Tensor, s: &Tensor, s_next: &Tensor| -> Result<Tensor> {
                let c = Call { net: who, grad: false, rows: pre.clone(), cond: CondKind::Cond };
                Ok(net.call(x, s, s_next, c)?.f_to_kind(ck)?)
            };
            let new = rcgm_target(
                &mut teacher,
                &narrow(&x_t, &pre)?,
                &narrow(&target, &pre)?,
                &narrow(&fd, &pre)?,
                &narrow(&t, &pre)?,
                &narrow(&tt, &pre)?,
                order,
            )?;
            set_rows(&target, &pre, &new)?;
        }
    }

    // §3.5 weighted per-row loss.
    let w = time_weight(&t, &tt)?;
    let _ = narrow(&w, &adv)?.f_fill_(1.0)?;
    let lw = per_row_loss(cfg.loss, &fc, &target)?.f_mul(&w)?;
    let base = if order >= 1 {
        lw.f_mean(ck)?
    } else {
        Tensor::f_cat(&[narrow(&lw, &mul)?, narrow(&lw, &adv)?], 0)?.f_mean(ck)?
    };

    // §3.6 distribution matching on the e2e rows.
    let mut dm = Tensor::f_zeros([], (ck, dev))?;
    if cor == 1.0 && cfg.dist_match_cof != 0.0 && !e2e.is_empty() {
        let n = e2e.end - e2e.start;
        let delta = {
            let _g = tch::no_grad_guard();
            let x_e = narrow(&x_t, &e2e)?.f_sub(&narrow(&fd, &e2e)?.f_mul(&rows(&narrow(&t, &e2e)?.f_abs()?, dim)?)?)?;
            let tau = rng.rand(&[n], (ck, dev))?;
            let z2 = rng.randn(&sample_shape(n), (xk, dev))?.f_to_kind(ck)?;
            let taub = rows(&tau, dim)?;
            let x_tau = taub.f_mul(&z2)?.f_add(&taub.f_neg()?.f_add_scalar(1.0)?.f_mul(&x_e)?)?;
            let neg = tau.f_neg()?;
            let c = || Call { net: Net::Online, grad: false, rows: e2e.clone(), cond: CondKind::Cond };
            let fake = net.call(&x_tau, &neg, &neg, c())?.f_to_kind(ck)?;
            let real = net.call(&x_tau, &tau, &tau, c())?.f_to_kind(ck)?;
            fake.f_sub(&real)?.f_clamp(-1.0, 1.0)?
        };
        let fe = narrow(&fc, &e2e)?;
        let l = per_row_loss(cfg.loss, &fe, &fe.f_detach()?.f_sub(&delta)?)?;
        dm = l.f_mean(ck)?.f_mul_scalar(cfg.dist_match_cof)?;
    }
    let loss = base.f_add(&dm)?;

    let stats = {
        let _g = tch::no_grad_guard();
        let lwd = lw.f_detach()?;
        let mut s = vec![loss.f_detach()?, base.f_detach()?, dm.f_detach()?];
        for r in &runs {
            s.push(narrow(&lwd, r)?.f_mean(ck)?); // NaN for an empty run
        }
        Tensor::f_stack(&s, 0)?
    };
    Ok(StepOutput { loss, stats, model_calls: net.calls })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::GlobalRng;
    use crate::train::config::LossKind;
    use tch::Device;

    /// F = x·w + a·t + b·tt, with w, a, b trainable; logs every call.
    struct Lin {
        w: Tensor,
        a: Tensor,
        calls: Vec<Call>,
    }
    impl Lin {
        fn new() -> Self {
            let o = (Kind::Float, Device::Cpu);
            Self {
                w: Tensor::from_slice(&[0.3f32, -0.2, 0.1, 0.5]).view([2, 2]).set_requires_grad(true),
                a: Tensor::ones([2], o).set_requires_grad(true),
                calls: vec![],
            }
        }
    }
    impl TrainModel for Lin {
        fn call(&mut self, x: &Tensor, t: &Tensor, tt: &Tensor, call: &Call) -> Result<Tensor> {
            assert_eq!(x.size()[0], call.rows.end - call.rows.start);
            assert_eq!(t.size(), vec![x.size()[0]]);
            self.calls.push(call.clone());
            Ok(x.matmul(&self.w) + t.view([-1, 1]) * &self.a + tt.view([-1, 1]) * 0.5)
        }
    }

    fn run(cfg: &TrainConfig, b: i64, uncond: bool) -> (StepOutput, Lin) {
        tch::manual_seed(11);
        let x = Tensor::randn([b, 2], (Kind::Float, Device::Cpu));
        let mut m = Lin::new();
        let out = training_step(cfg, &mut m, &mut GlobalRng, &x, uncond).unwrap();
        (out, m)
    }

    #[test]
    fn call_counts_follow_the_recipe() {
        for (recipe, want) in [("twinflow", 8), ("rcgm", 5), ("flow_matching", 1)] {
            let cfg = TrainConfig::recipe(recipe).unwrap();
            let (out, m) = run(&cfg, 8, true);
            assert_eq!(out.model_calls, want, "{recipe}");
            assert_eq!(m.calls.len(), want);
            assert_eq!(m.calls.iter().filter(|c| c.grad).count(), 1, "{recipe}: one graded call");
        }
        // No uncond: no guidance calls. N = 3: one more RCGM call.
        let cfg = TrainConfig { estimate_order: 3, ..TrainConfig::default() };
        assert_eq!(run(&cfg, 8, false).0.model_calls, 7);
        // Call order and rows of the TwinFlow step (B = 8: runs of 2).
        let (_, m) = run(&TrainConfig::default(), 8, true);
        let seq: Vec<(Net, bool, Range<i64>, CondKind)> =
            m.calls.iter().map(|c| (c.net, c.grad, c.rows.clone(), c.cond)).collect();
        use CondKind::*;
        use Net::*;
        assert_eq!(
            seq,
            vec![
                (Online, false, 6..8, Cond),
                (Online, true, 0..8, Cond),
                (Teacher, false, 2..6, Cond),
                (Teacher, false, 2..6, Uncond),
                (Teacher, false, 0..6, Cond),
                (Teacher, false, 0..6, Cond),
                (Online, false, 0..2, Cond),
                (Online, false, 0..2, Cond),
            ]
        );
    }

    #[test]
    fn gradients_reach_the_parameters_and_stay_finite() {
        for recipe in ["twinflow", "rcgm", "flow_matching"] {
            for loss in [LossKind::L2, LossKind::Barron { alpha: 1.0, c: 1e-3 }] {
                let cfg = TrainConfig { loss, ..TrainConfig::recipe(recipe).unwrap() };
                let (out, m) = run(&cfg, 10, true);
                assert!(out.loss.double_value(&[]).is_finite());
                let g = Tensor::run_backward(&[&out.loss], &[&m.w, &m.a], false, false);
                for gi in g {
                    assert_eq!(gi.isfinite().all().int64_value(&[]), 1);
                    assert!(gi.abs().sum(Kind::Float).double_value(&[]) > 0.0, "{recipe}");
                }
            }
        }
    }

    #[test]
    fn tiny_consistency_ratio_gives_no_nan() {
        // cor → t − tt ≈ 0 on any rows; mul rows have t − t_min ≈ 0 too.
        let cfg = TrainConfig { consistc_ratio: 1e-12, ..TrainConfig::default() };
        let (out, _) = run(&cfg, 12, true);
        assert_eq!(out.stats.isnan().sum(Kind::Int64).int64_value(&[]), 0);
    }

    #[test]
    fn wrong_output_shape_is_an_error() {
        struct Bad;
        impl TrainModel for Bad {
            fn call(&mut self, x: &Tensor, _: &Tensor, _: &Tensor, _: &Call) -> Result<Tensor> {
                Ok(x.sum_dim_intlist(Some(&[1i64][..]), false, Kind::Float))
            }
        }
        let x = Tensor::zeros([8, 2], (Kind::Float, Device::Cpu));
        let e = training_step(&TrainConfig::default(), &mut Bad, &mut GlobalRng, &x, false).err().unwrap();
        assert!(e.to_string().contains("shape"), "{e}");
    }
}
