//! The TwinFlow training objective (docs/algorithm.md §3) as named parts — time draws, one-step fakes,
//! interpolation, the enhanced and RCGM targets, the weighted loss and distribution
//! matching — and [`training_step`], which runs them in the order of docs/training.md
//! through a [`TrainModel`].

use std::ops::Range;

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::train::config::ObjectiveConfig;
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

/// One slice of a model call: batch rows (the caller slices its conditioning to them) and
/// which conditioning they see.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    pub rows: Range<i64>,
    pub cond: CondKind,
}

/// What a model call is for: which net, whether autograd records it, and its parts. A call
/// of several parts is independent calls batched into one: the inputs hold the parts' rows
/// one after another, and so must the output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    pub net: Net,
    pub grad: bool,
    pub parts: Vec<Part>,
}

impl Call {
    /// A call of one part.
    pub fn one(net: Net, grad: bool, rows: Range<i64>, cond: CondKind) -> Self {
        Self { net, grad, parts: vec![Part { rows, cond }] }
    }

    /// Rows of all parts together: the batch size the model sees.
    pub fn len(&self) -> i64 {
        self.parts.iter().map(|p| p.rows.end - p.rows.start).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub trait TrainModel {
    /// `x`, `t`, `tt` hold the rows of `call.parts`, in order; `t`, `tt` are in x's kind.
    fn call(&mut self, x: &Tensor, t: &Tensor, tt: &Tensor, call: &Call) -> Result<Tensor>;
}

pub struct StepOutput {
    /// The scalar loss, differentiable through the graded prediction.
    pub loss: Tensor,
    /// Detached [loss, base, dist_match, e2e, mul, any, adv] (per-run means of L·w; NaN if empty).
    pub stats: Tensor,
    /// Calls made through [`TrainModel::call`] (a batched call counts once).
    pub model_calls: usize,
}

/// Names of [`StepOutput::stats`], in order.
pub const STAT_NAMES: [&str; 7] = ["loss", "base", "dist_match", "e2e", "mul", "any", "adv"];

/// Model inputs of one part of a batched call.
struct Input {
    x: Tensor,
    t: Tensor,
    tt: Tensor,
    part: Part,
}

/// The model behind the step: casts inputs to x's kind, counts calls, checks output shapes,
/// and batches independent calls when `batch` is set.
struct Caller<'a> {
    model: &'a mut dyn TrainModel,
    kind: Kind,
    calls: usize,
    batch: bool,
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

    /// Independent no-grad calls on one net, one output per input: a single call on the
    /// concatenated inputs when batching, else one call each.
    fn call_independent(&mut self, net: Net, inputs: Vec<Input>) -> Result<Vec<Tensor>> {
        let _g = tch::no_grad_guard();
        if !self.batch || inputs.len() < 2 {
            let mut out = Vec::with_capacity(inputs.len());
            for i in inputs {
                out.push(self.call(&i.x, &i.t, &i.tt, Call { net, grad: false, parts: vec![i.part] })?);
            }
            return Ok(out);
        }
        let cat = |f: fn(&Input) -> &Tensor| Tensor::f_cat(&inputs.iter().map(f).collect::<Vec<_>>(), 0);
        let (x, t, tt) = (cat(|i| &i.x)?, cat(|i| &i.t)?, cat(|i| &i.tt)?);
        let sizes: Vec<i64> = inputs.iter().map(|i| i.part.rows.end - i.part.rows.start).collect();
        let parts = inputs.into_iter().map(|i| i.part).collect();
        let f = self.call(&x, &t, &tt, Call { net, grad: false, parts })?;
        Ok(f.f_split_with_sizes(&sizes, 0)?)
    }
}

fn narrow(t: &Tensor, r: &Range<i64>) -> Result<Tensor> {
    Ok(t.f_narrow(0, r.start, r.end - r.start)?)
}

fn set_rows(dst: &Tensor, r: &Range<i64>, src: &Tensor) -> Result<()> {
    narrow(dst, r)?.f_copy_(src)?;
    Ok(())
}

/// The batch a step works on: its shape, kinds and the four runs e2e, mul, any, adv.
struct Batch {
    shape: Vec<i64>,
    /// x's kind (model inputs and noises) and the compute kind (targets and losses).
    xk: Kind,
    ck: Kind,
    dev: Device,
    runs: [Range<i64>; 4],
}

impl Batch {
    fn new(x: &Tensor, cfg: &ObjectiveConfig) -> Result<Self> {
        let shape = x.size();
        let b = *shape.first().ok_or_else(|| Error::Value("x must have a batch dimension".into()))?;
        let xk = x.f_kind()?;
        let runs = split_sub_batches(b as usize, &cfg.sub_batches)?.map(|r| r.start as i64..r.end as i64);
        Ok(Self { shape, xk, ck: compute_kind(xk), dev: x.device(), runs })
    }

    fn rows(&self) -> i64 {
        self.shape[0]
    }

    /// The shape of `n` samples.
    fn samples(&self, n: i64) -> Vec<i64> {
        [&[n], &self.shape[1..]].concat()
    }

    /// [n] → [n, 1, …] to broadcast a per-row value over samples.
    fn per_row(&self, v: &Tensor) -> Result<Tensor> {
        rows(v, self.shape.len())
    }

    /// `n` normal samples, drawn in x's kind and returned in the compute kind.
    fn noise(&self, rng: &mut dyn Rng, n: i64) -> Result<Tensor> {
        Ok(rng.randn(&self.samples(n), (self.xk, self.dev))?.f_to_kind(self.ck)?)
    }

    /// x_t = t·z + (1 − t)·x, per row.
    fn interpolate(&self, x: &Tensor, z: &Tensor, t: &Tensor) -> Result<Tensor> {
        let tb = self.per_row(t)?;
        Ok(tb.f_mul(z)?.f_add(&tb.f_neg()?.f_add_scalar(1.0)?.f_mul(x)?)?)
    }
}

/// §3.1 times (draws 1–3): t, and tt per run — e2e rows go 1 → 0, mul rows to t_min, any
/// (and adv) rows to tt.
fn draw_times(cfg: &ObjectiveConfig, rng: &mut dyn Rng, bt: &Batch) -> Result<(Tensor, Tensor)> {
    let [e2e, mul, _, _] = &bt.runs;
    let times = sample_times(rng, bt.rows(), cfg.time_dist_ctrl, cfg.consistc_ratio, (bt.ck, bt.dev))?;
    let (t, tt) = (times.t, times.tt);
    let _ = narrow(&t, e2e)?.f_fill_(1.0)?;
    let _ = narrow(&tt, e2e)?.f_fill_(0.0)?;
    set_rows(&tt, mul, &narrow(&times.t_min, mul)?)?;
    Ok((t, tt))
}

/// The data the step learns from, in the compute kind: `x` with the adv rows (every row
/// with `use_image_free`) replaced by one-step fakes z' − F(z', 1, 0) (call 1, draw 4).
fn data_with_fakes(cfg: &ObjectiveConfig, net: &mut Caller, rng: &mut dyn Rng, bt: &Batch, x: &Tensor) -> Result<Tensor> {
    let rows = if cfg.use_image_free { 0..bt.rows() } else { bt.runs[3].clone() };
    if rows.is_empty() {
        return Ok(x.f_to_kind(bt.ck)?);
    }
    let n = rows.end - rows.start;
    let z = rng.randn(&bt.samples(n), (bt.xk, bt.dev))?;
    let (one, zero) = (Tensor::f_ones([n], (bt.ck, bt.dev))?, Tensor::f_zeros([n], (bt.ck, bt.dev))?);
    let f = {
        let _g = tch::no_grad_guard();
        net.call(&z, &one, &zero, Call::one(Net::Online, false, rows.clone(), CondKind::Cond))?
    };
    let fake = z.f_to_kind(bt.ck)?.f_sub(&f.f_to_kind(bt.ck)?)?;
    // A copy: x may already be in the compute kind, and the caller's x stays untouched.
    let data = x.f_to_kind(bt.ck)?.f_empty_like()?;
    data.shallow_clone().f_copy_(x)?;
    set_rows(&data, &rows, &fake)?;
    Ok(data)
}

/// Noise (draw 5), x_t = t·z + (1 − t)·x and the plain target z − x; then the adv rows'
/// times flip to −t (they were built with +t).
fn noisy_inputs(rng: &mut dyn Rng, bt: &Batch, data: &Tensor, t: &Tensor, tt: &Tensor) -> Result<(Tensor, Tensor)> {
    let z = bt.noise(rng, bt.rows())?;
    let x_t = bt.interpolate(data, &z, t)?;
    let target = z.f_sub(data)?;
    let adv = &bt.runs[3];
    let t_adv = narrow(t, adv)?.f_neg()?;
    set_rows(t, adv, &t_adv)?;
    set_rows(tt, adv, &t_adv)?;
    Ok((x_t, target))
}

/// §3.3 in place: on the non-adv rows with lo < t < hi — the mul ∪ any rows, plus the e2e
/// rows (t = 1) only when lo < 1 < hi — add the teacher's guidance enr·(v_c − v_u).
/// The conditional and unconditional teacher calls (3, 4) are independent: one batched call.
fn enhance_target(cfg: &ObjectiveConfig, net: &mut Caller, bt: &Batch, x_t: &Tensor, t: &Tensor, target: &Tensor) -> Result<()> {
    let [e2e, _, _, adv] = &bt.runs;
    let [lo, hi] = cfg.enhanced_range;
    let rows = if lo < 1.0 && hi > 1.0 { e2e.start } else { e2e.end }..adv.start;
    if cfg.enhanced_ratio == 0.0 || rows.is_empty() {
        return Ok(());
    }
    let (xs, ts) = (narrow(x_t, &rows)?, narrow(t, &rows)?);
    let input = |cond| Input { x: xs.shallow_clone(), t: ts.shallow_clone(), tt: ts.shallow_clone(), part: Part { rows: rows.clone(), cond } };
    let v = net.call_independent(Net::Teacher, vec![input(CondKind::Cond), input(CondKind::Uncond)])?;
    let (v_c, v_u) = (v[0].f_to_kind(bt.ck)?, v[1].f_to_kind(bt.ck)?);
    let replace = cfg.ema_decay_rate == 1.0 && cfg.use_image_free;
    let new = enhanced_target(&narrow(target, &rows)?, &v_c, &v_u, &ts, cfg.enhanced_ratio, (lo, hi), replace)?;
    set_rows(target, &rows, &new)
}

/// §3.4 in place: the N-th order RCGM target on every non-adv row (calls 5 … 4+N, each
/// depending on the last), from the teacher — the online model when emd = 1.
#[allow(clippy::too_many_arguments)]
fn rcgm(cfg: &ObjectiveConfig, net: &mut Caller, bt: &Batch, x_t: &Tensor, f: &Tensor, t: &Tensor, tt: &Tensor, target: &Tensor) -> Result<()> {
    let [e2e, _, any, adv] = &bt.runs;
    if cfg.estimate_order < 1 || cfg.consistc_ratio == 0.0 || (e2e.is_empty() && any.is_empty()) {
        return Ok(());
    }
    let _g = tch::no_grad_guard();
    let pre = 0..adv.start;
    let who = if cfg.ema_decay_rate == 1.0 { Net::Online } else { Net::Teacher };
    let ck = bt.ck;
    let mut teacher = |x: &Tensor, s: &Tensor, s_next: &Tensor| -> Result<Tensor> {
        Ok(net.call(x, s, s_next, Call::one(who, false, pre.clone(), CondKind::Cond))?.f_to_kind(ck)?)
    };
    let n = |v: &Tensor| narrow(v, &pre);
    let new = rcgm_target(&mut teacher, &n(x_t)?, &n(target)?, &n(f)?, &n(t)?, &n(tt)?, cfg.estimate_order)?;
    set_rows(target, &pre, &new)
}

/// §3.5: the per-row loss L·w (w = 1 on adv rows) and the base term — its mean over all
/// rows, or over the mul ∪ adv rows when N = 0 (no RCGM target on the other runs).
fn weighted_loss(cfg: &ObjectiveConfig, bt: &Batch, f: &Tensor, target: &Tensor, t: &Tensor, tt: &Tensor) -> Result<(Tensor, Tensor)> {
    let [_, mul, _, adv] = &bt.runs;
    let w = time_weight(t, tt)?;
    let _ = narrow(&w, adv)?.f_fill_(1.0)?;
    let lw = per_row_loss(cfg.loss, f, target)?.f_mul(&w)?;
    let base = if cfg.estimate_order >= 1 {
        lw.f_mean(bt.ck)?
    } else {
        Tensor::f_cat(&[narrow(&lw, mul)?, narrow(&lw, adv)?], 0)?.f_mean(bt.ck)?
    };
    Ok((lw, base))
}

/// §3.6 on the e2e rows (draws 6, 7): the one-step samples x_e = x_t − |t|·F are re-noised
/// to x_τ and the model's fake (−τ) and real (+τ) velocities there — two independent calls,
/// batched into one — give Δv = clamp(v_fake − v_real, −1, 1); the term is
/// dmc·mean L(F_e2e, sg(F_e2e − Δv)). Zero when it does not apply.
fn distribution_matching(cfg: &ObjectiveConfig, net: &mut Caller, rng: &mut dyn Rng, bt: &Batch, x_t: &Tensor, f: &Tensor, t: &Tensor) -> Result<Tensor> {
    let e2e = &bt.runs[0];
    if cfg.consistc_ratio != 1.0 || cfg.dist_match_cof == 0.0 || e2e.is_empty() {
        return Ok(Tensor::f_zeros([], (bt.ck, bt.dev))?);
    }
    let fe = narrow(f, e2e)?;
    let delta = {
        let _g = tch::no_grad_guard();
        let x_e = narrow(x_t, e2e)?.f_sub(&fe.f_detach()?.f_mul(&bt.per_row(&narrow(t, e2e)?.f_abs()?)?)?)?;
        let tau = rng.rand(&[e2e.end - e2e.start], (bt.ck, bt.dev))?;
        let x_tau = bt.interpolate(&x_e, &bt.noise(rng, e2e.end - e2e.start)?, &tau)?;
        let input = |s: Tensor| Input { x: x_tau.shallow_clone(), t: s.shallow_clone(), tt: s, part: Part { rows: e2e.clone(), cond: CondKind::Cond } };
        let v = net.call_independent(Net::Online, vec![input(tau.f_neg()?), input(tau)])?;
        v[0].f_to_kind(bt.ck)?.f_sub(&v[1].f_to_kind(bt.ck)?)?.f_clamp(-1.0, 1.0)?
    };
    let l = per_row_loss(cfg.loss, &fe, &fe.f_detach()?.f_sub(&delta)?)?;
    Ok(l.f_mean(bt.ck)?.f_mul_scalar(cfg.dist_match_cof)?)
}

/// Detached [loss, base, dist_match, mean L·w of each run (NaN for an empty run)].
fn step_stats(bt: &Batch, loss: &Tensor, base: &Tensor, dm: &Tensor, lw: &Tensor) -> Result<Tensor> {
    let _g = tch::no_grad_guard();
    let lwd = lw.f_detach()?;
    let mut s = vec![loss.f_detach()?, base.f_detach()?, dm.f_detach()?];
    for r in &bt.runs {
        s.push(narrow(&lwd, r)?.f_mean(bt.ck)?);
    }
    Ok(Tensor::f_stack(&s, 0)?)
}

/// The TwinFlow loss for batch `x` (rows first). `has_uncond`: whether an unconditional
/// conditioning exists (without it the enhanced target has no direction and is skipped).
/// `batch`: run independent no-grad calls (teacher cond + uncond; the two
/// distribution-matching calls) as one call each — set it false for models whose rows are
/// not independent (BatchNorm in training mode).
pub fn training_step(
    cfg: &ObjectiveConfig,
    model: &mut dyn TrainModel,
    rng: &mut dyn Rng,
    x: &Tensor,
    has_uncond: bool,
    batch: bool,
) -> Result<StepOutput> {
    let bt = Batch::new(x, cfg)?;
    let mut net = Caller { model, kind: bt.xk, calls: 0, batch };
    let (t, tt) = draw_times(cfg, rng, &bt)?;
    let data = data_with_fakes(cfg, &mut net, rng, &bt, x)?;
    let (x_t, target) = noisy_inputs(rng, &bt, &data, &t, &tt)?;
    let all = Call::one(Net::Online, true, 0..bt.rows(), CondKind::Cond);
    let f = net.call(&x_t, &t, &tt, all)?.f_to_kind(bt.ck)?;
    let fd = f.f_detach()?;
    if has_uncond {
        enhance_target(cfg, &mut net, &bt, &x_t, &t, &target)?;
    }
    rcgm(cfg, &mut net, &bt, &x_t, &fd, &t, &tt, &target)?;
    let (lw, base) = weighted_loss(cfg, &bt, &f, &target, &t, &tt)?;
    let dm = distribution_matching(cfg, &mut net, rng, &bt, &x_t, &f, &t)?;
    let loss = base.f_add(&dm)?;
    let stats = step_stats(&bt, &loss, &base, &dm, &lw)?;
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
            assert_eq!(x.size()[0], call.len());
            assert_eq!(t.size(), vec![x.size()[0]]);
            self.calls.push(call.clone());
            Ok(x.matmul(&self.w) + t.view([-1, 1]) * &self.a + tt.view([-1, 1]) * 0.5)
        }
    }

    /// Deterministic draws from a hash of a counter: tests run in parallel threads, which
    /// would share (and race on) libtorch's global generator.
    struct Counter(f64);
    impl Rng for Counter {
        fn rand(&mut self, shape: &[i64], (kind, dev): (Kind, Device)) -> Result<Tensor> {
            let n: i64 = shape.iter().product();
            let k = Tensor::f_arange(n, (Kind::Double, Device::Cpu))?.f_add_scalar(self.0)?;
            self.0 += n as f64;
            let u = k.f_sin()?.f_mul_scalar(43758.5453)?.f_frac()?.f_abs()?; // in [0, 1)
            Ok(u.f_view(shape)?.f_to_kind(kind)?.f_to_device(dev)?)
        }
        fn randn(&mut self, shape: &[i64], opts: (Kind, Device)) -> Result<Tensor> {
            Ok(self.rand(shape, opts)?.f_mul_scalar(3.4)?.f_sub_scalar(1.7)?)
        }
    }

    fn run_with(cfg: &ObjectiveConfig, b: i64, uncond: bool, batch: bool, kind: Kind) -> (StepOutput, Lin) {
        let mut rng = Counter(0.5);
        let x = rng.randn(&[b, 2], (kind, Device::Cpu)).unwrap();
        let mut m = Lin::new();
        if kind == Kind::Double {
            m.w = m.w.detach().to_kind(kind).set_requires_grad(true);
            m.a = m.a.detach().to_kind(kind).set_requires_grad(true);
        }
        let out = training_step(cfg, &mut m, &mut rng, &x, uncond, batch).unwrap();
        (out, m)
    }

    fn run(cfg: &ObjectiveConfig, b: i64, uncond: bool) -> (StepOutput, Lin) {
        run_with(cfg, b, uncond, true, Kind::Float)
    }

    #[test]
    fn call_counts_follow_the_recipe() {
        // Batched: teacher cond + uncond is one call, the two distribution-matching calls one.
        for (recipe, batched, separate) in [("twinflow", 6, 8), ("rcgm", 4, 5), ("flow_matching", 1, 1)] {
            let cfg = ObjectiveConfig::recipe(recipe).unwrap();
            for (batch, want) in [(true, batched), (false, separate)] {
                let (out, m) = run_with(&cfg, 8, true, batch, Kind::Float);
                assert_eq!(out.model_calls, want, "{recipe} batch={batch}");
                assert_eq!(m.calls.len(), want);
                assert_eq!(m.calls.iter().filter(|c| c.grad).count(), 1, "{recipe}: one graded call");
            }
        }
        // No uncond: no guidance calls. N = 3: one more RCGM call.
        let cfg = ObjectiveConfig { estimate_order: 3, ..ObjectiveConfig::default() };
        assert_eq!(run(&cfg, 8, false).0.model_calls, 6);
        // Call order, rows and parts of the TwinFlow step (B = 8: runs of 2).
        let (_, m) = run(&ObjectiveConfig::default(), 8, true);
        use CondKind::*;
        use Net::*;
        let p = |rows: Range<i64>, cond| Part { rows, cond };
        let c = |net, grad, parts| Call { net, grad, parts };
        assert_eq!(
            m.calls,
            vec![
                c(Online, false, vec![p(6..8, Cond)]),
                c(Online, true, vec![p(0..8, Cond)]),
                c(Teacher, false, vec![p(2..6, Cond), p(2..6, Uncond)]),
                c(Teacher, false, vec![p(0..6, Cond)]),
                c(Teacher, false, vec![p(0..6, Cond)]),
                c(Online, false, vec![p(0..2, Cond), p(0..2, Cond)]),
            ]
        );
    }

    #[test]
    fn batched_calls_leave_loss_and_gradients_unchanged() {
        // Lin's rows are independent, so batching changes at most the last bits (float64).
        for recipe in ["twinflow", "rcgm"] {
            let cfg = ObjectiveConfig::recipe(recipe).unwrap();
            let (a, ma) = run_with(&cfg, 10, true, true, Kind::Double);
            let (b, mb) = run_with(&cfg, 10, true, false, Kind::Double);
            assert!(a.model_calls < b.model_calls, "{recipe}");
            let close = |x: &Tensor, y: &Tensor| {
                let tol = 1e-6 * y.abs().max().double_value(&[]).max(1e-300);
                assert!((x - y).abs().max().double_value(&[]) <= tol, "{recipe}: {x:?} vs {y:?}");
            };
            close(&a.loss, &b.loss);
            close(&a.stats.nan_to_num(0.0, None, None), &b.stats.nan_to_num(0.0, None, None));
            let ga = Tensor::run_backward(&[&a.loss], &[&ma.w, &ma.a], false, false);
            let gb = Tensor::run_backward(&[&b.loss], &[&mb.w, &mb.a], false, false);
            for (x, y) in ga.iter().zip(&gb) {
                close(x, y);
            }
        }
    }

    #[test]
    fn times_and_noisy_inputs_follow_the_runs() {
        tch::manual_seed(2);
        let cfg = ObjectiveConfig::default();
        let x = Tensor::randn([8, 2], (Kind::Double, Device::Cpu));
        let bt = Batch::new(&x, &cfg).unwrap(); // runs of 2: e2e, mul, any, adv
        let (t, tt) = draw_times(&cfg, &mut GlobalRng, &bt).unwrap();
        let v = |a: &Tensor| Vec::<f64>::try_from(a).unwrap();
        let (tv, ttv) = (v(&t), v(&tt));
        assert_eq!((tv[0], tv[1], ttv[0], ttv[1]), (1.0, 1.0, 0.0, 0.0)); // e2e: 1 → 0
        assert!((2..4).all(|i| tv[i] - ttv[i] <= 0.05 * tv[i] + 1e-12)); // mul: tt = t_min
        let (x_t, target) = noisy_inputs(&mut GlobalRng, &bt, &x, &t, &tt).unwrap();
        let (t2, tt2) = (v(&t), v(&tt));
        assert!((6..8).all(|i| t2[i] == -tv[i] && tt2[i] == -tv[i])); // adv rows carry −t
        // x_t = t·z + (1 − t)·x with z = target + x, at the times drawn (+t)
        let z = &target + &x;
        let want = bt.interpolate(&x, &z, &Tensor::from_slice(&tv)).unwrap();
        assert!((x_t - want).abs().max().double_value(&[]) < 1e-12);
    }

    #[test]
    fn fakes_replace_only_the_adv_rows_and_leave_x_untouched() {
        let x = Tensor::from_slice(&[1.0f64, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]).view([8, 1]);
        let x0 = x.copy();
        for image_free in [false, true] {
            let cfg = ObjectiveConfig { use_image_free: image_free, ..ObjectiveConfig::default() };
            let bt = Batch::new(&x, &cfg).unwrap();
            let mut m = Lin::new();
            m.w = Tensor::zeros([1, 1], (Kind::Double, Device::Cpu));
            m.a = Tensor::ones([1], (Kind::Double, Device::Cpu));
            let mut net = Caller { model: &mut m, kind: Kind::Double, calls: 0, batch: true };
            let mut rng = Counter(0.25);
            let data = data_with_fakes(&cfg, &mut net, &mut rng, &bt, &x).unwrap();
            // F(z, 1, 0) = 0·z + 1·1 + 0.5·0 = 1, so a fake is z − 1 with z the first draw
            let z = Counter(0.25).randn(&[if image_free { 8 } else { 2 }, 1], (Kind::Double, Device::Cpu)).unwrap();
            let fakes = if image_free { data.shallow_clone() } else { data.narrow(0, 6, 2) };
            assert!((fakes - (z - 1.0)).abs().max().double_value(&[]) < 1e-12, "image_free={image_free}");
            if !image_free {
                assert!(data.narrow(0, 0, 6).equal(&x0.narrow(0, 0, 6)));
            }
            assert!(x.equal(&x0), "the caller's x changed");
            assert_eq!(m.calls, vec![Call::one(Net::Online, false, if image_free { 0..8 } else { 6..8 }, CondKind::Cond)]);
        }
    }

    #[test]
    fn without_rcgm_the_base_averages_only_mul_and_adv_rows() {
        let cfg = ObjectiveConfig { estimate_order: 0, loss: LossKind::L2, ..ObjectiveConfig::default() };
        let x = Tensor::zeros([8, 2], (Kind::Double, Device::Cpu));
        let bt = Batch::new(&x, &cfg).unwrap();
        let f = Tensor::arange(16, (Kind::Double, Device::Cpu)).view([8, 2]);
        let t = Tensor::full([8], 0.5, (Kind::Double, Device::Cpu));
        let (lw, base) = weighted_loss(&cfg, &bt, &f, &x, &t, &t).unwrap();
        let lw: Vec<f64> = Vec::try_from(&lw).unwrap();
        let want = (lw[2] + lw[3] + lw[6] + lw[7]) / 4.0;
        assert!((base.double_value(&[]) - want).abs() < 1e-9);
    }

    #[test]
    fn gradients_reach_the_parameters_and_stay_finite() {
        for recipe in ["twinflow", "rcgm", "flow_matching"] {
            for loss in [LossKind::L2, LossKind::Barron { alpha: 1.0, c: 1e-3 }] {
                let cfg = ObjectiveConfig { loss, ..ObjectiveConfig::recipe(recipe).unwrap() };
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
        let cfg = ObjectiveConfig { consistc_ratio: 1e-12, ..ObjectiveConfig::default() };
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
        let e = training_step(&ObjectiveConfig::default(), &mut Bad, &mut GlobalRng, &x, false, true).err().unwrap();
        assert!(e.to_string().contains("shape"), "{e}");
    }
}
