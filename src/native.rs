//! The C++ side tch does not have (built by build.rs against libtorch's headers): error messages
//! across the boundary, and the output layer's token NLL in one pass over the logits
//! (src/token_nll.cpp). libtorch scores a token as a bias pass, a bfloat16-to-float32 copy, a
//! log-softmax that writes all of [R, V] and a gather; the kernel reads each row of logits once
//! (twice from cache) and writes one number, so where the matrix product is fast (bfloat16 on a
//! CPU with AMX: 27 ms for 1,677 rows × 512 × 10,000 words, against 70 ms for those passes) the
//! passes stop being most of an evaluation. Also dropout's noise drawn in parallel
//! (src/dropout.cpp), and the decoder's LSTM for scoring with the input's share of its gates
//! computed once for the K samples of a sentence (src/lstm.cpp). Fused Adam's own binding lives
//! in `optim`.

use std::ffi::{c_char, c_int, CStr};

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

extern "C" {
    fn textvae_kernels_available() -> c_int;
    fn textvae_grad_mode_enabled() -> c_int;
    fn textvae_token_nll(
        logits: *const C_tensor,
        bias: *const C_tensor,
        targets: *const C_tensor,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn textvae_token_nll_grad(
        h: *const C_tensor,
        w: *const C_tensor,
        bias: *const C_tensor,
        targets: *const C_tensor,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn textvae_dropout_noise(
        like: *const C_tensor,
        p: f64,
        seed: *const u64,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn textvae_lstm_shared_inputs(
        inputs: *const C_tensor,
        w: *const C_tensor,
        h0: *const C_tensor,
        z: *const C_tensor,
        c0: *const C_tensor,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn textvae_free_message(msg: *mut c_char);
}

/// The message behind a C function's non-null error return, released; None for null.
///
/// # Safety
/// `err` is null or a NUL-terminated string from the C side's `textvae_copy_message`, not yet
/// released.
pub unsafe fn take_message(err: *mut c_char) -> Option<String> {
    if err.is_null() {
        return None;
    }
    let msg = CStr::from_ptr(err).to_string_lossy().into_owned();
    textvae_free_message(err);
    Some(msg)
}

/// Whether [`token_nll`] and [`lstm_shared_inputs`] run for tensors on `device`: on the CPU
/// where this build has row loops for the instruction set libtorch dispatches to (AVX2 or
/// AVX512 on x86-64); never on a GPU, where the log-softmax is one kernel among many that keep
/// it busy and cuDNN runs the LSTM.
pub fn kernels_run_on(device: Device) -> bool {
    // SAFETY: no arguments; the C side only reads libtorch's CPU capability.
    device == Device::Cpu && unsafe { textvae_kernels_available() } != 0
}

/// Whether autograd records operations on this thread now, i.e. not inside `tch::no_grad` (tch
/// can set the mode but not read it).
pub fn grad_mode_enabled() -> bool {
    // SAFETY: no arguments; reads libtorch's thread-local grad mode.
    unsafe { textvae_grad_mode_enabled() != 0 }
}

/// -log softmax(logits + bias)[targets] of each row, in float32: logits [R, V] (float32 or
/// bfloat16), bias [V] float32, targets [R] int64 -> [R] float32. Not differentiable: for
/// scoring under no-grad. Requires [`kernels_run_on`] the CPU.
pub fn token_nll(logits: &Tensor, bias: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (bias, targets) = (bias.to_kind(Kind::Float), targets.to_kind(Kind::Int64));
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: every handle points to a live tensor borrowed for this call; the C side checks
    // shapes, kinds and devices before it touches their data, and sets `out` only on success.
    let err =
        unsafe { textvae_token_nll(logits.as_ptr(), bias.as_ptr(), targets.as_ptr(), &mut out) };
    // SAFETY: `err` and `out` are what the call returned, each taken once.
    unsafe { returned("the token NLL kernel", err, out) }
}

/// The same NLL of hidden states `h` [R, H] through the output layer `w` [V, H] (both float32
/// or both bfloat16: the matrix product's format) and `bias` [V] float32, differentiable with
/// respect to all three: the forward pass keeps softmax - onehot in place of the logits, so
/// the backward pass is three matrix products (the bias's a matrix-vector one), not libtorch's
/// passes back through the gather, the log-softmax and the number format's copy. Requires
/// [`kernels_run_on`] the CPU.
pub fn token_nll_grad(h: &Tensor, w: &Tensor, bias: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let targets = targets.to_kind(Kind::Int64);
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: as in `token_nll`.
    let err = unsafe {
        textvae_token_nll_grad(
            h.as_ptr(),
            w.as_ptr(),
            bias.as_ptr(),
            targets.as_ptr(),
            &mut out,
        )
    };
    // SAFETY: as in `token_nll`.
    unsafe { returned("the token NLL kernel", err, out) }
}

/// Dropout's noise for `like` (on the CPU; its values are not read): a tensor of its shape and
/// number format whose entries are 0 with probability `p` and 1 / (1 - p) otherwise, drawn in
/// parallel from a Philox generator seeded by libtorch's default CPU generator (libtorch's own
/// CPU dropout draws on one thread). The same seed gives the same noise whatever the number of
/// threads.
pub fn dropout_noise(like: &Tensor, p: f64) -> Result<Tensor> {
    noise_from_seed(like, p, None)
}

/// [`dropout_noise`] from the Philox seed `seed`, or (None) from a seed drawn from libtorch's
/// default CPU generator.
fn noise_from_seed(like: &Tensor, p: f64, seed: Option<u64>) -> Result<Tensor> {
    let mut out: *mut C_tensor = std::ptr::null_mut();
    let seed_ptr = seed.as_ref().map_or(std::ptr::null(), |s| s as *const u64);
    // SAFETY: `like` is a live tensor and `seed_ptr` null or a live u64, both borrowed for this
    // call; the C side checks the device and `p` before it allocates, and sets `out` only on
    // success.
    let err = unsafe { textvae_dropout_noise(like.as_ptr(), p, seed_ptr, &mut out) };
    // SAFETY: `err` and `out` are what the call returned, each taken once.
    unsafe { returned("dropout noise", err, out) }
}

/// Hidden states [N, T, H] float32 of a one-layer LSTM (PyTorch's gate order i, f, g, o) whose
/// gate pre-activations at step t for row r are `inputs[r / S, t] + [h_{t-1}; z_r] wᵀ`, S = N /
/// B: `inputs` [B, T, 4H] float32 (the input sequence's share of the gates, both biases
/// included), `w` [4H, H + Z] (the recurrent weights beside z's columns of the input weights;
/// float32 or bfloat16, the recurrent product's format), `h0` and `c0` [N, H], `z` [N, Z]. For
/// scoring without a gradient, where the S rows of a sentence (its K samples of z) share one
/// input sequence; src/lstm.cpp. Requires [`kernels_run_on`] the CPU.
pub fn lstm_shared_inputs(
    inputs: &Tensor,
    w: &Tensor,
    h0: &Tensor,
    z: &Tensor,
    c0: &Tensor,
) -> Result<Tensor> {
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: as in `token_nll`.
    let err = unsafe {
        textvae_lstm_shared_inputs(
            inputs.as_ptr(),
            w.as_ptr(),
            h0.as_ptr(),
            z.as_ptr(),
            c0.as_ptr(),
            &mut out,
        )
    };
    // SAFETY: as in `token_nll`.
    unsafe { returned("the LSTM kernel", err, out) }
}

/// The tensor a C function handed back through its `out` argument, or its error.
///
/// # Safety
/// `err` is as for [`take_message`]; where it is null, `out` is a tensor the C side allocated
/// for the caller to own.
unsafe fn returned(what: &str, err: *mut c_char, out: *mut C_tensor) -> Result<Tensor> {
    if let Some(msg) = take_message(err) {
        bail!("{what} failed: {msg}");
    }
    if out.is_null() {
        bail!("{what} returned no tensor");
    }
    Ok(Tensor::from_ptr(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// libtorch's figure for the same rows: the logits in float32, the bias added, cross-entropy.
    fn reference(logits: &Tensor, bias: &Tensor, targets: &Tensor) -> Tensor {
        (logits.to_kind(Kind::Float) + bias).cross_entropy_loss::<Tensor>(
            targets,
            None,
            tch::Reduction::None,
            -100,
            0.0,
        )
    }

    #[test]
    fn the_lstm_kernel_refuses_rows_that_do_not_share_inputs_evenly() {
        if !kernels_run_on(Device::Cpu) {
            return;
        }
        let f = (Kind::Float, Device::Cpu);
        let (b, t, h, z_dim, n) = (2, 3, 4, 2, 5);
        let err = lstm_shared_inputs(
            &Tensor::zeros([b, t, 4 * h], f),
            &Tensor::zeros([4 * h, h + z_dim], f),
            &Tensor::zeros([n, h], f),
            &Tensor::zeros([n, z_dim], f),
            &Tensor::zeros([n, h], f),
        )
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("multiple of the 2 input sequences"),
            "{err:#}"
        );
    }

    #[test]
    fn one_pass_nll_matches_libtorch_in_both_number_formats() {
        if !kernels_run_on(Device::Cpu) {
            eprintln!("no row loop for this CPU: the callers take libtorch's ops");
            return;
        }
        tch::manual_seed(3);
        // A vocabulary that leaves a tail after the vector chunks, and one shorter than a chunk.
        for (rows, vocab) in [(37i64, 1_003i64), (5, 7), (64, 2_048)] {
            let logits = Tensor::randn([rows, vocab], (Kind::Float, Device::Cpu)) * 4.0;
            let bias = Tensor::randn([vocab], (Kind::Float, Device::Cpu));
            let targets = Tensor::randint(vocab, [rows], (Kind::Int64, Device::Cpu));
            for kind in [Kind::Float, Kind::BFloat16] {
                let x = logits.to_kind(kind);
                let got = token_nll(&x, &bias, &targets).unwrap();
                let want = reference(&x, &bias, &targets);
                let err = (&got - &want).abs().max().double_value(&[]);
                assert!(err < 1e-4, "{rows}x{vocab} {kind:?}: max error {err}");
            }
        }
    }

    #[test]
    fn one_pass_nll_is_stable_for_large_logits_and_strided_rows() {
        if !kernels_run_on(Device::Cpu) {
            return;
        }
        // Logits far beyond exp's float range. The exponentials are taken against the target's
        // logit: rows 0 and 1 have targets 500 and 103 nats under their maximum (past the 64
        // allowed, so the pass is redone against the maximum), rows 2 and 3 likely targets at
        // large magnitudes, row 4 a target 32 nats under (kept: terms up to e^32 in the sum).
        let rows: [[f32; 4]; 5] = [
            [500.0, -500.0, 499.0, 0.0],
            [100.0, 99.0, -3.0, 2.0],
            [1e4, 1e4 - 1.0, -3.0, 2.0],
            [-1e4, -1e4 - 1.0, -1e4 + 2.0, -1e4 + 0.5],
            [-2.0, -1.0, 30.0, 0.0],
        ];
        let wide = Tensor::from_slice(rows.as_flattened()).view([5, 4]);
        let targets = Tensor::from_slice(&[3i64, 2, 1, 0, 0]);
        // As they are (the scalar tail alone), and ten times over (vector chunks and a tail).
        for wide in [wide.shallow_clone(), wide.repeat([1, 10])] {
            let bias = Tensor::zeros([wide.size()[1]], (Kind::Float, Device::Cpu));
            let got = token_nll(&wide, &bias, &targets).unwrap();
            let want = reference(&wide, &bias, &targets);
            assert!(got.isfinite().all().int64_value(&[]) == 1);
            assert!(
                (&got - &want).abs().max().double_value(&[]) < 1e-4,
                "{got:?} {want:?}"
            );
        }
        // A NaN logit, in a vector chunk or in the tail, makes its row's NLL NaN (training
        // skips a step whose loss is not finite), and only its row's.
        let logits = Tensor::randn([3, 40], (Kind::Float, Device::Cpu));
        let _ = logits.get(0).get(5).fill_(f64::NAN);
        let _ = logits.get(1).get(37).fill_(f64::NAN);
        let bias = Tensor::zeros([40], (Kind::Float, Device::Cpu));
        let got = token_nll(&logits, &bias, &Tensor::from_slice(&[1i64, 2, 3])).unwrap();
        let nan: Vec<bool> = Vec::try_from(got.isnan()).unwrap();
        assert_eq!(nan, [true, true, false]);
        // Every other column of a wider tensor: rows not contiguous with each other.
        let base = Tensor::randn([6, 40], (Kind::Float, Device::Cpu));
        let strided = base.slice(1, 0, 40, 2);
        let bias = Tensor::randn([20], (Kind::Float, Device::Cpu));
        let targets = Tensor::from_slice(&[0i64, 19, 3, 7, 11, 5]);
        let got = token_nll(&strided, &bias, &targets).unwrap();
        let want = reference(&strided, &bias, &targets);
        assert!((&got - &want).abs().max().double_value(&[]) < 1e-5);
    }

    #[test]
    fn one_pass_gradients_match_libtorch_in_both_number_formats() {
        if !kernels_run_on(Device::Cpu) {
            return;
        }
        tch::manual_seed(5);
        let (rows, dim, vocab) = (29i64, 24i64, 517i64);
        let opts = (Kind::Float, Device::Cpu);
        let h = Tensor::randn([rows, dim], opts).set_requires_grad(true);
        let w = (Tensor::randn([vocab, dim], opts) * 0.3).set_requires_grad(true);
        let b = Tensor::randn([vocab], opts).set_requires_grad(true);
        let y = Tensor::randint(vocab, [rows], (Kind::Int64, Device::Cpu));
        // A different weight on every row's NLL, as a loss may give.
        let weight = Tensor::rand([rows], opts) + 0.5;
        for (kind, tol) in [(Kind::Float, 1e-5), (Kind::BFloat16, 2e-2)] {
            let (hk, wk) = (h.to_kind(kind), w.to_kind(kind));
            let ours = token_nll_grad(&hk, &wk, &b, &y).unwrap();
            let logits = hk.matmul(&wk.tr()).to_kind(Kind::Float) + &b;
            let want = reference(&logits, &b.zeros_like(), &y);
            let nll_err = (&ours - &want).abs().max().double_value(&[]);
            assert!(nll_err < 1e-3, "{kind:?}: NLL off by {nll_err}");
            let grads = |nll: &Tensor| {
                Tensor::run_backward(
                    &[(nll * &weight).sum(Kind::Float)],
                    &[&h, &w, &b],
                    false,
                    false,
                )
            };
            for (name, (g, r)) in ["h", "w", "bias"]
                .iter()
                .zip(grads(&ours).iter().zip(&grads(&want)))
            {
                let rel = (g - r).norm().double_value(&[]) / r.norm().double_value(&[]);
                assert!(
                    rel < tol,
                    "{kind:?}: gradient of {name} off by {rel} (relative)"
                );
            }
        }
    }

    #[test]
    fn a_target_outside_the_vocabulary_is_an_error_not_a_read_out_of_bounds() {
        if !kernels_run_on(Device::Cpu) {
            return;
        }
        let logits = Tensor::zeros([2, 5], (Kind::Float, Device::Cpu));
        let bias = Tensor::zeros([5], (Kind::Float, Device::Cpu));
        let err = token_nll(&logits, &bias, &Tensor::from_slice(&[1i64, 5])).unwrap_err();
        assert!(err.to_string().contains("outside the vocabulary"), "{err}");
        let wrong_bias = Tensor::zeros([4], (Kind::Float, Device::Cpu));
        assert!(token_nll(&logits, &wrong_bias, &Tensor::from_slice(&[1i64, 2])).is_err());
    }

    #[test]
    fn dropout_noise_drops_a_share_p_and_scales_the_rest_by_one_over_one_minus_p() {
        for kind in [Kind::Float, Kind::BFloat16] {
            let like = Tensor::empty([1000, 1000], (kind, Device::Cpu));
            for p in [0.3, 0.5] {
                let noise = dropout_noise(&like, p).unwrap();
                assert_eq!((noise.size(), noise.kind()), (like.size(), kind));
                let kept = Tensor::from(1.0 / (1.0 - p)).to_kind(kind);
                let zero = noise.eq(0.0);
                let only_two_values = zero.logical_or(&noise.eq_tensor(&kept)).all();
                assert!(bool::try_from(only_two_values).unwrap(), "{kind:?} p {p}");
                // 10^6 draws: the share's standard deviation is under 0.0005.
                let dropped = zero
                    .to_kind(Kind::Float)
                    .mean(Kind::Float)
                    .double_value(&[]);
                assert!(
                    (dropped - p).abs() < 0.003,
                    "{kind:?} p {p}: dropped {dropped}"
                );
            }
        }
        let like = Tensor::empty([4], (Kind::Float, Device::Cpu));
        let err = dropout_noise(&like, 1.0).unwrap_err();
        assert!(err.to_string().contains("[0, 1)"), "{err}");
    }

    #[test]
    fn dropout_noise_is_a_function_of_the_seed_and_the_position_not_the_thread() {
        let opts = (Kind::Float, Device::Cpu);
        let block = 1 << 14;
        // Three blocks and a bit, split between the threads, against one block on one thread.
        let long = noise_from_seed(&Tensor::empty([3 * block + 5], opts), 0.5, Some(42)).unwrap();
        let short = noise_from_seed(&Tensor::empty([block], opts), 0.5, Some(42)).unwrap();
        assert!(long.narrow(0, 0, block).equal(&short));
        // Each block draws its own numbers, and another seed others.
        assert!(!long.narrow(0, block, block).equal(&short));
        let other = noise_from_seed(&Tensor::empty([block], opts), 0.5, Some(43)).unwrap();
        assert!(!other.equal(&short));
        // Without a seed, each call draws a fresh one.
        let a = dropout_noise(&short, 0.5).unwrap();
        let b = dropout_noise(&short, 0.5).unwrap();
        assert!(!a.equal(&b));
    }
}
