//! A SIMD kernel for tract's channel-last depthwise convolution on x86-64, registered in
//! tract-linalg's routine table.
//!
//! tract 0.23 ships the channel-inner depthwise kernel (`Func::DepthwiseC`) for wasm only;
//! on x86-64 its `DepthWise` op falls back to a generic loop that reloads and stores every
//! output channel once per kernel tap. EfficientNet-Lite0 has 16 depthwise convolutions,
//! and with `conv_nhwc` (the default transform) every one of them runs channel-last, so
//! this is the loop the profile found at ~17 % of tract's time.
//!
//! tract-linalg collects its kernels with `inventory`, whose `Routine` descriptors are
//! public: a crate that links it can declare one, and tract picks an architecture kernel
//! over none for that function. This module declares one for machines with AVX. It keeps
//! the generic loop's arithmetic exactly (the bias, then each tap's product added in tap
//! order, multiply and add each rounded, no fused multiply-add), so tract's embeddings are
//! bit for bit what they were without it; only the loop order changes: each block of 32
//! channels is summed over the taps in registers and stored once.

#[cfg(target_arch = "x86_64")]
use tract_onnx::tract_core::tract_linalg::{
    isa::{Arch, Isa, IsaReq},
    routines::{Func, Routine, RoutineFactory},
};

/// The name tract reports for the kernel (`tract_linalg::routines::best_for`).
pub const KERNEL_NAME: &str = "fruits_flow_avx_depthwise_c_f32";

#[cfg(target_arch = "x86_64")]
inventory::submit! {
    Routine {
        func: Func::DepthwiseC,
        arch: Some(Arch::X86_64),
        isa: IsaReq::ANY.needing(&[Isa::X86_64Avx]),
        boost: 0,
        round_trip: false,
        factory: RoutineFactory::DepthwiseCF32 { name: KERNEL_NAME, run: depthwise_c_f32 },
    }
}

/// The depthwise kernel tract runs here for channel-last f32 convolutions, if any: this
/// module's on a machine with AVX (`None` means tract's generic loop).
pub fn active_kernel() -> Option<&'static str> {
    use tract_onnx::prelude::DatumType;
    use tract_onnx::tract_core::tract_linalg::{isa, routines};
    routines::best_for(routines::Func::DepthwiseC, DatumType::F32, &isa::native())
        .map(|routine| routine.name())
}

/// One channel-inner depthwise run, as `tract_linalg::routines::DepthwiseCF32` defines it:
/// `len` output positions of `channels` contiguous channels; point `i`, channel `c`, is
/// `bias[c]` plus every `kernel[tap_indices[t] * k_stride + c] *
/// input[i * in_stride + offsets[t] + c]`, written at `output[i * out_stride + c]`.
///
/// # Safety
/// As the type's: every input, kernel and bias value named above readable, every output
/// value writable, and the machine has AVX (tract only runs a routine its `isa` allows).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[allow(clippy::too_many_arguments)]
unsafe fn depthwise_c_f32(
    input: *const f32,
    output: *mut f32,
    kernel: *const f32,
    tap_indices: &[usize],
    offsets: &[isize],
    bias: *const f32,
    channels: usize,
    k_stride: usize,
    len: usize,
    in_stride: isize,
    out_stride: isize,
) {
    use std::arch::x86_64::*;
    // SAFETY: every pointer below stays inside what the caller vouched for: channel c of
    // an input, kernel, bias or output run, for c < channels, i < len and the given taps.
    unsafe {
        // Each tap's kernel row and input offset, resolved once per run, not per point.
        let taps: Vec<(*const f32, isize)> = tap_indices
            .iter()
            .zip(offsets)
            .map(|(&tap, &off)| (kernel.add(tap * k_stride), off))
            .collect();
        for i in 0..len as isize {
            let x = input.offset(i * in_stride);
            let out = output.offset(i * out_stride);
            let mut c = 0;
            while c + 32 <= channels {
                let mut acc = [
                    _mm256_loadu_ps(bias.add(c)),
                    _mm256_loadu_ps(bias.add(c + 8)),
                    _mm256_loadu_ps(bias.add(c + 16)),
                    _mm256_loadu_ps(bias.add(c + 24)),
                ];
                for &(k, off) in &taps {
                    let (k, xt) = (k.add(c), x.offset(off).add(c));
                    for (lane, acc) in acc.iter_mut().enumerate() {
                        let product = _mm256_mul_ps(
                            _mm256_loadu_ps(k.add(8 * lane)),
                            _mm256_loadu_ps(xt.add(8 * lane)),
                        );
                        *acc = _mm256_add_ps(*acc, product);
                    }
                }
                for (lane, acc) in acc.iter().enumerate() {
                    _mm256_storeu_ps(out.add(c + 8 * lane), *acc);
                }
                c += 32;
            }
            while c + 8 <= channels {
                let mut acc = _mm256_loadu_ps(bias.add(c));
                for &(k, off) in &taps {
                    let product = _mm256_mul_ps(
                        _mm256_loadu_ps(k.add(c)),
                        _mm256_loadu_ps(x.offset(off).add(c)),
                    );
                    acc = _mm256_add_ps(acc, product);
                }
                _mm256_storeu_ps(out.add(c), acc);
                c += 8;
            }
            while c < channels {
                let mut sum = *bias.add(c);
                for &(k, off) in &taps {
                    sum += *k.add(c) * *x.offset(off).add(c);
                }
                *out.add(c) = sum;
                c += 1;
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// tract's generic channel-last loop (`eval_c_inner` in tract-core's `depth_wise.rs`):
    /// the bias, then each tap's product added in tap order.
    #[allow(clippy::too_many_arguments)]
    fn generic(
        input: &[f32],
        kernel: &[f32],
        taps: &[(usize, isize)],
        bias: &[f32],
        k_stride: usize,
        len: usize,
        in_stride: isize,
        out_stride: isize,
        base: isize,
        output: &mut [f32],
    ) {
        let channels = bias.len();
        for i in 0..len as isize {
            let o = (i * out_stride) as usize;
            output[o..o + channels].copy_from_slice(bias);
            for &(tap, off) in taps {
                for c in 0..channels {
                    let x = input[(base + i * in_stride + off) as usize + c];
                    output[o + c] += kernel[tap * k_stride + c] * x;
                }
            }
        }
    }

    /// Values whose products and sums round, so an order or fusing change shows.
    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let v = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8;
                (v as f32 / (1 << 24) as f32 - 0.5) * 3.7
            })
            .collect()
    }

    #[test]
    fn kernel_equals_tracts_generic_loop_bit_for_bit() {
        if !std::is_x86_feature_detected!("avx") {
            eprintln!("skipped: this machine has no AVX");
            return;
        }
        // Channel counts across the 32/8/1 blocks (Lite0 has 16 to 1152), 3x3 and 5x5
        // kernels, border zones with fewer taps, strided rows (stride-2 convolutions)
        // and outputs padded wider than the channels.
        for &(channels, k_stride) in &[(1, 1), (7, 9), (8, 8), (33, 40), (96, 96), (144, 150)] {
            for &(kernel_taps, take) in &[(9usize, 9usize), (9, 4), (25, 25), (25, 15)] {
                let taps: Vec<(usize, isize)> = (0..take)
                    .map(|t| {
                        let tap = (t * 7) % kernel_taps;
                        (
                            tap,
                            (t as isize - take as isize / 2) * k_stride as isize * 3,
                        )
                    })
                    .collect();
                let len = 13;
                let (in_stride, out_stride) = (2 * k_stride as isize, k_stride as isize + 3);
                let base = 60 * k_stride as isize;
                let input = values((base as usize) * 2 + len * in_stride as usize + 64, 1);
                let kernel = values(kernel_taps * k_stride, 2);
                let bias = values(channels, 3);
                let size = len * out_stride as usize + channels;
                let mut expected = vec![0.0; size];
                generic(
                    &input,
                    &kernel,
                    &taps,
                    &bias,
                    k_stride,
                    len,
                    in_stride,
                    out_stride,
                    base,
                    &mut expected,
                );
                let mut got = vec![0.0; size];
                let (indices, offsets): (Vec<usize>, Vec<isize>) = taps.iter().copied().unzip();
                // SAFETY: every offset read stays inside `input` (base covers the negative
                // ones), the kernel rows inside `kernel`, and `got` holds len rows.
                unsafe {
                    depthwise_c_f32(
                        input.as_ptr().offset(base),
                        got.as_mut_ptr(),
                        kernel.as_ptr(),
                        &indices,
                        &offsets,
                        bias.as_ptr(),
                        channels,
                        k_stride,
                        len,
                        in_stride,
                        out_stride,
                    )
                };
                for i in 0..len {
                    let o = i * out_stride as usize;
                    let (want, have) = (&expected[o..o + channels], &got[o..o + channels]);
                    let same = want
                        .iter()
                        .zip(have)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "channels {channels}, {take} taps, point {i}: {have:?} != {want:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn tract_runs_this_kernel_on_a_machine_with_avx() {
        let expected = std::is_x86_feature_detected!("avx").then_some(KERNEL_NAME);
        assert_eq!(active_kernel(), expected);
    }
}
