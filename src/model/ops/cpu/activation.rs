//! Feed-forward activations on the CPU: one parallel pass forward and a one-pass backward for
//! training, and for inference of gated blocks the stacked form `act(y[.., :f]) * y[.., f:]`.
//!
//! Composed from candle's ops, `act(a) * b` and its gradient take about a dozen passes over the
//! hidden activations, several single-threaded (candle's GELU backward alone is `powf(3)`, `tanh`,
//! `powf(2)` and six binary ops, each with a fresh temporary). Here the forward is one parallel pass
//! and the backward one more, producing both inputs' gradients at once. SiLU and ReLU values use
//! candle's formulas (bit-identical to the composed ops); GELU's tanh is [`fast_tanh`] (within 1e-6
//! of libm's, and the loops vectorize), the exact GELU's erf [`fast_erf`] (within 5e-7);
//! derivatives are the exact ones (as torch's).

use candle_core::{CpuStorage, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous_f32, fast_exp, par_map2, simd_map2};
use crate::error::Result;
use crate::model::activation::Activation;

/// Elements per parallel task: big enough that a task outweighs its scheduling.
const CHUNK: usize = 8192;

/// tanh by the odd rational minimax approximation (degrees 13/6) that Eigen, XLA and ONNX Runtime
/// use, clamped where tanh rounds to +-1 in f32. Within a few ulp of libm's `tanhf`, and without
/// its branches, so loops over activations vectorize (libm's tanh does not, and GELU runs on every
/// feed-forward activation).
#[inline(always)]
pub fn fast_tanh(x: f32) -> f32 {
    let x = x.clamp(-7.905_311, 7.905_311);
    let x2 = x * x;
    let mut p = -2.760_768_5e-16f32;
    for c in [
        2.000_188e-13,
        -8.604_672e-11,
        5.122_297e-8,
        1.485_722_4e-5,
        6.372_619_3e-4,
        4.893_524_6e-3,
    ] {
        p = p * x2 + c;
    }
    let mut q = 1.198_258_4e-6f32;
    for c in [1.185_347_1e-4, 2.268_434_6e-3, 4.893_525e-3] {
        q = q * x2 + c;
    }
    x * p / q
}

/// erf by the odd rational approximation (degrees 13/8 on [-4, 4], where erf is 1 within 2e-8 past
/// it) that Eigen and XLA use: within 5e-7 of the exact value in f32, without branches, so it
/// vectorizes (libm's `erff` does not: it was 3% of a BART benchmark).
#[inline(always)]
pub fn fast_erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10f32;
    for c in [
        2.770_681_4e-8,
        -2.101_024e-6,
        -5.692_506_4e-5,
        -7.349_906_3e-4,
        -2.954_600_1e-3,
        -1.609_603_3e-2,
    ] {
        p = p * x2 + c;
    }
    let mut q = -1.456_607_2e-5f32;
    for c in [-2.133_740_6e-4, -1.682_827e-3, -7.373_329e-3, -1.426_474e-2] {
        q = q * x2 + c;
    }
    x * p / q
}

/// The activation's value: candle's formulas, with [`fast_tanh`] and [`fast_erf`] in GELU.
#[inline(always)]
pub fn value(act: Activation, v: f32) -> f32 {
    match act {
        Activation::GeluNew => {
            0.5 * v * (1.0 + fast_tanh(0.797_884_6 * v * (1.0 + 0.044715 * v * v)))
        }
        Activation::Silu => v / (1.0 + (-v).exp()),
        Activation::Relu => v.max(0.0),
        Activation::Gelu => 0.5 * v * (1.0 + fast_erf(v * std::f32::consts::FRAC_1_SQRT_2)),
    }
}

/// `(act(v), d act / dv)`, sharing the transcendental between the two.
#[inline(always)]
fn value_and_derivative(act: Activation, v: f32) -> (f32, f32) {
    match act {
        Activation::GeluNew => {
            const C: f32 = 0.797_884_6; // sqrt(2 / pi)
            let t = fast_tanh(C * v * (1.0 + 0.044715 * v * v));
            let d = 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * C * (1.0 + 3.0 * 0.044715 * v * v);
            (0.5 * v * (1.0 + t), d)
        }
        Activation::Silu => {
            let s = 1.0 / (1.0 + (-v).exp());
            (v * s, s * (1.0 + v * (1.0 - s)))
        }
        // As torch: no gradient at exactly 0.
        Activation::Relu => (v.max(0.0), if v > 0.0 { 1.0 } else { 0.0 }),
        Activation::Gelu => {
            // Φ(v) + v φ(v).
            let cdf = 0.5 * (1.0 + fast_erf(v * std::f32::consts::FRAC_1_SQRT_2));
            // fast_exp: libm's expf neither vectorizes nor inlines (the backward's largest cost).
            let pdf = fast_exp(-0.5 * v * v) * 0.398_942_3; // 1 / sqrt(2 pi)
            (v * cdf, cdf + v * pdf)
        }
    }
}

/// `$body` with `$k` a constant naming `$act`'s activation, so each loop over elements compiles one
/// branch-free body per activation (a `match` per element does not vectorize).
macro_rules! per_activation {
    ($act:expr, $k:ident => $body:expr) => {
        match $act {
            Activation::Gelu => {
                const $k: Activation = Activation::Gelu;
                $body
            }
            Activation::GeluNew => {
                const $k: Activation = Activation::GeluNew;
                $body
            }
            Activation::Silu => {
                const $k: Activation = Activation::Silu;
                $body
            }
            Activation::Relu => {
                const $k: Activation = Activation::Relu;
                $body
            }
        }
    };
}

/// Whether the fused ops implement `act` (all four today; the composed path stays the reference).
pub fn supported(act: Activation) -> bool {
    matches!(
        act,
        Activation::Gelu | Activation::GeluNew | Activation::Silu | Activation::Relu
    )
}

/// `act(a)`, differentiable.
pub fn act(a: &Tensor, act: Activation) -> Result<Tensor> {
    Ok(a.contiguous()?.apply_op1(Act(act))?)
}

/// `act(a) * b`, differentiable in both.
pub fn gated(a: &Tensor, b: &Tensor, act: Activation) -> Result<Tensor> {
    Ok(a.contiguous()?.apply_op2(&b.contiguous()?, Gated(act))?)
}

struct Act(Activation);

impl candle_core::CustomOp1 for Act {
    fn name(&self) -> &'static str {
        "fused-act"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let a = contiguous_f32(s, l, self.name())?;
        let out = per_activation!(self.0, K => par_map2(a, a, |v, _| value(K, v)));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(
            &grad.contiguous()?,
            &ActBackward(self.0),
        )?))
    }
}

/// `grad * act'(a)`.
struct ActBackward(Activation);

impl candle_core::CustomOp2 for ActBackward {
    fn name(&self) -> &'static str {
        "fused-act-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (a, g) = (
            contiguous_f32(s1, l1, self.name())?,
            contiguous_f32(s2, l2, self.name())?,
        );
        let out =
            per_activation!(self.0, K => par_map2(a, g, |a, g| g * value_and_derivative(K, a).1));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

struct Gated(Activation);

impl candle_core::CustomOp2 for Gated {
    fn name(&self) -> &'static str {
        "fused-act-times-gate"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (a, b) = (
            contiguous_f32(s1, l1, self.name())?,
            contiguous_f32(s2, l2, self.name())?,
        );
        let out = per_activation!(self.0, K => par_map2(a, b, |a, b| value(K, a) * b));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // Both gradients from one pass, stacked as (2, ..a's shape): [grad_a; grad_b].
        let both = a.apply_op3_no_bwd(b, &grad.contiguous()?, &GatedBackward(self.0))?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

/// `[grad * b * act'(a); grad * act(a)]`.
struct GatedBackward(Activation);

impl candle_core::CustomOp3 for GatedBackward {
    fn name(&self) -> &'static str {
        "fused-act-times-gate-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (a, b, g) = (
            contiguous_f32(s1, l1, name)?,
            contiguous_f32(s2, l2, name)?,
            contiguous_f32(s3, l3, name)?,
        );
        let n = a.len();
        let mut out = vec![0f32; 2 * n];
        let (ga, gb) = out.split_at_mut(n);
        ga.par_chunks_mut(CHUNK)
            .zip(gb.par_chunks_mut(CHUNK))
            .zip(
                a.par_chunks(CHUNK)
                    .zip(b.par_chunks(CHUNK))
                    .zip(g.par_chunks(CHUNK)),
            )
            .for_each(|((ga, gb), ((a, b), g))| {
                for i in 0..a.len() {
                    let (v, d) = value_and_derivative(self.0, a[i]);
                    ga[i] = g[i] * b[i] * d;
                    gb[i] = g[i] * v;
                }
            });
        let mut shape = vec![2];
        shape.extend_from_slice(l1.dims());
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

/// `act(a) * b` where each row of the input is `[a | b]` (the stacked `wi_0`, `wi_1` projections of a
/// gated feed-forward block): one parallel pass instead of a single-threaded activation, a multiply
/// and their temporaries. The activation formulas are [`value`]'s.
struct FusedGatedAct {
    act: Activation,
}

impl candle_core::CustomOp1 for FusedGatedAct {
    fn name(&self) -> &'static str {
        "fused-gated-act"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let data = contiguous_f32(s, l, self.name())?;
        let dims = l.dims();
        let width = dims[dims.len() - 1];
        let f = width / 2;
        let rows = data.len() / width.max(1);
        let mut out = vec![0f32; rows * f];
        out.par_chunks_mut(f.max(1))
            .zip(data.par_chunks(width.max(1)))
            .with_min_len(16)
            .for_each(|(o, row)| {
                let (a, b) = row.split_at(f);
                per_activation!(self.act, K => simd_map2(o, a, b, |a, b| value(K, a) * b))
            });
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("rank >= 1") = f;
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

/// `act(y[.., :f]) * y[.., f:]` for `y` = the stacked gate projections (inference, CPU, f32).
pub fn gated_stacked(y: &Tensor, act: Activation) -> Result<Tensor> {
    Ok(y.contiguous()?.apply_op1_no_bwd(&FusedGatedAct { act })?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::composed::activate;
    use crate::model::{max_abs_diff, max_scaled_diff};
    use candle_core::{Device, Var};

    const ALL: [Activation; 4] = [
        Activation::Gelu,
        Activation::GeluNew,
        Activation::Silu,
        Activation::Relu,
    ];

    /// Forward equal to candle's composed ops (bit-identical but for GELU's tanh), gradients equal to
    /// candle's autograd of them.
    #[test]
    fn fused_ops_match_composed_values_and_gradients() {
        let dev = Device::Cpu;
        // Enough elements for several parallel chunks; values spread over the activations' curves.
        let a = Var::randn(0f32, 2.0, (3, 7, 1000), &dev).unwrap();
        let b = Var::randn(0f32, 1.0, (3, 7, 1000), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (3, 7, 1000), &dev).unwrap();
        for act_kind in ALL {
            let loss = |y: &Tensor| (y * &w).unwrap().sum_all().unwrap();
            // Ungated.
            let composed = activate(a.as_tensor(), act_kind).unwrap();
            let fused = act(a.as_tensor(), act_kind).unwrap();
            let tol = if matches!(act_kind, Activation::GeluNew | Activation::Gelu) {
                1e-6
            } else {
                0.0
            };
            // fast_tanh / fast_erf are within 1e-6 of libm's: GELU's error scales with |a|.
            let scale = (a.as_tensor().abs().unwrap() + 1.0).unwrap();
            let diff = max_scaled_diff(&composed, &fused, &scale);
            assert!(diff <= tol, "{act_kind:?}: {diff}");
            let (gc, gf) = (
                loss(&composed).backward().unwrap(),
                loss(&fused).backward().unwrap(),
            );
            let (gc, gf) = (gc.get(&a).unwrap(), gf.get(&a).unwrap());
            assert!(
                max_abs_diff(gc, gf) < 1e-4,
                "{act_kind:?}: {}",
                max_abs_diff(gc, gf)
            );
            // Gated.
            let composed = (activate(a.as_tensor(), act_kind).unwrap() * b.as_tensor()).unwrap();
            let fused = gated(a.as_tensor(), b.as_tensor(), act_kind).unwrap();
            let gated_scale = (&scale * (b.as_tensor().abs().unwrap() + 1.0).unwrap()).unwrap();
            let diff = max_scaled_diff(&composed, &fused, &gated_scale);
            assert!(diff <= tol, "{act_kind:?}: {diff}");
            let (gc, gf) = (
                loss(&composed).backward().unwrap(),
                loss(&fused).backward().unwrap(),
            );
            for v in [&a, &b] {
                let (x, y) = (gc.get(v).unwrap(), gf.get(v).unwrap());
                assert!(
                    max_abs_diff(x, y) < 1e-4,
                    "{act_kind:?}: {}",
                    max_abs_diff(x, y)
                );
            }
        }
    }

    #[test]
    fn fast_tanh_is_within_a_few_ulp_of_tanh() {
        let mut worst = 0f64;
        for i in -200_000..=200_000 {
            let x = i as f32 * 5e-5; // -10 .. 10, dense near 0
            let exact = (x as f64).tanh();
            let err = (fast_tanh(x) as f64 - exact).abs() / exact.abs().max(1e-30);
            worst = worst.max(if x == 0.0 { 0.0 } else { err });
        }
        assert!(worst < 1e-6, "worst relative error {worst}");
        assert_eq!(fast_tanh(0.0), 0.0);
        assert_eq!(fast_tanh(40.0), 1.0);
        assert_eq!(fast_tanh(-40.0), -1.0);
    }

    #[test]
    fn fast_erf_is_within_a_few_ulp_of_erf() {
        let mut worst = 0f64;
        for i in -200_000..=200_000 {
            let x = i as f32 * 5e-5;
            let exact = libm::erf(x as f64);
            worst = worst.max((fast_erf(x) as f64 - exact).abs());
        }
        assert!(worst < 5e-7, "worst error {worst}");
        assert_eq!(fast_erf(0.0), 0.0);
        assert!((fast_erf(9.0) - 1.0).abs() < 5e-7);
    }

    #[test]
    fn derivatives_match_finite_differences() {
        for act_kind in ALL {
            for &v in &[-3.0f32, -1.2, -0.3, 0.4, 1.1, 2.5] {
                let h = 1e-2f32;
                let fd = (value(act_kind, v + h) - value(act_kind, v - h)) / (2.0 * h);
                let d = value_and_derivative(act_kind, v).1;
                assert!((fd - d).abs() < 2e-3, "{act_kind:?} at {v}: {d} vs {fd}");
            }
        }
        assert_eq!(value_and_derivative(Activation::Relu, 0.0).1, 0.0);
    }

    #[test]
    fn stacked_gated_activation_matches_composed_ops() {
        let dev = Device::Cpu;
        let y = Tensor::randn(0f32, 2.0, (3, 5, 2 * 7), &dev).unwrap();
        for act in ALL {
            let composed = (activate(&y.narrow(2, 0, 7).unwrap(), act).unwrap()
                * y.narrow(2, 7, 7).unwrap())
            .unwrap();
            let fused = gated_stacked(&y, act).unwrap();
            assert_eq!(fused.dims(), &[3, 5, 7]);
            // Bit-identical but for GELU, whose tanh is the fast rational approximation (within 1e-6
            // relative of libm's): its error scales with |a| * |b|.
            let tol = if matches!(act, Activation::GeluNew | Activation::Gelu) {
                1e-6
            } else {
                0.0
            };
            let scale = ((y.narrow(2, 0, 7).unwrap().abs().unwrap() + 1.0).unwrap()
                * (y.narrow(2, 7, 7).unwrap().abs().unwrap() + 1.0).unwrap())
            .unwrap();
            let diff = crate::model::max_scaled_diff(&composed, &fused, &scale);
            assert!(diff <= tol, "{act:?}: {diff}");
        }
    }
}
