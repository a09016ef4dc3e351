//! The TwinFlow training objective (docs/algorithm.md §3) as named parts — times, one-step
//! fakes, noisy inputs, the enhanced and RCGM targets, the weighted loss, distribution
//! matching — on a [`Plan`] (the batch's runs and kinds). The caller (Python's
//! `twinflow.objective.training_step`) makes the model calls and the random draws between
//! them, in the order of docs/training.md; every part here is tensor arithmetic only.

use std::ops::Range;

use tch::{Device, Kind, Tensor};

use crate::error::{all_finite, Error, Result};
use crate::train::config::ObjectiveConfig;
use crate::train::loss::{compute_kind, per_row_loss, time_weight};
use crate::train::split::split_sub_batches;
use crate::train::target::{enhanced_target, rows, Rcgm};
use crate::train::time::times_from;

/// Which net a model call is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Net {
    /// The model being trained.
    Online,
    /// The EMA / frozen / given teacher (the online model when there is none).
    Teacher,
}

/// Names of the step's diagnostics, in order (see [`Plan::finish`]).
pub const STAT_NAMES: [&str; 7] = ["loss", "base", "dist_match", "e2e", "mul", "any", "adv"];

fn narrow(t: &Tensor, r: &Range<i64>) -> Result<Tensor> {
    Ok(t.f_narrow(0, r.start, r.end - r.start)?)
}

fn set_rows(dst: &Tensor, r: &Range<i64>, src: &Tensor) -> Result<()> {
    narrow(dst, r)?.f_copy_(src)?;
    Ok(())
}

/// One step's batch: its shape, kinds and the four runs e2e, mul, any, adv, with the settings.
pub struct Plan {
    pub cfg: ObjectiveConfig,
    pub shape: Vec<i64>,
    /// x's kind (model inputs and noises) and the compute kind (times, targets and losses).
    pub xk: Kind,
    pub ck: Kind,
    pub dev: Device,
    pub runs: [Range<i64>; 4],
}

impl Plan {
    pub fn new(cfg: &ObjectiveConfig, x: &Tensor) -> Result<Self> {
        let shape = x.size();
        let b = *shape.first().ok_or_else(|| Error::Value("x must have a batch dimension".into()))?;
        let xk = x.f_kind()?;
        let runs = split_sub_batches(b as usize, &cfg.sub_batches)?.map(|r| r.start as i64..r.end as i64);
        Ok(Self { cfg: cfg.clone(), shape, xk, ck: compute_kind(xk), dev: x.device(), runs })
    }

    pub fn rows(&self) -> i64 {
        self.shape[0]
    }

    /// [n] → [n, 1, …] to broadcast a per-row value over samples.
    fn per_row(&self, v: &Tensor) -> Result<Tensor> {
        rows(v, self.shape.len())
    }

    /// x_t = t·z + (1 − t)·x, per row.
    fn interpolate(&self, x: &Tensor, z: &Tensor, t: &Tensor) -> Result<Tensor> {
        let tb = self.per_row(t)?;
        Ok(tb.f_mul(z)?.f_add(&tb.f_neg()?.f_add_scalar(1.0)?.f_mul(x)?)?)
    }

    /// §3.1 (after draws 1–3: `raw` the U(0, 1) or Beta draw of t, `u`, `u2` uniforms): t, and
    /// tt per run — e2e rows go 1 → 0, mul rows to t_min, any (and adv) rows to tt.
    pub fn times(&self, raw: &Tensor, u: &Tensor, u2: &Tensor) -> Result<(Tensor, Tensor)> {
        let [e2e, mul, _, _] = &self.runs;
        let times = times_from(raw, u, u2, self.cfg.time_dist_ctrl[2], self.cfg.consistc_ratio)?;
        let (t, tt) = (times.t, times.tt);
        let _ = narrow(&t, e2e)?.f_fill_(1.0)?;
        let _ = narrow(&tt, e2e)?.f_fill_(0.0)?;
        set_rows(&tt, mul, &narrow(&times.t_min, mul)?)?;
        Ok((t, tt))
    }

    /// The rows replaced by one-step fakes (call 1, draw 4): the adv rows, every row with
    /// `use_image_free`; empty when none.
    pub fn fake_rows(&self) -> Range<i64> {
        if self.cfg.use_image_free { 0..self.rows() } else { self.runs[3].clone() }
    }

    /// The data the step learns from, in the compute kind: a copy of `x` with the
    /// [`Plan::fake_rows`] replaced by z' − F(z', 1, 0) (`z`, `f`: None when there are none).
    pub fn with_fakes(&self, x: &Tensor, fakes: Option<(&Tensor, &Tensor)>) -> Result<Tensor> {
        let Some((z, f)) = fakes else { return Ok(x.f_to_kind(self.ck)?) };
        let fake = z.f_to_kind(self.ck)?.f_sub(&f.f_to_kind(self.ck)?)?;
        // A copy: x may already be in the compute kind, and the caller's x stays untouched.
        let data = x.f_to_kind(self.ck)?.f_empty_like()?;
        data.shallow_clone().f_copy_(x)?;
        set_rows(&data, &self.fake_rows(), &fake)?;
        Ok(data)
    }

    /// After draw 5 (`z`, x's shape and kind): x_t = t·z + (1 − t)·x and the plain target
    /// z − x; then the adv rows' times flip to −t in place (they were built with +t).
    pub fn noisy_inputs(&self, data: &Tensor, z: &Tensor, t: &Tensor, tt: &Tensor) -> Result<(Tensor, Tensor)> {
        let z = z.f_to_kind(self.ck)?;
        let x_t = self.interpolate(data, &z, t)?;
        let target = z.f_sub(data)?;
        let adv = &self.runs[3];
        let t_adv = narrow(t, adv)?.f_neg()?;
        set_rows(t, adv, &t_adv)?;
        set_rows(tt, adv, &t_adv)?;
        Ok((x_t, target))
    }

    /// §3.3: the rows whose target gets the teacher's guidance (calls 3, 4: conditional and
    /// unconditional, independent) — the mul ∪ any rows, plus the e2e rows (t = 1) only when
    /// lo < 1 < hi; None when the term does not run (no uncond, enhanced_ratio 0, no rows).
    pub fn enhance_rows(&self, has_uncond: bool) -> Option<Range<i64>> {
        let [e2e, _, _, adv] = &self.runs;
        let [lo, hi] = self.cfg.enhanced_range;
        let rows = if lo < 1.0 && hi > 1.0 { e2e.start } else { e2e.end }..adv.start;
        (has_uncond && self.cfg.enhanced_ratio != 0.0 && !rows.is_empty()).then_some(rows)
    }

    /// §3.3 in place on [`Plan::enhance_rows`]: add enr·(v_c − v_u) where lo < t < hi (or
    /// replace the target by v_u + enr·(v_c − v_u) with a frozen teacher and no images).
    pub fn enhance(&self, target: &Tensor, t: &Tensor, v_c: &Tensor, v_u: &Tensor) -> Result<()> {
        let Some(rows) = self.enhance_rows(true) else { return Ok(()) };
        let ts = narrow(t, &rows)?;
        let (v_c, v_u) = (v_c.f_to_kind(self.ck)?, v_u.f_to_kind(self.ck)?);
        let [lo, hi] = self.cfg.enhanced_range;
        let replace = self.cfg.ema_decay_rate == 1.0 && self.cfg.use_image_free;
        let new = enhanced_target(&narrow(target, &rows)?, &v_c, &v_u, &ts, self.cfg.enhanced_ratio, (lo, hi), replace)?;
        set_rows(target, &rows, &new)
    }

    /// §3.4: the RCGM walk on every non-adv row (calls 5 … 4+N, each depending on the last)
    /// and the net it calls — the online model when emd = 1; None when the term does not run.
    /// `f` is the detached prediction in the compute kind.
    pub fn rcgm(&self, x_t: &Tensor, target: &Tensor, f: &Tensor, t: &Tensor, tt: &Tensor) -> Result<Option<(Rcgm, Net)>> {
        let [e2e, _, any, adv] = &self.runs;
        let cfg = &self.cfg;
        if cfg.estimate_order < 1 || cfg.consistc_ratio == 0.0 || (e2e.is_empty() && any.is_empty()) {
            return Ok(None);
        }
        let pre = 0..adv.start;
        let n = |v: &Tensor| narrow(v, &pre);
        let who = if cfg.ema_decay_rate == 1.0 { Net::Online } else { Net::Teacher };
        Ok(Some((Rcgm::new(&n(x_t)?, &n(target)?, &n(f)?, &n(t)?, &n(tt)?, cfg.estimate_order)?, who)))
    }

    /// The rows of the RCGM walk (everything before the adv run).
    pub fn rcgm_rows(&self) -> Range<i64> {
        0..self.runs[3].start
    }

    /// §3.4, last part: the walk's target into the non-adv rows of `target`, in place.
    pub fn set_rcgm_target(&self, target: &Tensor, rcgm: &Rcgm) -> Result<()> {
        set_rows(target, &self.rcgm_rows(), &rcgm.finish()?)
    }

    /// §3.5: the per-row loss L·w (w = 1 on adv rows) and the base term — its mean over all
    /// rows, or over the mul ∪ adv rows when N = 0 (no RCGM target on the other runs). `f`
    /// is the graded prediction in the compute kind.
    pub fn weighted_loss(&self, f: &Tensor, target: &Tensor, t: &Tensor, tt: &Tensor) -> Result<(Tensor, Tensor)> {
        let [_, mul, _, adv] = &self.runs;
        let w = time_weight(t, tt)?;
        let _ = narrow(&w, adv)?.f_fill_(1.0)?;
        let lw = per_row_loss(self.cfg.loss, f, target)?.f_mul(&w)?;
        let base = if self.cfg.estimate_order >= 1 {
            lw.f_mean(self.ck)?
        } else {
            Tensor::f_cat(&[narrow(&lw, mul)?, narrow(&lw, adv)?], 0)?.f_mean(self.ck)?
        };
        Ok((lw, base))
    }

    /// Whether §3.6 (distribution matching on the e2e rows; draws 6, 7; two calls) runs.
    pub fn dist_matching(&self) -> bool {
        let cfg = &self.cfg;
        cfg.consistc_ratio == 1.0 && cfg.dist_match_cof != 0.0 && !self.runs[0].is_empty()
    }

    /// §3.6 inputs: the one-step samples x_e = x_t − |t|·F on the e2e rows, re-noised with
    /// `noise` (draw 7) to x_τ at `tau` (draw 6). The model's fake (−τ) and real (+τ)
    /// velocities there are the next two calls.
    pub fn dist_matching_input(&self, x_t: &Tensor, f: &Tensor, t: &Tensor, tau: &Tensor, noise: &Tensor) -> Result<Tensor> {
        let e2e = &self.runs[0];
        let fe = narrow(f, e2e)?.f_detach()?;
        let x_e = narrow(x_t, e2e)?.f_sub(&fe.f_mul(&self.per_row(&narrow(t, e2e)?.f_abs()?)?)?)?;
        self.interpolate(&x_e, &noise.f_to_kind(self.ck)?, tau)
    }

    /// §3.6 term: Δv = clamp(v_fake − v_real, −1, 1) and dmc·mean L(F_e2e, sg(F_e2e − Δv)).
    pub fn dist_matching_term(&self, f: &Tensor, v_fake: &Tensor, v_real: &Tensor) -> Result<Tensor> {
        let fe = narrow(f, &self.runs[0])?;
        let delta = {
            let _g = tch::no_grad_guard();
            v_fake.f_to_kind(self.ck)?.f_sub(&v_real.f_to_kind(self.ck)?)?.f_clamp(-1.0, 1.0)?
        };
        let l = per_row_loss(self.cfg.loss, &fe, &fe.f_detach()?.f_sub(&delta)?)?;
        Ok(l.f_mean(self.ck)?.f_mul_scalar(self.cfg.dist_match_cof)?)
    }

    /// The loss base + dm (`dm` None: the term did not run) and the detached diagnostics
    /// [loss, base, dist_match, mean L·w of each run (NaN for an empty run)]; a NaN or Inf
    /// loss is an error.
    pub fn finish(&self, base: &Tensor, dm: Option<&Tensor>, lw: &Tensor) -> Result<(Tensor, Tensor)> {
        let dm = match dm {
            Some(d) => d.shallow_clone(),
            None => Tensor::f_zeros([], (self.ck, self.dev))?,
        };
        let loss = base.f_add(&dm)?;
        let stats = {
            let _g = tch::no_grad_guard();
            let lwd = lw.f_detach()?;
            let mut s = vec![loss.f_detach()?, base.f_detach()?, dm.f_detach()?];
            for r in &self.runs {
                s.push(narrow(&lwd, r)?.f_mean(self.ck)?);
            }
            Tensor::f_stack(&s, 0)?
        };
        if !all_finite(&loss)? {
            return Err(Error::NonFinite(
                "TwinFlowLoss: the loss is NaN or Inf (a model output is not finite, or the values overflowed)".into(),
            ));
        }
        Ok((loss, stats))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::config::LossKind;

    /// F = x·w + a·t + b·tt, with w, a trainable; logs every call as (net, rows of each part).
    struct Lin {
        w: Tensor,
        a: Tensor,
        calls: Vec<(Net, bool, Vec<Range<i64>>)>,
    }
    impl Lin {
        fn new(kind: Kind) -> Self {
            let o = (kind, Device::Cpu);
            Self {
                w: Tensor::from_slice(&[0.3f32, -0.2, 0.1, 0.5]).view([2, 2]).to_kind(kind).set_requires_grad(true),
                a: Tensor::ones([2], o).set_requires_grad(true),
                calls: vec![],
            }
        }
        fn call(&mut self, net: Net, grad: bool, parts: Vec<Range<i64>>, x: &Tensor, t: &Tensor, tt: &Tensor) -> Tensor {
            let k = x.kind();
            self.calls.push((net, grad, parts));
            let _g = (!grad).then(tch::no_grad_guard);
            x.matmul(&self.w) + t.to_kind(k).view([-1, 1]) * &self.a + tt.to_kind(k).view([-1, 1]) * 0.5
        }
        /// Independent no-grad calls: one call on the concatenated inputs when batching.
        fn independent(&mut self, net: Net, batch: bool, inputs: Vec<(Range<i64>, Tensor, Tensor)>, x: &Tensor) -> Vec<Tensor> {
            if !batch {
                return inputs.into_iter().map(|(r, t, tt)| self.call(net, false, vec![r], x, &t, &tt)).collect();
            }
            let n = inputs.len() as i64;
            let xs = Tensor::cat(&(0..n).map(|_| x.shallow_clone()).collect::<Vec<_>>(), 0);
            let t = Tensor::cat(&inputs.iter().map(|i| i.1.shallow_clone()).collect::<Vec<_>>(), 0);
            let tt = Tensor::cat(&inputs.iter().map(|i| i.2.shallow_clone()).collect::<Vec<_>>(), 0);
            let f = self.call(net, false, inputs.iter().map(|i| i.0.clone()).collect(), &xs, &t, &tt);
            f.chunk(n, 0)
        }
    }

    /// Deterministic draws from a hash of a counter: tests run in parallel threads, which
    /// would share (and race on) libtorch's global generator.
    struct Counter(f64);
    impl Counter {
        fn rand(&mut self, n: i64, rest: &[i64], kind: Kind) -> Tensor {
            let shape = [&[n], rest].concat();
            let m: i64 = shape.iter().product();
            let k = Tensor::arange(m, (Kind::Double, Device::Cpu)) + self.0;
            self.0 += m as f64;
            (k.sin() * 43758.5453).frac().abs().view(shape.as_slice()).to_kind(kind) // in [0, 1)
        }
        fn randn(&mut self, n: i64, rest: &[i64], kind: Kind) -> Tensor {
            self.rand(n, rest, kind) * 3.4 - 1.7
        }
    }

    /// The step as twinflow/objective.py drives it (uniform times), on [`Lin`] and [`Counter`].
    fn drive(cfg: &ObjectiveConfig, m: &mut Lin, rng: &mut Counter, x: &Tensor, uncond: bool, batch: bool) -> (Tensor, Tensor) {
        let p = Plan::new(cfg, x).unwrap();
        let (b, rest, ck) = (p.rows(), p.shape[1..].to_vec(), p.ck);
        let (t, tt) = p.times(&rng.rand(b, &[], ck), &rng.rand(b, &[], ck), &rng.rand(b, &[], ck)).unwrap();
        let rows = p.fake_rows();
        let data = if rows.is_empty() {
            p.with_fakes(x, None).unwrap()
        } else {
            let n = rows.end - rows.start;
            let z = rng.randn(n, &rest, p.xk);
            let f1 = m.call(Net::Online, false, vec![rows], &z, &Tensor::ones([n], (ck, Device::Cpu)), &Tensor::zeros([n], (ck, Device::Cpu)));
            p.with_fakes(x, Some((&z, &f1))).unwrap()
        };
        let (x_t, target) = p.noisy_inputs(&data, &rng.randn(b, &rest, p.xk), &t, &tt).unwrap();
        let f = m.call(Net::Online, true, vec![0..b], &x_t, &t, &tt).to_kind(ck);
        let fd = f.detach();
        if let Some(r) = p.enhance_rows(uncond) {
            let (xs, ts) = (x_t.narrow(0, r.start, r.end - r.start), t.narrow(0, r.start, r.end - r.start));
            let pair = || (r.clone(), ts.shallow_clone(), ts.shallow_clone());
            let v = m.independent(Net::Teacher, batch, vec![pair(), pair()], &xs);
            p.enhance(&target, &t, &v[0], &v[1]).unwrap();
        }
        if let Some((mut walk, net)) = p.rcgm(&x_t, &target, &fd, &t, &tt).unwrap() {
            while let Some((xk, s, s_next)) = walk.next().unwrap() {
                let fk = m.call(net, false, vec![p.rcgm_rows()], &xk, &s, &s_next).to_kind(ck);
                walk.give(&fk).unwrap();
            }
            p.set_rcgm_target(&target, &walk).unwrap();
        }
        let (lw, base) = p.weighted_loss(&f, &target, &t, &tt).unwrap();
        let dm = p.dist_matching().then(|| {
            let e2e = p.runs[0].clone();
            let n = e2e.end - e2e.start;
            let tau = rng.rand(n, &[], ck);
            let x_tau = p.dist_matching_input(&x_t, &f, &t, &tau, &rng.randn(n, &rest, p.xk)).unwrap();
            let v = m.independent(Net::Online, batch, vec![(e2e.clone(), -&tau, -&tau), (e2e, tau.shallow_clone(), tau)], &x_tau);
            p.dist_matching_term(&f, &v[0], &v[1]).unwrap()
        });
        p.finish(&base, dm.as_ref(), &lw).unwrap()
    }

    fn run_with(cfg: &ObjectiveConfig, b: i64, uncond: bool, batch: bool, kind: Kind) -> (Tensor, Tensor, Lin) {
        let mut rng = Counter(0.5);
        let x = rng.randn(b, &[2], kind);
        let mut m = Lin::new(kind);
        let (loss, stats) = drive(cfg, &mut m, &mut rng, &x, uncond, batch);
        (loss, stats, m)
    }

    #[test]
    fn call_counts_follow_the_recipe() {
        // Batched: teacher cond + uncond is one call, the two distribution-matching calls one.
        for (recipe, batched, separate) in [("twinflow", 6, 8), ("rcgm", 4, 5), ("flow_matching", 1, 1)] {
            let cfg = ObjectiveConfig::recipe(recipe).unwrap();
            for (batch, want) in [(true, batched), (false, separate)] {
                let m = run_with(&cfg, 8, true, batch, Kind::Float).2;
                assert_eq!(m.calls.len(), want, "{recipe} batch={batch}");
                assert_eq!(m.calls.iter().filter(|c| c.1).count(), 1, "{recipe}: one graded call");
            }
        }
        // No uncond: no guidance calls. N = 3: one more RCGM call.
        let cfg = ObjectiveConfig { estimate_order: 3, ..ObjectiveConfig::default() };
        assert_eq!(run_with(&cfg, 8, false, true, Kind::Float).2.calls.len(), 6);
        // Call order, nets and rows of the TwinFlow step (B = 8: runs of 2).
        let m = run_with(&ObjectiveConfig::default(), 8, true, true, Kind::Float).2;
        use Net::*;
        assert_eq!(
            m.calls,
            vec![
                (Online, false, vec![6..8]),
                (Online, true, vec![0..8]),
                (Teacher, false, vec![2..6, 2..6]),
                (Teacher, false, vec![0..6]),
                (Teacher, false, vec![0..6]),
                (Online, false, vec![0..2, 0..2]),
            ]
        );
    }

    #[test]
    fn batched_calls_leave_loss_and_gradients_unchanged() {
        // Lin's rows are independent, so batching changes at most the last bits (float64).
        for recipe in ["twinflow", "rcgm"] {
            let cfg = ObjectiveConfig::recipe(recipe).unwrap();
            let (la, sa, ma) = run_with(&cfg, 10, true, true, Kind::Double);
            let (lb, sb, mb) = run_with(&cfg, 10, true, false, Kind::Double);
            assert!(ma.calls.len() < mb.calls.len(), "{recipe}");
            let close = |x: &Tensor, y: &Tensor| {
                let tol = 1e-6 * y.abs().max().double_value(&[]).max(1e-300);
                assert!((x - y).abs().max().double_value(&[]) <= tol, "{recipe}: {x:?} vs {y:?}");
            };
            close(&la, &lb);
            close(&sa.nan_to_num(0.0, None, None), &sb.nan_to_num(0.0, None, None));
            let ga = Tensor::run_backward(&[&la], &[&ma.w, &ma.a], false, false);
            let gb = Tensor::run_backward(&[&lb], &[&mb.w, &mb.a], false, false);
            for (x, y) in ga.iter().zip(&gb) {
                close(x, y);
            }
        }
    }

    #[test]
    fn times_and_noisy_inputs_follow_the_runs() {
        let cfg = ObjectiveConfig::default();
        let mut rng = Counter(0.125);
        let x = rng.randn(8, &[2], Kind::Double);
        let p = Plan::new(&cfg, &x).unwrap(); // runs of 2: e2e, mul, any, adv
        let (t, tt) = p.times(&rng.rand(8, &[], Kind::Double), &rng.rand(8, &[], Kind::Double), &rng.rand(8, &[], Kind::Double)).unwrap();
        let v = |a: &Tensor| Vec::<f64>::try_from(a).unwrap();
        let (tv, ttv) = (v(&t), v(&tt));
        assert_eq!((tv[0], tv[1], ttv[0], ttv[1]), (1.0, 1.0, 0.0, 0.0)); // e2e: 1 → 0
        assert!((2..4).all(|i| tv[i] - ttv[i] <= 0.05 * tv[i] + 1e-12)); // mul: tt = t_min
        let z = rng.randn(8, &[2], Kind::Double);
        let (x_t, target) = p.noisy_inputs(&x, &z, &t, &tt).unwrap();
        let (t2, tt2) = (v(&t), v(&tt));
        assert!((6..8).all(|i| t2[i] == -tv[i] && tt2[i] == -tv[i])); // adv rows carry −t
        assert!((&target - (&z - &x)).abs().max().double_value(&[]) < 1e-12);
        let want = p.interpolate(&x, &z, &Tensor::from_slice(&tv)).unwrap(); // at the times drawn (+t)
        assert!((x_t - want).abs().max().double_value(&[]) < 1e-12);
    }

    #[test]
    fn fakes_replace_only_their_rows_and_leave_x_untouched() {
        let x = Tensor::from_slice(&[1.0f64, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]).view([8, 1]);
        let x0 = x.copy();
        for image_free in [false, true] {
            let cfg = ObjectiveConfig { use_image_free: image_free, ..ObjectiveConfig::default() };
            let p = Plan::new(&cfg, &x).unwrap();
            let rows = p.fake_rows();
            assert_eq!(rows, if image_free { 0..8 } else { 6..8 });
            let n = rows.end - rows.start;
            let z = Tensor::arange(n, (Kind::Double, Device::Cpu)).view([n, 1]);
            let data = p.with_fakes(&x, Some((&z, &z.ones_like()))).unwrap();
            let fakes = data.narrow(0, rows.start, n);
            assert!((fakes - (z - 1.0)).abs().max().double_value(&[]) < 1e-12, "image_free={image_free}");
            if !image_free {
                assert!(data.narrow(0, 0, 6).equal(&x0.narrow(0, 0, 6)));
            }
            assert!(x.equal(&x0), "the caller's x changed");
        }
    }

    #[test]
    fn without_rcgm_the_base_averages_only_mul_and_adv_rows() {
        let cfg = ObjectiveConfig { estimate_order: 0, loss: LossKind::L2, ..ObjectiveConfig::default() };
        let x = Tensor::zeros([8, 2], (Kind::Double, Device::Cpu));
        let p = Plan::new(&cfg, &x).unwrap();
        let f = Tensor::arange(16, (Kind::Double, Device::Cpu)).view([8, 2]);
        let t = Tensor::full([8], 0.5, (Kind::Double, Device::Cpu));
        let (lw, base) = p.weighted_loss(&f, &x, &t, &t).unwrap();
        let lw: Vec<f64> = Vec::try_from(&lw).unwrap();
        let want = (lw[2] + lw[3] + lw[6] + lw[7]) / 4.0;
        assert!((base.double_value(&[]) - want).abs() < 1e-9);
    }

    #[test]
    fn gradients_reach_the_parameters_and_stay_finite() {
        for recipe in ["twinflow", "rcgm", "flow_matching"] {
            for loss in [LossKind::L2, LossKind::Barron { alpha: 1.0, c: 1e-3 }] {
                let cfg = ObjectiveConfig { loss, ..ObjectiveConfig::recipe(recipe).unwrap() };
                let (l, _, m) = run_with(&cfg, 10, true, true, Kind::Float);
                assert!(l.double_value(&[]).is_finite());
                let g = Tensor::run_backward(&[&l], &[&m.w, &m.a], false, false);
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
        let cfg = ObjectiveConfig { consistc_ratio: 1e-12, ..ObjectiveConfig::default() };
        let stats = run_with(&cfg, 12, true, true, Kind::Float).1;
        assert_eq!(stats.isnan().sum(Kind::Int64).int64_value(&[]), 0);
    }

    #[test]
    fn a_non_finite_loss_is_an_error() {
        let cfg = ObjectiveConfig::default();
        let x = Tensor::zeros([8, 2], (Kind::Float, Device::Cpu));
        let p = Plan::new(&cfg, &x).unwrap();
        let nan = Tensor::full([], f64::NAN, (Kind::Float, Device::Cpu));
        let e = p.finish(&nan, None, &Tensor::zeros([8], (Kind::Float, Device::Cpu))).err().unwrap();
        assert!(e.to_string().contains("NaN"), "{e}");
    }
}
